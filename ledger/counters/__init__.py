"""Budget counters in Redis: one round trip to admit, exact and idempotent settles,
rebuilds from the log that are fenced, single-flight and O(recent).

How a counter stays equal to the log (the rules each script enforces, see lua/):

* A counter (``keys.counter``) holds ``spent``, ``reserved`` and ``pos``, the log
  position it was built from, plus one ``r:<id>`` field per reservation it holds.
  Only reserve (live) and rebuilds (open reservations found in the log) add them;
  confirm adds one back that a lost counter took with it.
* A settle removes the request's ``r:`` field and charges the counter iff it
  removed it (or, on a counter that never held it, once: ``x:<id>``). A counter
  built at or after the terminal event's position already holds the charge.
* A missing counter is rebuilt before any decision, never read as zero. A live
  counter is never deleted or replaced. A rebuild writes only under the
  subject's generation token it saw before reading the log; a settle that finds
  the counter missing deletes that token, so a rebuild that read the log before
  the settle's charge cannot land (it retries on a fresh read).
* After its admission commits, a request confirms its reservation: a counter
  flushed and rebuilt between its reserve and its commit lacks it; confirm adds
  it within the limit, or the request is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from ledger.counters import keys, scripts
from ledger.counters.budget import Budget, tag_subject
from ledger.counters.limits import Holding, Limit, Limited, minute_of, retry_after
from ledger.counters.log import WindowState, window_state
from ledger.errors import LedgerError

__all__ = [
    "Budget",
    "Counters",
    "CountersUnavailable",
    "Denied",
    "Holding",
    "Limit",
    "Limited",
    "RedisClient",
    "Reserved",
    "WindowSpend",
    "connect_redis",
    "tag_subject",
]

# A terminal position that sorts after every real one (orphans never reached the log).
NEVER = 2**62
_RETRY_FOR_S = 30.0  # missing counters keep being rebuilt for this long, then give up


RedisClient = aioredis.Redis | RedisCluster
# What a cluster call meets while a master is being replaced. (AttributeError: redis-py's
# cluster client, re-learning the slot map, can close a connection another call is
# opening; seen with 7.0 and redis-py 8.1.)
_REFUSED_UNRUN: tuple[type[Exception], ...] = (
    redis_errors.ClusterDownError,
    redis_errors.SlotNotCoveredError,
    redis_errors.TryAgainError,
)
_FAILING_OVER: tuple[type[Exception], ...] = (
    *_REFUSED_UNRUN,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,
    AttributeError,
)


def _give_up() -> float:
    return asyncio.get_running_loop().time() + _RETRY_FOR_S


class CountersUnavailable(LedgerError):
    """Redis could not be reached or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Reserved:
    request_id: str
    estimate_nanos: int
    budgets: tuple[Budget, ...]
    duplicate: bool = False
    # what the tightest budget has left once this reservation is made
    remaining_nanos: int | None = None
    holding: Holding | None = None  # the rate limits it took a place in


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
    held: frozenset[str] = frozenset()  # request ids of the reservations it holds


class CounterHooks:
    """Test seams: awaited at the named points (defaults do nothing)."""

    async def rebuild_read(self, budget: Budget, state: WindowState) -> None:
        """A rebuild has read the log and is about to write."""


