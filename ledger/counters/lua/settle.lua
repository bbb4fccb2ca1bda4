-- Charge `actual` for a request whose terminal event is at log position T, and give
-- back what it held. Idempotent: a reservation is removed once; a charge is added only
-- by the settle that removes it, or, on a counter that never held it, once (x: field).
-- Every counter of the newest definition whose window holds the admission time must
-- be declared (the registries say which): else the caller is asked for them ('more').
-- KEYS: open index (zset), open keys (hash), registries (s), counters (n), their generation keys (n)
-- ARGV: request id, actual, T, A (RequestAdmitted's position), admission time (ms), s,
--       held flags ('1'/'0' per counter)
-- Reply: {'ok', counters charged} | {'more', key, entry...}
local id, actual = ARGV[1], ARGV[2]
local at, admitted, when, s, held = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local n = (#KEYS - 2 - s) / 2
local regs, declared = {}, {}
for j = 1, s do regs[j] = KEYS[2 + j] end
for i = 1, n do declared[KEYS[2 + s + i]] = true end
local more = undeclared(regs, when, declared)
if #more > 0 then return {'more', unpack(more)} end
local field, settled = 'r:' .. id, 'x:' .. id
local charged = 0
for i = 1, n do
  local key = KEYS[2 + s + i]
  local v = redis.call('HMGET', key, 'pos', field)
  if not v[1] then
    -- Missing: whatever rebuilds it reads the log after this charge committed. A
    -- rebuild that read the log before must not land: take its generation away.
    redis.call('DEL', KEYS[2 + s + n + i])
  elseif v[2] then
    redis.call('HDEL', key, field)
    redis.call('HINCRBY', key, 'reserved', '-' .. v[2])
    if tonumber(v[1]) < at then
      redis.call('HINCRBY', key, 'spent', actual)
      charged = charged + 1
    end
  elseif tonumber(v[1]) >= at then
    -- built from a log that already had this charge
  elseif string.sub(held, i, i) == '1' or tonumber(v[1]) >= admitted then
    -- it held the reservation (live, or from a rebuild after the admission): settled before
  elseif redis.call('HSETNX', key, settled, '1') == 1 then
    redis.call('HINCRBY', key, 'spent', actual)  -- never held it: count the charge once
    charged = charged + 1
  end
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
return {'ok', charged}
