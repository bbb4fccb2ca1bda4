-- Reserve `est` on every window counter and take a place in every rate limit, or
-- do neither anywhere (all or nothing).
-- KEYS: open index (zset), open keys (hash), counters (n), rate-limit keys (m)
-- ARGV: request id, est, deadline ms, counter keys joined by \n, nonce, n,
--       limits... (one per counter), now ms, tokens (the prompt's bound), member
--       ("<request id>|<nonce>"), then per rate-limit key: kind, maximum
-- Reply: {'ok', tightest index, its room left} | {'deny', i, spent, reserved}
--        | {'limited', j, used} | {'missing', i...} (counters to rebuild first) | {'dup'}
local id, est, nonce = ARGV[1], ARGV[2], ARGV[5]
local n = tonumber(ARGV[6])
local m = #KEYS - 2 - n
-- Listed already: another attempt's (dup), or this very call run twice (a client
-- retrying after a lost reply): it took everything the first time, answer again.
local again = false
if n > 0 then
  local indexed = redis.call('HGET', KEYS[2], id)
  if indexed then
    if string.sub(indexed, 1, #nonce + 1) ~= nonce .. '|' then return {'dup'} end
    again = true
  end
end
local run = current_run()
local field = 'r:' .. id
local values, missing = {}, {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i + 2], 'spent', 'reserved', 'pos', 'run', field)
  if not v[3] or v[4] ~= run then missing[#missing + 1] = i end  -- absent, or from another life
  values[i] = v
end
if #missing > 0 then return {'missing', unpack(missing)} end
local tight, rh, rl = 0, 0, 0
if again then
  local rebuilt = false
  for i = 1, n do
    local _, owner = held(values[i][5])
    if owner == nil then rebuilt = true
    elseif owner ~= nonce then return {'dup'} end  -- another attempt's
  end
  if rebuilt then
    -- A counter rebuilt since the first run (a failover, a flush) lacks the
    -- reservation: the log has no such attempt yet. Undo what the first run left
    -- and reserve afresh below (its rate limits count twice: at worst it denies).
    for i = 1, n do
      local had = held(values[i][5])
      if had then
        redis.call('HDEL', KEYS[i + 2], field)
        if had ~= '0' then redis.call('HINCRBY', KEYS[i + 2], 'reserved', '-' .. had) end
        values[i] = redis.call('HMGET', KEYS[i + 2], 'spent', 'reserved', 'pos', 'run', field)
      end
    end
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    for i = 1, n do
      local v = values[i]
      local _, h, l = room(v[1], v[2], '0', ARGV[6 + i])
      if tight == 0 or greater(rh, rl, h, l) then tight, rh, rl = i, h, l end
    end
    return {'ok', tight, fmt(rh, rl)}
  end
end
for i = 1, n do
  local v = values[i]
  if v[5] then return {'dup'} end
  local ok, h, l = room(v[1], v[2], est, ARGV[6 + i])
  if not ok then return {'deny', i, v[1] or '0', v[2] or '0'} end
  if tight == 0 or greater(rh, rl, h, l) then tight, rh, rl = i, h, l end
end
-- Rate limits: each admits while what it counts is below its maximum.
local now, tokens, member = tonumber(ARGV[7 + n]), ARGV[8 + n], ARGV[9 + n]
local deadline = tonumber(ARGV[3])
for j = 1, m do
  local key, kind, max = KEYS[2 + n + j], ARGV[8 + n + 2 * j], tonumber(ARGV[9 + n + 2 * j])
  local used
  if kind == 'parallel' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)  -- slots past their deadline
    used = redis.call('ZCARD', key)
  else
    used = tonumber(redis.call('GET', key) or '0')
  end
  if used >= max then return {'limited', j, used} end
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i + 2], 'reserved', est)
  redis.call('HSET', KEYS[i + 2], field, est .. '|' .. nonce)
end
if n > 0 then
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  redis.call('HSET', KEYS[2], id, nonce .. '|' .. ARGV[4])
end
for j = 1, m do
  local key, kind = KEYS[2 + n + j], ARGV[8 + n + 2 * j]
  if kind == 'parallel' then
    redis.call('ZADD', key, deadline, member)
    local ttl = deadline - now + 60000
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  else
    redis.call('INCRBY', key, kind == 'rpm' and 1 or tokens)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, 120000) end
  end
end
return {'ok', tight, fmt(rh, rl)}
