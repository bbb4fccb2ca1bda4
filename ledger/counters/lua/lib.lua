-- Exact money in nano-USD. Values arrive as decimal strings that may pass 2^53,
-- where a Lua number (a double) stops being exact: split each into whole dollars
-- (hi) and nanos (lo < 1e9) and add or compare those parts.
local function split(s)
  s = s or '0'
  local neg = string.sub(s, 1, 1) == '-'
  if neg then s = string.sub(s, 2) end
  local hi, lo = 0, tonumber(s)
  if #s > 9 then hi = tonumber(string.sub(s, 1, #s - 9)); lo = tonumber(string.sub(s, -9)) end
  if neg then return -hi, -lo end
  return hi, lo
end
local function norm(hi, lo)
  local carry = math.floor(lo / 1000000000)
  return hi + carry, lo - carry * 1000000000
end
local function total(a, b, c)
  local h1, l1 = split(a); local h2, l2 = split(b); local h3, l3 = split(c)
  return norm(h1 + h2 + h3, l1 + l2 + l3)
end
local function greater(ah, al, bh, bl) return ah > bh or (ah == bh and al > bl) end
local function fmt(hi, lo)
  hi, lo = norm(hi, lo)
  if hi > 0 then return string.format('%d%09d', hi, lo) end
  if hi < 0 then  -- negative: render hi*1e9+lo via its absolute value
    if lo > 0 then hi, lo = hi + 1, 1000000000 - lo end
    return string.format('-%d%09d', -hi, lo)
  end
  return string.format('%d', lo)
end
-- Does the counter {spent, reserved} take `est` more within `limit`?
-- Returns ok, then what the budget has left afterwards (hi, lo).
local function room(spent, reserved, est, limit)
  local th, tl = total(spent, reserved, est)
  local lh, ll = split(limit)
  if greater(th, tl, lh, ll) then return false, 0, 0 end
  return true, norm(lh - th, ll - tl)
end
-- A registry entry: window start and end (ms), budget epoch, limit (nanos), then a
-- spend reset (since ms, base nanos), which this script does not need.
local function entry(value)
  local a, b, c, d = string.match(value, '^(-?%d+)|(-?%d+)|(%d+)|(%d+)')
  return tonumber(a), tonumber(b), tonumber(c), d
end
-- Counters of the newest epoch, per registry, whose window holds `at` (ms) and that
-- the caller did not declare: {key, value, ...}. A script that finds any asks the
-- caller to call again declaring them ('more'): every key it touches is declared.
local function undeclared(regs, at, declared)
  local more = {}
  for _, reg in ipairs(regs) do
    local entries = redis.call('HGETALL', reg)
    local best, keys = -1, {}
    for k = 1, #entries, 2 do
      local start, stop, epoch = entry(entries[k + 1])
      if start <= at and at < stop then
        if epoch > best then best, keys = epoch, {} end
        if epoch == best then keys[#keys + 1] = k end
      end
    end
    for _, k in ipairs(keys) do
      if not declared[entries[k]] then
        more[#more + 1] = entries[k]
        more[#more + 1] = entries[k + 1]
      end
    end
  end
  return more
end
-- This server's life: a counter (or token) made in another life — before a restart
-- from an RDB/AOF file, or on another node before a failover — may be missing
-- recent changes, so it counts as missing and is rebuilt from the log. A life is the
-- run id (new at every start) and the replication id (new whenever the node becomes a
-- master): a master demoted to replica and promoted back keeps its run id, but its
-- data is what it took from the node it followed, which may have missed its last
-- acknowledged writes, and whose settles left counters of this run id alone.
local function current_run()
  local server, replication = redis.call('INFO', 'server'), redis.call('INFO', 'replication')
  return string.match(server, 'run_id:(%w+)') .. '.' .. string.match(replication, 'master_replid:(%w+)')
end
-- A reservation field's value: estimate|nonce (the nonce names one admission attempt).
local function held(value)
  if not value then return nil, nil end
  local est, nonce = string.match(value, '^([^|]*)|(.*)$')
  if est then return est, nonce end
  return value, ''
end
-- Raise a counter's fence (the log position every future rebuild of it must have
-- read) to `pos`, kept in the subject's generation hash under the counter's key.
local function fence(gen, key, pos)
  local cur = tonumber(redis.call('HGET', gen, key) or '0')
  if pos > cur then redis.call('HSET', gen, key, pos) end
end
