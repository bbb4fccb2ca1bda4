"""Per-tag budget counters in Redis: one round trip to admit, idempotent settle.

Each budgeted tag has one hash per window, ``ledger:w:<duration>:<start>:<tag>``,
with integer nano-USD fields ``spent`` and ``reserved`` and ``pos``: the event log
position the counter was (re)built from. The key expires a margin after its
window ends, so a new window starts from nothing by itself.

A missing key is never read as zero: it is rebuilt from the log first (what was
charged in that window, plus reservations still open), written only if nobody
else wrote it meanwhile, and stamped with the log position it reflects. Settling
compares that stamp with the position of the request's terminal event, so a
charge is counted exactly once whether it reached the counter live or through a
rebuild. A FLUSHALL therefore never resets a budget.

Money in the scripts is exact: values are split into whole dollars and nanos
so that no sum passes through a double above 2^53.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from ledger.errors import LedgerError, StoreUnavailable
from ledger.windows import LIFETIME, Window

ZSET = "ledger:reservations"
SETTLED_TTL_S = 3 * 86400
_MAX_POS = str(2**62)


class CountersUnavailable(LedgerError):
    """Redis could not be reached or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Budget:
    """A tag's budget in force for one window."""

    tag: str
    duration: str  # "1d", ... or "life"
    window: Window
    limit_nanos: int
    key: str = field(init=False, compare=False)  # the window counter's Redis key

    def __post_init__(self) -> None:
        start = 0 if self.window == LIFETIME else int(self.window.start.timestamp())
        object.__setattr__(self, "key", f"ledger:w:{self.duration}:{start}:{self.tag}")

    @property
    def reset_at(self) -> datetime | None:
        return None if self.window == LIFETIME else self.window.end

    def expire_at(self) -> int:
        """Epoch seconds after which the key may go: the window's end plus a margin."""
        if self.window == LIFETIME:
            return 0
        # A settle arriving after the key expired rebuilds it from the log, so
        # the margin only saves that rebuild for requests in flight at the end.
        length = self.window.end - self.window.start
        margin = max(timedelta(seconds=1), min(length, timedelta(days=1)))
        return math.ceil((self.window.end + margin).timestamp())


@dataclass(frozen=True, slots=True)
class Reserved:
    request_id: str
    estimate_nanos: int
    keys: tuple[str, ...]
    budgets: tuple[Budget, ...]
    duplicate: bool = False
    # what the tightest budget has left once this reservation is made
    remaining_nanos: int | None = None


@dataclass(frozen=True, slots=True)
class Denied:
    budget: Budget
    spent_nanos: int
    reserved_nanos: int
    estimate_nanos: int


@dataclass(frozen=True, slots=True)
class WindowSpend:
    spent_nanos: int
    reserved_nanos: int
    pos: int


_LIB = """
local function split(s)
  s = s or '0'
  local neg = string.sub(s, 1, 1) == '-'
  if neg then s = string.sub(s, 2) end
  local hi, lo = 0, tonumber(s)
  if #s > 9 then hi = tonumber(string.sub(s, 1, #s - 9)); lo = tonumber(string.sub(s, -9)) end
  if neg then return -hi, -lo end
  return hi, lo
end
local function total(a, b, c)
  local h1, l1 = split(a); local h2, l2 = split(b); local h3, l3 = split(c)
  local hi, lo = h1 + h2 + h3, l1 + l2 + l3
  local carry = math.floor(lo / 1000000000)
  return hi + carry, lo - carry * 1000000000
end
local function greater(ah, al, bh, bl) return ah > bh or (ah == bh and al > bl) end
"""

# The reservation key holds "R|<estimate>|<window keys>" while the request is
# open and "S" once it is settled, so one GET answers "new, open or settled".
# (Every redis.call inside a script costs a few microseconds: keep them few.)