class Counters:
    def __init__(
        self,
        client: RedisClient,
        pool: asyncpg.Pool,
        *,
        hooks: CounterHooks | None = None,
        rebuild_concurrency: int = 4,
        max_connections: int = 64,  # the client's (per node, on a cluster)
        failover_wait_s: float = 5.0,  # a cluster call tries again for this long
    ) -> None:
        self.redis = client
        self.pool = pool
        # On Redis Cluster a script may only touch one hash slot: calls go subject by subject.
        self.sharded = isinstance(client, RedisCluster)
        # A cluster client fails a call at once when a node's pool is full (a single
        # Redis's pool queues it): at most that many calls in flight, the rest wait.
        self._in_flight = asyncio.Semaphore(max_connections)
        self._initializing = asyncio.Lock()
        self.failover_wait_s = failover_wait_s
        self._initialized = not self.sharded
        self.hooks = hooks or CounterHooks()
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}
        self._batcher = _ScriptBatcher(client)
        # One rebuild per key at a time in this process; the others wait for it.
        self._rebuilding: dict[str, asyncio.Future[None]] = {}
        # Rebuilds share the store's pool with the event writer: never take all of it.
        self._rebuild_slots = asyncio.Semaphore(rebuild_concurrency)
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
        nonce: str = "",
        *,
        limits: Sequence[Limit] = (),
        now: datetime | None = None,
        tokens: int = 0,
    ) -> Reserved | Denied | Limited:
        """All or nothing: reserve ``estimate`` on every budget and take a place in
        every rate limit (``tokens``: the prompt's bound, for tpm), or do neither
        anywhere. ``nonce`` names this admission attempt: only it can confirm,
        settle or give back the reservation (another attempt under the same
        request id cannot)."""
        now = now or datetime.now(UTC)
        holding = self.holding(request_id, nonce, limits, now, tokens) if limits else None
        call = _ReserveCall(request_id, estimate_nanos, _ms(deadline), nonce, _ms(now), tokens, holding)
        taken: list[_Group] = []
        tightest: int | None = None
        try:
            # On a cluster, subject by subject in one fixed order (each subject's keys
            # share a slot); on one Redis, a single group and a single round trip.
            for group in self._groups([b.subject for b in budgets], [lim.subject for lim in limits]):
                reply = await self._reserve_group(call, group, budgets, limits, now)
                if isinstance(reply, scripts.Ok):
                    taken.append(group)
                    if group.budgets and (tightest is None or reply.room_nanos < tightest):
                        tightest = reply.room_nanos
                    continue
                # Refused here: give back what the subjects before it took (all or nothing).
                await self._give_back_groups(call, taken, budgets, limits, now)
                if isinstance(reply, scripts.Dup):
                    return Reserved(request_id, estimate_nanos, tuple(budgets), duplicate=True)
                if isinstance(reply, scripts.OverLimit):
                    limit = limits[group.limits[reply.index]]
                    return Limited(limit, reply.used, retry_after(limit, now))
                budget = budgets[group.budgets[reply.index]]
                return Denied(budget, reply.spent_nanos, reply.reserved_nanos, estimate_nanos)
        except BaseException:
            if taken:  # best effort: else the sweeper releases them after the deadline
                with contextlib.suppress(Exception):
                    await self._give_back_groups(call, taken, budgets, limits, now)
            raise
        return Reserved(request_id, estimate_nanos, tuple(budgets), remaining_nanos=tightest, holding=holding)

    async def _reserve_group(
        self,
        call: _ReserveCall,
        group: _Group,
        budgets: Sequence[Budget],
        limits: Sequence[Limit],
        now: datetime,
    ) -> scripts.Ok | scripts.Deny | scripts.OverLimit | scripts.Dup:
        """The reserve script over one group's counters and rate limits; indices in
        its reply are the group's."""
        mine = [budgets[i] for i in group.budgets]
        my_limits = [limits[j] for j in group.limits]
        counter_keys = [b.key for b in mine]
        args: list[Any] = [
            call.request_id,
            call.estimate_nanos,
            call.deadline_ms,
            keys.join(counter_keys),
            call.nonce,
            len(mine),
            *(b.limit_nanos for b in mine),
            call.now_ms,
            call.tokens,
            call.holding.member if call.holding else "",
        ]
        for limit in my_limits:
            args += [limit.kind, limit.maximum]
        minute = minute_of(now)
        script_keys = [
            *keys.open_index(group.subject),
            *counter_keys,
            *(lim.key(minute) for lim in my_limits),
        ]
        give_up = _give_up()
        while True:
            reply = scripts.reserve_reply(await self._call("reserve", script_keys, args))
            if not isinstance(reply, scripts.Missing):
                return reply
            await self._rebuild_missing(mine, reply, give_up)

    async def _give_back_groups(
        self,
        call: _ReserveCall,
        groups: Sequence[_Group],
        budgets: Sequence[Budget],
        limits: Sequence[Limit],
        now: datetime,
    ) -> None:
        """Undo the reservations of the groups a refused (or failed) reserve took:
        their counters' reservations and parallel slots and tpm bounds. A request
        counted in an rpm minute stays counted (at worst it denies another)."""
        for group in groups:
            if group.budgets:
                await self.release_orphan(
                    call.request_id, [budgets[i].key for i in group.budgets], call.nonce
                )
            if call.holding is not None and group.limits:
                taken = Holding(
                    tuple(limits[j] for j in group.limits),
                    call.holding.minute,
                    call.tokens,
                    call.holding.member,
                )
                await self.unlimit(taken, now, 0)

    @staticmethod
    def holding(request_id: str, nonce: str, limits: Sequence[Limit], now: datetime, tokens: int) -> Holding:
        """What a reserve with these limits takes (known before it runs, so that an
        attempt whose reply was lost can still give back its parallel slots)."""
        return Holding(tuple(limits), minute_of(now), tokens, f"{request_id}|{nonce}")

    async def unlimit(self, holding: Holding, now: datetime, used_tokens: int | None) -> None:
        """Give back what a request held of its rate limits: its parallel slots, and
        for tpm its prompt bound, counting ``used_tokens`` (its actual total, None if
        it was never counted: an attempt whose reserve may not have run) in the
        minute that holds ``now``."""
        for group in self._groups([], [lim.subject for lim in holding.limits]):
            script_keys: list[str] = []
            args: list[Any] = [holding.member]
            for limit in (holding.limits[j] for j in group.limits):
                if limit.kind == "parallel":
                    script_keys.append(limit.key(holding.minute))
                    args += ["zrem", 0]
                elif limit.kind == "tpm" and used_tokens is not None:
                    script_keys += [limit.key(holding.minute), limit.key(minute_of(now))]
                    args += ["take", holding.tokens, "add", used_tokens]
            if script_keys:
                await self._call("unlimit", script_keys, args)

    async def confirm(
        self,
        request_id: str,
        budgets: Sequence[Budget],
        estimate_nanos: int,
        admitted_position: int,
        admitted_at: datetime,
        nonce: str = "",
    ) -> Denied | scripts.Dup | None:
        """Make sure every counter that must hold this (committed) admission's
        reservation does — its own, and any of a newer definition that the
        registries know — or a Denied if one that lacks it cannot take it (Dup
        if another attempt under this request id holds it)."""
        for group in self._groups([b.subject for b in budgets], []):
            mine = [budgets[i] for i in group.budgets]
            verdict = await self._confirm_group(
                request_id, mine, estimate_nanos, admitted_position, admitted_at, nonce
            )
            if verdict is not None:
                return verdict
        return None

    async def _confirm_group(
        self,
        request_id: str,
        budgets: list[Budget],
        estimate_nanos: int,
        admitted_position: int,
        admitted_at: datetime,
        nonce: str,
    ) -> Denied | scripts.Dup | None:
        subjects = _subjects(budgets)
        give_up = _give_up()
        while True:
            args: list[Any] = [
                request_id,
                estimate_nanos,
                admitted_position,
                _ms(admitted_at),
                len(subjects),
                nonce,
                *(b.limit_nanos for b in budgets),
            ]
            script_keys = [
                *(keys.registry(s) for s in subjects),
                *(b.key for b in budgets),
                *(b.gen_key for b in budgets),
            ]
            reply = scripts.confirm_reply(await self._call("confirm", script_keys, args))
            if isinstance(reply, scripts.Missing):
                await self._rebuild_missing(budgets, reply, give_up)
            elif isinstance(reply, scripts.More):
                budgets += [Budget.from_registry(k, e) for k, e in reply.counters]
            elif isinstance(reply, scripts.Deny):
                return Denied(budgets[reply.index], reply.spent_nanos, reply.reserved_nanos, estimate_nanos)
            elif isinstance(reply, scripts.Dup):
                return reply
            else:
                return None
            if asyncio.get_running_loop().time() > give_up:
                raise CountersUnavailable("budget counters kept changing while confirming")

    async def _rebuild_missing(
        self, budgets: Sequence[Budget], missing: scripts.Missing, give_up: float
    ) -> None:
        """Rebuild the counters a script found missing, all at once. No retry count:
        a counter lost again while being rebuilt is rebuilt again, for as long as
        _RETRY_FOR_S."""
        if asyncio.get_running_loop().time() > give_up:
            raise CountersUnavailable("budget counters kept disappearing while being rebuilt")
        await asyncio.gather(*(self.rebuild(budgets[i]) for i in missing.indices))

    # ------------------------------------------------------------- settle

    async def settle(
        self,
        request_id: str,
        budgets: Sequence[Budget],
        *,
        actual_nanos: int,
        position: int,
        admitted_position: int,
        admitted_at: datetime,
        held: Sequence[Budget] = (),
        nonce: str = "",
        swept: bool = False,
        mark: bool = False,
    ) -> int:
        """Charge ``actual`` and give back what the request holds.

        ``budgets`` are the counters the caller knows the charge counts in (those
        in force now for the admission's window); ``held`` those it reserved on.
        Counters of a newer definition that the caller has not heard of are found
        in the registries. ``position`` is the terminal event's log position
        (committed before this call). ``held`` must only name counters the
        request is known to have held (its confirm succeeded): there, a missing
        reservation means it was settled already. Idempotent. Returns how many
        counters were charged now. ``swept``: a sweeper settling after the
        deadline, from Redis's index: if the index no longer lists this attempt,
        its settle ran already. ``mark``: the sweeper's settles leave a marker so a
        confirm from a gateway that stalled past the deadline adds nothing back.
        """
        held_keys = {b.key for b in held}
        everything = list({b.key: b for b in [*budgets, *held]}.values())
        charged = 0
        for group in self._groups([b.subject for b in everything], []):
            ordered = [everything[i] for i in group.budgets]
            subjects = _subjects(ordered)
            while True:
                flags = "".join("1" if b.key in held_keys else "0" for b in ordered)
                script_keys = [
                    *keys.open_index(group.subject),
                    *(keys.registry(s) for s in subjects),
                    *(b.key for b in ordered),
                    *(b.gen_key for b in ordered),
                ]
                args = [
                    request_id,
                    actual_nanos,
                    position,
                    admitted_position,
                    _ms(admitted_at),
                    len(subjects),
                    flags,
                    nonce,
                    position,  # the fence: later rebuilds must have read this charge
                    "1" if swept else "0",
                    "1" if mark else "0",
                ]
                reply = scripts.settle_reply(await self._call("settle", script_keys, args))
                if isinstance(reply, scripts.Settled):
                    charged += reply.charged
                    break
                known = {b.key for b in ordered}
                ordered += [Budget.from_registry(k, e) for k, e in reply.counters if k not in known]
        return charged

    async def release_orphan(self, request_id: str, counter_keys: Sequence[str], nonce: str) -> None:
        """Give back the reservation of the admission attempt ``nonce`` that never
        reached the log (and never will). Nothing is charged, nothing fans out, no
        fence moves; another attempt's reservation under the same id is left alone."""
        parsed = [(k, p.subject) for k in counter_keys if (p := keys.parse_counter(k)) is not None]
        for group in self._groups([subject for _, subject in parsed], []):
            mine = [parsed[i][0] for i in group.budgets]
            await self._call(
                "settle",
                [*keys.open_index(group.subject), *mine, *(keys.generation_of(k) for k in mine)],
                [request_id, 0, NEVER, 0, 0, 0, "1" * len(mine), nonce, 0, "0", "0"],
            )

    # ------------------------------------------------------------- read

    async def read(self, budget: Budget) -> WindowSpend:
        """The counter of ``budget``'s window, rebuilt from the log if missing."""
        give_up = asyncio.get_running_loop().time() + _RETRY_FOR_S
        while True:
            found = await self.peek(budget.key)
            if found is not None:
                return found
            if asyncio.get_running_loop().time() > give_up:
                raise CountersUnavailable("budget counter kept disappearing while reading")
            await self.rebuild(budget)

    async def peek(self, key: str) -> WindowSpend | None:
        """A counter as it is (None if missing, or from another server life): never rebuilds."""
        run, flat = await self._call("peek", [key], [""])
        values = dict(zip(flat[0::2], flat[1::2], strict=True))
        if not values or b"pos" not in values or values.get(b"run") != run:
            return None
        held = frozenset(k[2:].decode() for k in values if k.startswith(b"r:"))
        return WindowSpend(
            int(values.get(b"spent", b"0")), int(values.get(b"reserved", b"0")), int(values[b"pos"]), held
        )

    async def confirmed(
        self, request_id: str, nonce: str, admitted_position: int, budgets: Sequence[Budget]
    ) -> Literal["no", "held", "unknown"]:
        """What the counters can still tell of an admission's confirmation.

        "no": a live counter built before the admission lacks its reservation, which
        a confirm would have put there — it never went upstream. "held": every
        counter was built before the admission and has held the reservation ever
        since, so every later admission counted it. "unknown": a counter was lost
        (rebuilt from the log after the admission, or missing), so whether the
        confirm ran, and whether others were admitted into its room, is lost too."""
        field = f"r:{request_id}"
        answer: Literal["held", "unknown"] = "held"
        for budget in budgets:
            if budget.epoch > admitted_position:
                # A definition changed after the admission (an epoch is a log position):
                # every counter of it was built from a log holding the admission, so it
                # can neither lack it nor have lost it. Not evidence either way.
                continue
            run, (pos, built_in, reservation) = await self._call("peek", [budget.key], [field])
            if pos is None or built_in != run or int(pos) >= admitted_position:
                answer = "unknown"
            elif reservation is None:
                return "no"
        return answer

    async def expired(self, now: datetime, limit: int = 200) -> dict[str, tuple[str, ...]]:
        """Request ids in Redis's index whose reservation deadline has passed, each with
        the subjects whose index lists it (on a cluster, found with a SCAN of every
        master; on one Redis, none: there is one index)."""
        until = int(now.timestamp() * 1000)
        if not self.sharded:
            members = await self._redis(
                self.redis.zrangebyscore(keys.OPEN, "-inf", until, start=0, num=limit)
            )
            return {_text(m): () for m in members}
        found: dict[str, tuple[str, ...]] = {}
        async for name in self._scan(keys.OPEN_PATTERN, "zset"):
            subject = keys.subject_of(name, keys.OPEN_SUFFIX)
            if subject is None:
                continue
            members = await self._redis(
                self.redis.zrangebyscore(keys.open_index(subject)[0], "-inf", until, start=0, num=limit)
            )
            for member in members:
                found[_text(member)] = (*found.get(_text(member), ()), subject)
            if len(found) >= limit:
                break
        return found

    async def reserved_keys(
        self, request_id: str, subjects: Sequence[str] = ()
    ) -> list[tuple[str, list[str]]]:
        """The open reservations Redis's index holds for ``request_id``: (nonce, counter
        keys) per admission attempt. On a cluster, looked up in the indexes of
        ``subjects`` (where it reserved, where ``expired`` found it)."""
        where: list[str | None] = [None] if not self.sharded else list(dict.fromkeys(subjects))
        found: dict[str, list[str]] = {}
        for subject in where:
            value = await self._redis(self.redis.hget(keys.open_index(subject)[1], request_id))
            if value is not None:
                nonce, _, joined = _text(value).partition("|")
                found.setdefault(nonce, []).extend(keys.split(joined))
        return list(found.items())

    async def subjects_with_registries(self) -> list[str]:
        """Every subject that has a counter registry in Redis (every master's, on a cluster)."""
        return [
            subject
            async for name in self._scan(keys.REGISTRY_PATTERN, None)
            if (subject := keys.subject_of(name, keys.REGISTRY_SUFFIX)) is not None
        ]

    async def _scan(self, match: str, kind: str | None) -> AsyncIterator[str]:
        try:
            async for name in self.redis.scan_iter(match=match, count=1000, _type=kind):
                yield _text(name)
        except _FAILING_OVER as e:
            raise CountersUnavailable(f"Redis unavailable: {type(e).__name__}: {e}") from e

    # ------------------------------------------------------------- rebuild

    async def rebuild(self, budget: Budget) -> None:
        """Build a missing counter from the log (a no-op if it exists). Single-flight
        per key in this process; across processes, fenced by the generation token."""
        running = self._rebuilding.get(budget.key)
        if running is None or running.done():
            running = asyncio.ensure_future(self._rebuild(budget))
            self._rebuilding[budget.key] = running
            running.add_done_callback(lambda done: self._forget_rebuild(budget.key, done))
        await asyncio.shield(running)

    def _forget_rebuild(self, key: str, done: asyncio.Future[None]) -> None:
        if self._rebuilding.get(key) is done:
            del self._rebuilding[key]

    async def _rebuild(self, budget: Budget) -> None:
        give_up = asyncio.get_running_loop().time() + _RETRY_FOR_S
        async with self._rebuild_slots:
            while True:
                reply = await self._call(
                    "begin",
                    [budget.key, budget.gen_key, budget.reg_key],
                    [secrets.token_hex(8), budget.registry_entry],
                )
                token = scripts.begin_reply(reply)
                if token is None:
                    return  # built meanwhile
                state = await window_state(self.pool, budget)
                await self.hooks.rebuild_read(budget, state)
                args: list[Any] = [
                    token,
                    state.spent_nanos,
                    state.reserved_nanos,
                    state.position,
                    budget.expire_at(),
                ]
                for request_id, (nanos, nonce) in state.open.items():
                    args += [request_id, f"{nanos}|{nonce}"]
                verdict = scripts.init_reply(await self._call("init", [budget.key, budget.gen_key], args))
                if verdict != "stale":
                    if verdict == "ok":
                        self.rebuilds += 1
                    return
                if asyncio.get_running_loop().time() > give_up:
                    raise CountersUnavailable("budget counter rebuild kept being overtaken")

    # ------------------------------------------------------------- plumbing

    def _groups(self, budget_subjects: Sequence[str], limit_subjects: Sequence[str]) -> list[_Group]:
        if not budget_subjects and not limit_subjects:
            return []
        if not self.sharded:
            return [_Group(None, tuple(range(len(budget_subjects))), tuple(range(len(limit_subjects))))]
        # One fixed order (by subject) for every request, so that two requests
        # racing for the last room of two tags see them in the same order.
        return [
            _Group(
                subject,
                tuple(i for i, s in enumerate(budget_subjects) if s == subject),
                tuple(j for j, s in enumerate(limit_subjects) if s == subject),
            )
            for subject in sorted({*budget_subjects, *limit_subjects})
        ]

    async def _call(self, name: str, script_keys: list[str], args: list[Any]) -> Any:
        if not self.sharded:
            return await self._batcher.call(self._scripts[name], script_keys, args)
        # redis-py refuses EVALSHA in a cluster pipeline: each call goes on its own,
        # concurrently, over the pool of the node that owns its slot. While a master
        # is being replaced (seconds) its slots fail: try again until the replica is
        # promoted, then fail closed. A script whose reply was lost may have run:
        # reserve answers its own attempt again, confirm, begin, init and settle
        # are idempotent (as when a caller retries them on a single Redis); unlimit
        # is not (a tpm bound given back twice), so it is tried again only where
        # the node refused it before running it.
        retry_on = _REFUSED_UNRUN if name == "unlimit" else _FAILING_OVER
        give_up = asyncio.get_running_loop().time() + self.failover_wait_s
        while True:
            try:
                async with self._in_flight:
                    if not self._initialized:
                        await self._initialize()
                    return await self._scripts[name](keys=script_keys, args=args)
            except retry_on as e:
                if asyncio.get_running_loop().time() >= give_up:
                    raise CountersUnavailable(f"Redis unavailable: {type(e).__name__}: {e}") from e
                await asyncio.sleep(0.1)
            except Exception as e:  # as the batcher: whatever the driver raises is Redis failing
                raise CountersUnavailable(f"Redis script failed: {type(e).__name__}: {e}") from e

    async def _initialize(self) -> None:
        # redis-py's cluster client learns the slot map on its first command; commands
        # sent concurrently while it does can fail (a connection closed under them):
        # the first caller learns it, the others wait.
        async with self._initializing:
            if not self._initialized and isinstance(self.redis, RedisCluster):
                await self.redis.initialize()
            self._initialized = True

    async def _redis(self, command: Awaitable[Any]) -> Any:
        try:
            return await command
        except _FAILING_OVER as e:  # the sweeper's reads: its next pass tries again
            raise CountersUnavailable(f"Redis unavailable: {type(e).__name__}: {e}") from e


