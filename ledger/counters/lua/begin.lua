-- Start a rebuild: nothing to do if the counter exists; else register the counter in
-- its subject's registry (before the log is read, so that settles find it and fence
-- this rebuild) and return the subject's generation token as of now (created if
-- missing), which the rebuild's write must still find. Registry entries of windows
-- that ended a day ago are pruned.
-- KEYS: counter, generation, registry
-- ARGV: a fresh token, the registry entry, now (ms)
-- Reply: {'exists'} | {'token', token}
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local entries = redis.call('HGETALL', KEYS[3])
local now = tonumber(ARGV[3])
for k = 1, #entries, 2 do
  local _, stop = entry(entries[k + 1])
  if stop + 86400000 < now then redis.call('HDEL', KEYS[3], entries[k]) end
end
redis.call('HSET', KEYS[3], KEYS[1], ARGV[2])
local token = redis.call('GET', KEYS[2])
if not token then
  redis.call('SET', KEYS[2], ARGV[1])
  token = ARGV[1]
end
return {'token', token}
