-- Reserve `est` on every window counter, or on none (all or nothing).
-- KEYS: open index (zset), open keys (hash), counters...
-- ARGV: request id, est, deadline ms, counter keys joined by \n, nonce, limits... (one per counter)
-- Reply: {'ok', tightest index, its room left} | {'deny', i, spent, reserved}
--        | {'missing', i...} (counters to rebuild first) | {'dup'}
local id, est, nonce = ARGV[1], ARGV[2], ARGV[5]
if redis.call('HEXISTS', KEYS[2], id) == 1 then return {'dup'} end
local run = current_run()
local n = #KEYS - 2
local field = 'r:' .. id
local values, missing = {}, {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i + 2], 'spent', 'reserved', 'pos', 'run', field)
  if not v[3] or v[4] ~= run then missing[#missing + 1] = i end  -- absent, or from another life
  values[i] = v
end
if #missing > 0 then return {'missing', unpack(missing)} end
local tight, rh, rl = 0, 0, 0
for i = 1, n do
  local v = values[i]
  if v[5] then return {'dup'} end
  local ok, h, l = room(v[1], v[2], est, ARGV[5 + i])
  if not ok then return {'deny', i, v[1] or '0', v[2] or '0'} end
  if tight == 0 or greater(rh, rl, h, l) then tight, rh, rl = i, h, l end
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i + 2], 'reserved', est)
  redis.call('HSET', KEYS[i + 2], field, est .. '|' .. nonce)
end
redis.call('ZADD', KEYS[1], ARGV[3], id)
redis.call('HSET', KEYS[2], id, nonce .. '|' .. ARGV[4])
return {'ok', tight, fmt(rh, rl)}
