-- After RequestAdmitted committed (at position A): make sure every counter that must
-- hold the reservation does. A counter lost and rebuilt between the reserve and the
-- commit read a log without it; so does a counter of a newer definition that this
-- gateway has not heard of yet (found in the registry). The reservation is added
-- there, within the limit, or refused. Every counter's fence rises to A: a rebuild
-- that read the log before the admission can no longer land.
-- KEYS: registries (s, one per subject), counters (n), their generation hashes (n)
-- ARGV: request id, est, A, admission time (ms), s, nonce, limits... (one per counter)
-- Reply: {'ok', added} | {'over', i, spent, reserved} | {'missing', i...} | {'more', key, entry...}
--        | {'dup'} (another attempt under this id holds a counter)
local id, est, admitted, at, s, nonce = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local n = (#KEYS - s) / 2
local regs, declared = {}, {}
for j = 1, s do regs[j] = KEYS[j] end
for i = 1, n do declared[KEYS[s + i]] = true end
local more = undeclared(regs, at, declared)
if #more > 0 then return {'more', unpack(more)} end
local run = current_run()
local field, settled = 'r:' .. id, 'x:' .. id
local values, missing, add = {}, {}, {}
for i = 1, n do
  local key = KEYS[s + i]
  local v = redis.call('HMGET', key, 'spent', 'reserved', 'pos', field, settled, 'run')
  if not v[3] or v[6] ~= run then missing[#missing + 1] = i end
  values[i] = v
end
if #missing > 0 then return {'missing', unpack(missing)} end
for i = 1, n do
  local v = values[i]
  local _, owner = held(v[4])
  if v[4] and owner ~= nonce then return {'dup'} end
  -- Held already, settled already, or built from a log that had the admission: nothing to do.
  if not v[4] and not v[5] and tonumber(v[3]) < admitted then
    local ok = room(v[1], v[2], est, ARGV[6 + i])
    if not ok then return {'over', i, v[1] or '0', v[2] or '0'} end
    add[#add + 1] = i
  end
end
for i = 1, n do fence(KEYS[s + n + i], KEYS[s + i], admitted) end
for _, i in ipairs(add) do
  redis.call('HINCRBY', KEYS[s + i], 'reserved', est)
  redis.call('HSET', KEYS[s + i], field, est .. '|' .. nonce)
end
return {'ok', #add}
