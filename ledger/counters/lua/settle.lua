-- Charge `actual` for a request whose terminal event is at log position T, and give
-- back what it held. Idempotent: a reservation (this attempt's: its nonce) is removed
-- once; a charge is added only by the settle that removes it, or, on a counter that
-- never held it, once (x: field). Every counter of the newest definition whose window
-- holds the admission time must be declared (the registries say which): else the
-- caller is asked for them ('more'). Each counter's fence rises to `fence`, so a
-- rebuild that read the log before this charge cannot land.
-- KEYS: open index (zset), open keys (hash), registries (s), counters (n), their generation hashes (n)
-- ARGV: request id, actual, T, A (RequestAdmitted's position), admission time (ms), s,
--       held flags ('1'/'0' per counter), nonce, fence (0: none), swept ('1': only if the
--       open index still lists this attempt — else it was settled already), marked ('1':
--       leave x:<id> behind, so that a confirm arriving after this settle adds nothing —
--       the sweeper's settles, which may come before a stalled gateway's confirm)
-- Reply: {'ok', counters charged} | {'more', key, entry...}
local id, actual = ARGV[1], ARGV[2]
local at, admitted, when, s, flags = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local nonce, upto = ARGV[8], tonumber(ARGV[9])
local indexed = redis.call('HGET', KEYS[2], id)
local listed = indexed and string.sub(indexed, 1, #nonce + 1) == nonce .. '|'
if ARGV[10] == '1' and not listed then flags = string.rep('1', 64) end
local n = (#KEYS - 2 - s) / 2
local regs, declared = {}, {}
for j = 1, s do regs[j] = KEYS[2 + j] end
for i = 1, n do declared[KEYS[2 + s + i]] = true end
local more = undeclared(regs, when, declared)
if #more > 0 then return {'more', unpack(more)} end
local run = current_run()
local field, settled = 'r:' .. id, 'x:' .. id
local charged = 0
for i = 1, n do
  local key = KEYS[2 + s + i]
  if upto > 0 then fence(KEYS[2 + s + n + i], key, upto) end
  local v = redis.call('HMGET', key, 'pos', field, 'run')
  local est, owner = held(v[2])
  if not v[1] or v[3] ~= run then
    -- missing (or from another life): whatever rebuilds it reads the log after this charge
  elseif est and owner == nonce then
    redis.call('HDEL', key, field)
    if ARGV[11] == '1' then redis.call('HSET', key, settled, '1') end
    if est ~= '0' then redis.call('HINCRBY', key, 'reserved', '-' .. est) end
    if tonumber(v[1]) < at then
      redis.call('HINCRBY', key, 'spent', actual)
      charged = charged + 1
    end
  elseif tonumber(v[1]) >= at then
    -- built from a log that already had this charge
  elseif string.sub(flags, i, i) == '1' or tonumber(v[1]) >= admitted then
    -- it held the reservation (confirmed, or from a rebuild after the admission): settled before
  elseif redis.call('HSETNX', key, settled, '1') == 1 then
    redis.call('HINCRBY', key, 'spent', actual)  -- never held it: count the charge once
    charged = charged + 1
  end
end
if listed then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
return {'ok', charged}
