-- Replace a call's snapshot and drop the log entries it covers, if the caller still owns the call.
-- KEYS[1] call:{id}   KEYS[2] call:{id}:log
-- ARGV[1] owner   ARGV[2] epoch   ARGV[3] ttl ms   ARGV[4] number of the last entry it covers   ARGV[5] snapshot
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'n')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return 0
end
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'snap', ARGV[5], 'snap_n', n)
if n > tonumber(cur[3] or '0') then
  redis.call('HSET', KEYS[1], 'n', n)
end
redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (n + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