# KEYS: reservation, zset, window keys...
# ARGV: request id, estimate, deadline ms, reservation ttl s, then per window: limit
_RESERVE = (
    _LIB
    + """
if redis.call('GET', KEYS[1]) then return {'dup'} end
local n = #KEYS - 2
local est = ARGV[2]
local values = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i + 2], 'spent', 'reserved', 'pos')
  if not v[3] then return {'missing', i} end  -- every built counter has a pos
  values[i] = v
end
local tight, rh, rl = 0, 0, 0
for i = 1, n do
  local v = values[i]
  local th, tl = total(v[1], v[2], est)
  local lh, ll = split(ARGV[4 + i])
  if greater(th, tl, lh, ll) then return {'deny', i, v[1] or '0', v[2] or '0'} end
  -- what this budget has left after the reservation; keep the tightest
  local dh, dl = lh - th, ll - tl
  if dl < 0 then dh, dl = dh - 1, dl + 1000000000 end
  if tight == 0 or greater(rh, rl, dh, dl) then tight, rh, rl = i, dh, dl end
end
local keys = {}
for i = 1, n do
  redis.call('HINCRBY', KEYS[i + 2], 'reserved', est)
  keys[i] = KEYS[i + 2]
end
redis.call('SET', KEYS[1], 'R|' .. est .. '|' .. table.concat(keys, '\\n'), 'EX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if tight == 0 then return {'ok'} end
if rh > 0 then return {'ok', tight, string.format('%d%09d', rh, rl)} end
return {'ok', tight, string.format('%d', rl)}
"""
)

# KEYS: reservation, zset, window keys...
# ARGV: request id, actual, minus the estimate, terminal event position, admit position, settled ttl
_SETTLE = """
local r = redis.call('GET', KEYS[1])
if r == 'S' then return {'dup'} end
local values = {}
for i = 3, #KEYS do
  local pos = redis.call('HGET', KEYS[i], 'pos')
  if not pos then return {'missing', i - 2} end
  values[i] = tonumber(pos)
end
local live = r ~= false
local at, admitted = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 3, #KEYS do
  local pos = values[i]
  -- A counter rebuilt at or after the terminal event already holds this charge.
  if pos < at then
    redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2])
    -- The reservation is in this counter if it was made live, or if a rebuild
    -- after the admission found it open.
    if live or (admitted > 0 and pos >= admitted) then
      redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[3])
    end
  end
end
redis.call('SET', KEYS[1], 'S', 'EX', ARGV[6])
if live then redis.call('ZREM', KEYS[2], ARGV[1]) end
return {'ok'}
"""

# KEYS: window key; ARGV: spent, reserved, pos, expire-at (0 = never)
_INIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'spent', ARGV[1], 'reserved', ARGV[2], 'pos', ARGV[3])
if ARGV[4] ~= '0' then
  -- A gateway clock ahead of Redis's must not create a key that is dead on
  -- arrival (it would be rebuilt forever): keep such a key for a minute.
  local now = tonumber(redis.call('TIME')[1])
  if tonumber(ARGV[4]) > now then redis.call('EXPIREAT', KEYS[1], ARGV[4])
  else redis.call('EXPIRE', KEYS[1], 60) end
