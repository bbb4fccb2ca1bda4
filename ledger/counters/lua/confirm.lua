-- After RequestAdmitted committed (at position A): make sure every counter that must
-- hold the reservation does. A counter lost and rebuilt between the reserve and the
-- commit read a log without it; so does a counter of a newer definition that this
-- gateway has not heard of yet (found in the registry). The reservation is added
-- there, within the limit, or refused.
-- KEYS: registries (s, one per subject), counters...
-- ARGV: request id, est, A, admission time (ms), s, limits... (one per counter)
-- Reply: {'ok', added} | {'over', i, spent, reserved} | {'missing', i...} | {'more', key, entry...}
local id, est, admitted, at, s = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local regs, declared = {}, {}
for j = 1, s do regs[j] = KEYS[j] end
for i = s + 1, #KEYS do declared[KEYS[i]] = true end
local more = undeclared(regs, at, declared)
if #more > 0 then return {'more', unpack(more)} end
local field, settled = 'r:' .. id, 'x:' .. id
local values, missing, add = {}, {}, {}
for i = s + 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved', 'pos', field, settled)
  if not v[3] then missing[#missing + 1] = i - s end
  values[i] = v
end
if #missing > 0 then return {'missing', unpack(missing)} end
for i = s + 1, #KEYS do
  local v = values[i]
  -- Held already, settled already, or built from a log that had the admission: nothing to do.
  if not v[4] and not v[5] and tonumber(v[3]) < admitted then
    local ok = room(v[1], v[2], est, ARGV[5 + i - s])
    if not ok then return {'over', i - s, v[1] or '0', v[2] or '0'} end
    add[#add + 1] = i
  end
end
for _, i in ipairs(add) do
  redis.call('HINCRBY', KEYS[i], 'reserved', est)
  redis.call('HSET', KEYS[i], field, est)
end
return {'ok', #add}
