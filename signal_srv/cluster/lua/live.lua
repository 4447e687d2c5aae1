-- The nodes whose lease has not run out, by Redis's clock.   KEYS[1] nodes zset
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), '+inf')