end
return 1
"""

# What the log says a tag's window holds, as of one snapshot: charges of requests
# admitted in the window, plus estimates of admitted requests with no terminal event.
REBUILD_SQL = """
with head as (select coalesce(max(position), 0) as p from events),
charged as (
    select coalesce(sum(ceil((e.data->>'cost')::numeric * 1000000000)), 0)::bigint as nanos
    from events e, head
    where e.type in ('SpendRecorded', 'ReservationExpired')
      and e.position <= head.p
      and e.data->'budget_tags' ? $1
      and (e.data->>'admitted_at')::timestamptz >= $2
      and (e.data->>'admitted_at')::timestamptz < $3
),
open as (
    select coalesce(sum(ceil((a.data->>'estimate')::numeric * 1000000000)), 0)::bigint as nanos
    from events a, head
    where a.type = 'RequestAdmitted'
      and a.position <= head.p
      and a.data->'budget_tags' ? $1
      and (a.data->>'at')::timestamptz >= $2
      and (a.data->>'at')::timestamptz < $3
      and not exists (
          select 1 from events t
          where t.stream = a.stream and t.version = 2 and t.position <= head.p
      )
)
select head.p, charged.nanos, open.nanos from head, charged, open
"""


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


class Counters:
    """Reserve, settle, release and rebuild budget counters. Scripts are loaded
    once and called by SHA (redis-py's Script falls back to EVAL after a
    SCRIPT FLUSH or a restart)."""

    def __init__(self, client: aioredis.Redis, pool: asyncpg.Pool) -> None:
        self.redis = client
        self.pool = pool
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._init = client.register_script(_INIT)
        self._batcher = _ScriptBatcher(client)
        self.rebuilds = 0

    async def close(self) -> None:
        await self._batcher.close()

    # ------------------------------------------------------------- admit

    async def reserve(
        self,
        request_id: str,
        budgets: Sequence[Budget],
        estimate_nanos: int,
        deadline: datetime,
        *,
        reservation_ttl_s: int = 86400,
    ) -> Reserved | Denied:
        """All or nothing: reserve ``estimate`` on every budget, or on none.

        One round trip when every counter exists; a missing counter is rebuilt
        from the log and the call repeated.
        """
        keys = [_reservation_key(request_id), ZSET]
        keys += [b.key for b in budgets]
        args: list[Any] = [
            request_id,
            estimate_nanos,
            int(deadline.timestamp() * 1000),
            reservation_ttl_s,
        ]
        args += [b.limit_nanos for b in budgets]
        for _ in range(5):
            result = await self._call(self._reserve, keys, args)
            verdict = _text(result[0])
            if verdict == "ok":
                remaining = int(result[2]) if len(result) > 2 else None
                return Reserved(
                    request_id,
                    estimate_nanos,
                    tuple(b.key for b in budgets),
                    tuple(budgets),
                    remaining_nanos=remaining,
                )
            if verdict == "dup":
                return Reserved(
                    request_id, estimate_nanos, tuple(b.key for b in budgets), tuple(budgets), True
                )
            if verdict == "missing":
                await self.rebuild(budgets[int(result[1]) - 1])
                continue
            budget = budgets[int(result[1]) - 1]
            return Denied(budget, _int(result[2]), _int(result[3]), estimate_nanos)
        raise CountersUnavailable("budget counters kept disappearing while reserving")

    # ------------------------------------------------------------- settle

    async def settle(
        self,
        request_id: str,
        budgets: Sequence[Budget],
        *,
        actual_nanos: int,
        estimate_nanos: int,
        position: int,
        admitted_position: int,
    ) -> bool:
        """Move the reservation to spent at ``actual`` (may exceed the estimate).

        ``position`` is the log position of the request's terminal event, which
        was committed before this call. Idempotent: False if already settled.
        """
        keys = [_reservation_key(request_id), ZSET]
        keys += [b.key for b in budgets]
        args = [
            request_id,
            actual_nanos,
            -estimate_nanos,
            position,
            admitted_position,
            SETTLED_TTL_S,
        ]
        for _ in range(5):
            result = await self._call(self._settle, keys, args)
            verdict = _text(result[0])
            if verdict == "missing":
                await self.rebuild(budgets[int(result[1]) - 1])
                continue
            return verdict == "ok"
        raise CountersUnavailable("budget counters kept disappearing while settling")

    async def release(
        self,
        request_id: str,
        budgets: Sequence[Budget],
        *,
        estimate_nanos: int,
        position: int,
        admitted_position: int,
    ) -> bool:
        """Give the reservation back without charging anything."""
        return await self.settle(
            request_id,
            budgets,
            actual_nanos=0,
            estimate_nanos=estimate_nanos,
            position=position,
            admitted_position=admitted_position,
        )

    async def drop_unlogged(self, request_id: str, budgets: Sequence[Budget], estimate_nanos: int) -> bool:
        """Release a reservation whose admission never reached the log (so no
        rebuild ever counted it)."""
        return await self.settle(
            request_id,
            budgets,
            actual_nanos=0,
            estimate_nanos=estimate_nanos,
            position=int(_MAX_POS),
            admitted_position=0,
        )

    # ------------------------------------------------------------- read

    async def read(self, budget: Budget) -> WindowSpend:
        """The counter of ``budget``'s window, rebuilt from the log if missing."""
        for _ in range(5):
            values = await self._redis(self.redis.hmget(budget.key, ["spent", "reserved", "pos"]))
            if values[2] is not None:
                return WindowSpend(_int(values[0]), _int(values[1]), _int(values[2]))
            await self.rebuild(budget)
        raise CountersUnavailable("budget counter kept disappearing while reading")

    async def expired(self, now: datetime, limit: int = 100) -> list[str]:
        """Request ids whose reservation deadline has passed."""
        members = await self._redis(
            self.redis.zrangebyscore(ZSET, "-inf", int(now.timestamp() * 1000), start=0, num=limit)
        )
        return [_text(m) for m in members]

    async def reservation(self, request_id: str) -> tuple[int, list[str]] | None:
        """(estimate, window keys) of an open reservation, if Redis still has it."""
        value = await self._redis(self.redis.get(_reservation_key(request_id)))
        if value is None or not _text(value).startswith("R|"):
            return None
        _, est, keys = _text(value).split("|", 2)
        return int(est), [k for k in keys.split("\n") if k]

    async def forget(self, request_id: str) -> None:
        await self._redis(self.redis.zrem(ZSET, request_id))

    # ------------------------------------------------------------- rebuild

    async def rebuild(self, budget: Budget) -> WindowSpend:
        """Recompute one window counter from the log and write it unless another
        process already did (the first complete rebuild wins; all are correct
        because each carries the log position it reflects)."""
        window = budget.window
        try:
            row = await self.pool.fetchrow(REBUILD_SQL, budget.tag, window.start, window.end)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as e:
            raise StoreUnavailable(f"cannot rebuild budget counter from the log: {e}") from e
        assert row is not None
        pos, spent, reserved = int(row[0]), int(row[1]), int(row[2])
        await self._call(self._init, [budget.key], [spent, reserved, pos, budget.expire_at()])
        self.rebuilds += 1
        return WindowSpend(spent, reserved, pos)

    # ------------------------------------------------------------- plumbing

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await self._batcher.call(script, keys, args)

    async def _redis(self, command: Awaitable[Any]) -> Any:
        try:
            return await command
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            raise CountersUnavailable(f"Redis unavailable: {e}") from e