@dataclass(frozen=True, slots=True)
class _Group:
    """Budgets and rate limits one script call covers (indices into the caller's
    lists): all of them on a single Redis (``subject`` None), one subject's on a
    cluster, whose keys share its hash slot."""

    subject: str | None
    budgets: tuple[int, ...]
    limits: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _ReserveCall:
    request_id: str
    estimate_nanos: int
    deadline_ms: int
    nonce: str
    now_ms: int
    tokens: int
    holding: Holding | None


class _ScriptBatcher:
    """Sends every script call queued while the previous round trip was in
    flight as one pipeline: under load, one round trip serves many requests;
    a lone call goes out at once."""

    def __init__(self, client: RedisClient) -> None:
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
                        future.set_exception(CountersUnavailable(f"Redis script failed: {e}"))

    async def _send(self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            script, keys_, args, future = batch[0]
            result = await script(keys=keys_, args=args)  # loads the script if Redis lost it
            if not future.done():
                future.set_result(result)
            return
        pipe = self._client.pipeline(transaction=False)
        for script, keys_, args, _ in batch:
            pipe.evalsha(script.sha, len(keys_), *keys_, *args)
        results = await pipe.execute(raise_on_error=False)
        for (script, keys_, args, future), result in zip(batch, results, strict=True):
            if isinstance(result, redis_errors.NoScriptError):
                result = await script(keys=keys_, args=args)  # SCRIPT FLUSH or restart
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(CountersUnavailable(f"Redis script failed: {result}"))
            else:
                future.set_result(result)


def connect_redis(
    url: str, *, max_connections: int = 64, timeout_s: float = 3.0, cluster: bool = False
) -> RedisClient:
    """A client whose pool blocks (up to ``timeout_s``) when all connections are
    busy, instead of failing: bursts queue rather than error. ``cluster``: ``url``
    names any node of a Redis Cluster, whose slot map the client then follows."""
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns (and closes) its pool


def _subjects(budgets: Sequence[Budget]) -> list[str]:
    return list(dict.fromkeys(b.subject for b in budgets))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
