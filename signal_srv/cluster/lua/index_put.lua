-- Publish a call's summary in the cluster-wide index, unless a newer epoch already did; the
-- call joins its owner's set of calls (and leaves the previous owner's).
-- KEYS[1] summaries hash   KEYS[2] waiting zset   KEYS[3] active zset   KEYS[4] order counter
-- KEYS[5] the owner's set of calls
-- ARGV[1] call id   ARGV[2] epoch   ARGV[3] status   ARGV[4] summary JSON   ARGV[5] owner node
-- ARGV[6] prefix of the nodes' sets of calls
local epoch = tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[1], ARGV[1])
local order
if old then
  local o = cjson.decode(old)
  if o.epoch > epoch then
    return 0
  end
  order = o.order
  if o.node ~= ARGV[5] then
    redis.call('SREM', ARGV[6] .. o.node, ARGV[1])
  end
else
  order = redis.call('INCR', KEYS[4])
end
local entry = cjson.decode(ARGV[4])
entry.epoch = epoch
entry.order = order
entry.node = ARGV[5]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
redis.call('SADD', KEYS[5], ARGV[1])
if ARGV[3] == 'waiting' then
  redis.call('ZADD', KEYS[2], order, ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], order, ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
