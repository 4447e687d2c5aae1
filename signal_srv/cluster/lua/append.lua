-- Append a call's accepted events to its log, if the caller still owns the call at its epoch.
-- KEYS[1] call:{id}   KEYS[2] call:{id}:log
-- ARGV[1] owner   ARGV[2] epoch   ARGV[3] ttl ms   ARGV[4] number of the first entry   ARGV[5..] entries
-- Returns 0 (refused: another node owns the call now) or 1. Entries numbered at or below the
-- call's `n` are already there (a batch sent again after a lost reply) and are skipped.
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'n')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return 0
end
local done = tonumber(cur[3] or '0')
local n = tonumber(ARGV[4])
for i = 5, #ARGV do
  if n > done then
    redis.call('XADD', KEYS[2], '0-' .. n, 'e', ARGV[i])
  end
  n = n + 1
end
if n - 1 > done then
  redis.call('HSET', KEYS[1], 'n', n - 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
