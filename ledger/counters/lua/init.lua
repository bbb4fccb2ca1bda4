-- Write a rebuilt counter, unless it is stale or a live counter exists:
-- * the generation token must be the one the rebuild started under, in this server's
--   life (a FLUSHALL or a restart since then took it: the log it read may predate
--   changes that are gone);
-- * the counter's fence must not be above the position the rebuild read (a confirm or
--   a settle since then needs a newer read);
-- * a live counter is never replaced (it may hold reservations whose admissions are
--   not committed yet); one from another server life is.
-- KEYS: counter, generation hash
-- ARGV: token, spent, reserved, pos, expire-at (epoch s, 0 = never), then request id and
--       estimate|nonce pairs of the open reservations it holds
-- Reply: 'ok' | 'exists' | 'stale'
local run = current_run()
-- (a token restored from an RDB or AOF file is the same string, but of another life)
if redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] or string.sub(ARGV[1], 1, #run + 1) ~= run .. ':' then
  return 'stale'
end
if tonumber(redis.call('HGET', KEYS[2], KEYS[1]) or '0') > tonumber(ARGV[4]) then return 'stale' end
if redis.call('HGET', KEYS[1], 'run') == run then return 'exists' end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'spent', ARGV[2], 'reserved', ARGV[3], 'pos', ARGV[4], 'run', run)
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