class _ScriptBatcher:
    """Sends every script call queued while the previous round trip was in
    flight as one pipeline: under load, one round trip serves many requests;
    a lone call goes out at once."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pending: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="redis-script-batcher")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, keys, args, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                await self._send(batch)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as e:
                error = CountersUnavailable(f"Redis unavailable: {e}")
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error)
            except Exception as e:  # the batcher must outlive any one batch
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(e)

    async def _send(self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            script, keys, args, future = batch[0]
            result = await script(keys=keys, args=args)  # loads the script if Redis lost it
            if not future.done():
                future.set_result(result)
            return
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results = await pipe.execute(raise_on_error=False)
        for (script, keys, args, future), result in zip(batch, results, strict=True):
            if isinstance(result, redis_errors.NoScriptError):
                result = await script(keys=keys, args=args)  # SCRIPT FLUSH or restart
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(CountersUnavailable(f"Redis script failed: {result}"))
            else:
                future.set_result(result)


def connect_redis(url: str, *, max_connections: int = 64, timeout_s: float = 3.0) -> aioredis.Redis:
    """A client whose pool blocks (up to ``timeout_s``) when all connections are
    busy, instead of failing: bursts queue rather than error."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) its pool


def _reservation_key(request_id: str) -> str:
    return f"ledger:r:{request_id}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
