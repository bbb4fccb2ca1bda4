-- Write a rebuilt counter: only if the generation is the one the rebuild started under
-- (else the log it read may predate a charge already settled: it is stale) and only if
-- no counter exists (a live counter is never replaced: it may hold reservations whose
-- admissions are not committed yet).
-- KEYS: counter, generation
-- ARGV: token, spent, reserved, pos, expire-at (epoch s, 0 = never), then request id and
--       estimate pairs of the open reservations it holds
-- Reply: 'ok' | 'exists' | 'stale'
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'stale' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[1], 'spent', ARGV[2], 'reserved', ARGV[3], 'pos', ARGV[4])
local fields = {}
for i = 6, #ARGV, 2 do
  fields[#fields + 1] = 'r:' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if #fields >= 1000 then redis.call('HSET', KEYS[1], unpack(fields)); fields = {} end
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[5] ~= '0' then
  -- A gateway clock ahead of Redis's must not create a key that is dead on
  -- arrival (it would be rebuilt forever): keep such a key for a minute.
  local now = tonumber(redis.call('TIME')[1])
  if tonumber(ARGV[5]) > now then redis.call('EXPIREAT', KEYS[1], ARGV[5])
  else redis.call('EXPIRE', KEYS[1], 60) end
end
return 'ok'
