-- Every owner write: refused (0) unless owner and epoch are still the caller's.
-- KEYS[1] call:{id}   KEYS[2] call:{id}:log
-- ARGV[1] owner   ARGV[2] epoch   ARGV[3] op: touch | delete | move   ARGV[4] ttl ms   ARGV[5] new owner (move)
-- move is the compare-and-set that hands a call to another node: it returns the new epoch
-- (also when asked again after a lost reply).
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if ARGV[3] == 'move' and cur[1] == ARGV[5] and tonumber(cur[2]) == tonumber(ARGV[2]) + 1 then
  return tonumber(cur[2])
end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return 0
end
if ARGV[3] == 'delete' then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
if ARGV[3] == 'move' then
  local epoch = tonumber(ARGV[2]) + 1
  redis.call('HSET', KEYS[1], 'owner', ARGV[5], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  return epoch
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
