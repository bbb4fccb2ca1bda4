-- Start a rebuild: nothing to do if the counter exists (in this server's life); else
-- register the counter in its subject's registry (before the log is read, so that
-- settles find it and fence this rebuild) and return the subject's generation token
-- (created if missing or from another life), which the rebuild's write must still
-- find. Registry entries (and fences) of windows that ended a week ago are pruned.
-- KEYS: counter, generation hash, registry
-- ARGV: a fresh token, the registry entry
-- Reply: {'exists'} | {'token', token}
local run = current_run()
if redis.call('HGET', KEYS[1], 'run') == run then return {'exists'} end
local entries = redis.call('HGETALL', KEYS[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000  -- Redis's clock: the same for every gateway
for k = 1, #entries, 2 do
  local _, stop = entry(entries[k + 1])
  -- a window that ended a week ago, whose counter is gone: nobody reserves there any more
  if stop + 604800000 < now and redis.call('EXISTS', entries[k]) == 0 then
    redis.call('HDEL', KEYS[3], entries[k])
    redis.call('HDEL', KEYS[2], entries[k])
  end
end
redis.call('HSET', KEYS[3], KEYS[1], ARGV[2])
local token = redis.call('HGET', KEYS[2], 'token')
if not token or string.sub(token, 1, #run + 1) ~= run .. ':' then
  token = run .. ':' .. ARGV[1]
  redis.call('HSET', KEYS[2], 'token', token)
end
return {'token', token}
