-- Take a call over from an owner whose lease ran out: compare-and-set of owner and epoch, and
-- the call's snapshot and log, read in the same step.
-- KEYS[1] call:{id}   KEYS[2] call:{id}:log
-- ARGV[1] expected owner   ARGV[2] expected epoch   ARGV[3] new owner   ARGV[4] ttl ms
-- Returns {0} if the owner or epoch moved on, {-1} for a call that is gone or whose creator
-- died before its first snapshot (never announced to anyone: it is dropped), else {new epoch, snapshot,
-- entries...}. Asking again after a lost reply (the call is ours already) answers the same.
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'snap')
if not cur[1] then
  return {-1}  -- no such call (any more)
end
local epoch = tonumber(ARGV[2]) + 1
if not (cur[1] == ARGV[3] and tonumber(cur[2]) == epoch) then
  if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
    return {0}
  end
  if not cur[3] then
    redis.call('DEL', KEYS[1], KEYS[2])
    return {-1}
  end
  redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'epoch', epoch)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local out = {epoch, cur[3]}
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  out[#out + 1] = entry[2][2]
end
return out
