-- Record a new call's owner at epoch 1, unless the call id is taken.
-- KEYS[1] call:{id}   ARGV[1] owner node   ARGV[2] ttl ms
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
