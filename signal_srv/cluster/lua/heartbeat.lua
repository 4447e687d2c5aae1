-- Renew this node's lease, forget nodes gone for long that own no call any more, sweep a chunk
-- of the index of entries of forgotten nodes, and report.
-- KEYS[1] nodes zset (score: lease end, ms)   KEYS[2] summaries hash   KEYS[3] waiting zset
-- KEYS[4] active zset
-- ARGV[1] node   ARGV[2] lease ms   ARGV[3] forget after ms   ARGV[4] sweep cursor
-- ARGV[5] prefix of the nodes' sets of calls
-- Returns {next sweep cursor, live nodes, their lease ends (ms from now), nodes whose lease
-- ran out that still own calls, 1 if this node's own lease had run out (or was never held)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
local lapsed = (mine == false or tonumber(mine) < now) and 1 or 0
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local orphaned = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)) do
  local owned = redis.call('SCARD', ARGV[5] .. node)
  if owned > 0 then
    orphaned[#orphaned + 1] = node
  elseif tonumber(redis.call('ZSCORE', KEYS[1], node)) < now - tonumber(ARGV[3]) then
    redis.call('ZREM', KEYS[1], node)
  end
end
local scan = redis.call('HSCAN', KEYS[2], ARGV[4], 'COUNT', 200)
local pairs_ = scan[2]
for i = 1, #pairs_, 2 do
  local node = cjson.decode(pairs_[i + 1]).node
  if redis.call('ZSCORE', KEYS[1], node) == false then
    redis.call('HDEL', KEYS[2], pairs_[i])
    redis.call('ZREM', KEYS[3], pairs_[i])
    redis.call('ZREM', KEYS[4], pairs_[i])
    redis.call('SREM', ARGV[5] .. node, pairs_[i])
  end
end
local live, ends = {}, {}
local scored = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES')
for i = 1, #scored, 2 do
  live[#live + 1] = scored[i]
  ends[#ends + 1] = tonumber(scored[i + 1]) - now
end
return {scan[1], live, ends, orphaned, lapsed}
