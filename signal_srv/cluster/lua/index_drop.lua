-- Remove an ended call from the index and its owner's set of calls, unless a newer epoch owns the entry.
-- KEYS[1] summaries hash   KEYS[2] waiting zset   KEYS[3] active zset
-- ARGV[1] call id   ARGV[2] epoch   ARGV[3] prefix of the nodes' sets of calls
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local o = cjson.decode(old)
  if o.epoch > tonumber(ARGV[2]) then
    return 0
  end
  redis.call('SREM', ARGV[3] .. o.node, ARGV[1])
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
