-- Renew this node's lease, forget nodes gone for long, sweep a chunk of the index of their
-- calls, and return {next sweep cursor, live nodes}.
-- KEYS[1] nodes zset   KEYS[2] summaries hash   KEYS[3] waiting zset   KEYS[4] active zset
-- ARGV[1] node   ARGV[2] lease ms   ARGV[3] forget after ms   ARGV[4] sweep cursor
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
local scan = redis.call('HSCAN', KEYS[2], ARGV[4], 'COUNT', 200)
local pairs_ = scan[2]
for i = 1, #pairs_, 2 do
  local node = cjson.decode(pairs_[i + 1]).node
  if redis.call('ZSCORE', KEYS[1], node) == false then
    redis.call('HDEL', KEYS[2], pairs_[i])
    redis.call('ZREM', KEYS[3], pairs_[i])
    redis.call('ZREM', KEYS[4], pairs_[i])
  end
end
return {scan[1], redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')}
