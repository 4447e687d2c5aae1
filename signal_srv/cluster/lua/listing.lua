-- Newest first across one or two status indexes, skipping calls whose owner's lease ran out.
-- KEYS[1] nodes zset (score: lease end, ms)   KEYS[2] summaries hash   KEYS[3..] status zsets
-- ARGV[1] limit   ARGV[2] most entries to walk
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local live, out, heads = {}, {}, {}
for i = 3, #KEYS do
  heads[#heads + 1] = {key = KEYS[i], offset = 0, buf = {}, pos = 1}
end
local function has(h)
  if h.pos > #h.buf then
    h.buf = redis.call('ZREVRANGE', h.key, h.offset, h.offset + 99, 'WITHSCORES')
    h.offset = h.offset + 100
    h.pos = 1
  end
  return h.pos <= #h.buf
end
local function alive(node)
  if live[node] == nil then
    local lease = redis.call('ZSCORE', KEYS[1], node)
    live[node] = lease ~= false and tonumber(lease) > now
  end
  return live[node]
end
while #out < limit and budget > 0 do
  local best
  for _, h in ipairs(heads) do
    if has(h) and (best == nil or tonumber(h.buf[h.pos + 1]) > tonumber(best.buf[best.pos + 1])) then
      best = h
    end
  end
  if best == nil then
    break
  end
  local id = best.buf[best.pos]
  best.pos = best.pos + 2
  budget = budget - 1
  local entry = redis.call('HGET', KEYS[2], id)
  if entry and alive(cjson.decode(entry).node) then
    out[#out + 1] = entry
  end
end
return out
