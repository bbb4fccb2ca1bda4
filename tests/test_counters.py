"""Budget counters in a real Redis, rebuilt from a real PostgreSQL log.

One test per reproduction of issue 10: each one failed on the counters before
the redesign (the number it reproduced is in its docstring) and must pass now.
Several "gateways" are separate stacks (own pool, own Redis client, own budget
book) over the same PostgreSQL and Redis; races are driven by hooks, not sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from ledger import events as ev
from ledger.admission import Admission, AdmissionHooks, Admitted, BudgetExceeded, DuplicateRequest
from ledger.budgets import BudgetBook, rebuild_missing
from ledger.counters import Budget, CounterHooks, Counters, CountersUnavailable, RedisClient, connect_redis
from ledger.counters.log import WindowState, window_state
from ledger.domain.money import to_nanos
from ledger.errors import StoreUnavailable
from ledger.postgres.store import EventStore
from ledger.run.embedded import EmbeddedRedis
from ledger.settings import Settings
from ledger.tags import TagService
from projections.budgets import BudgetWindows
from projections.runtime import Worker
from projections.verify import Report, verify_counters, verify_projection

# A Wednesday ahead of the real clock (Redis prunes what its own clock says has ended).
_today = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
WED = _today + timedelta(days=9 - _today.weekday())


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Gate(AdmissionHooks, CounterHooks):
    """Hooks that hold chosen requests (or rebuilds) until released."""

    def __init__(self) -> None:
        self.hold: dict[str, asyncio.Event] = {}
        self.reached: dict[str, asyncio.Event] = {}

    def block(self, name: str) -> None:
        self.hold[name] = asyncio.Event()
        self.reached[name] = asyncio.Event()

    async def wait_reached(self, name: str) -> None:
        await asyncio.wait_for(self.reached[name].wait(), 10)

    def release(self, name: str) -> None:
        self.hold[name].set()

    async def _point(self, name: str) -> None:
        if name in self.hold:
            self.reached[name].set()
            await self.hold[name].wait()

    async def after_reserve(self, request_id: str) -> None:
        await self._point(f"reserved:{request_id}")

    async def after_append(self, request_id: str) -> None:
        await self._point(f"appended:{request_id}")

    async def rebuild_read(self, budget: Budget, state: WindowState) -> None:
        await self._point(f"rebuild:{budget.name}")


@dataclasses.dataclass
class Gateway:
    store: EventStore
    client: RedisClient
    counters: Counters
    book: BudgetBook
    admission: Admission
    tags: TagService
    gate: Gate

    async def close(self) -> None:
        await self.admission.drain(2)
        await self.counters.close()
        await self.client.aclose()
        await self.store.close()

    async def refresh(self) -> None:
        await self.book.refresh()

    def budget(self, tag: str) -> Budget:
        [budget] = self.book.budgets_for([tag], self.admission.now())
        return budget

    async def counter(self, tag: str) -> tuple[int, int]:
        found = await self.counters.peek(self.budget(tag).key)
        assert found is not None
        return found.spent_nanos, found.reserved_nanos

    async def log(self, tag: str) -> WindowState:
        return await window_state(self.store.pool, self.budget(tag))

    async def spend(
        self, request_id: str, tags: list[str], estimate: str, cost: str | None = None
    ) -> Admitted:
        admitted = await self.admission.admit(request_id, tags, Decimal(estimate))
        assert isinstance(admitted, Admitted), admitted
        await self.admission.record_spend(admitted, Decimal(cost or estimate))
        return admitted


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def gateways(database_url: str, redis_url: str) -> AsyncIterator[GatewayFactory]:
    made: list[Gateway] = []

    async def make(clock: Clock | None = None, **kw: Any) -> Gateway:
        store = await EventStore.open(Settings.from_dsn(database_url, pool_max_size=kw.pop("pool", 8)))
        url, timeout = kw.pop("redis_url", redis_url), kw.pop("redis_timeout", 1)
        client = connect_redis(url, timeout_s=timeout, cluster=kw.pop("cluster", False))
        gate = Gate()
        counters = Counters(client, store.pool, hooks=gate)
        book = BudgetBook(store)
        await book.refresh()
        admission = Admission(
            store,
            counters,
            book,
            clock=clock,
            hooks=gate,
            reservation_ttl=kw.pop("ttl", timedelta(seconds=60)),
            **kw,
        )
        gw = Gateway(store, client, counters, book, admission, TagService(store, clock=clock), gate)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        with contextlib.suppress(Exception):
            await gw.close()


@pytest.fixture
async def flush(redis_url: str) -> AsyncIterator[Callable[[], Any]]:
    client = aioredis.Redis.from_url(redis_url)

    async def flushall() -> None:
        await client.flushdb()

    yield flushall
    await client.aclose()


async def with_budget(gw: Gateway, tag: str, usd: str, duration: str | None = "1d") -> None:
    await gw.tags.create(tag, ev.TagFields(max_budget=Decimal(usd), budget_duration=duration))
    await gw.refresh()


async def verified(gw: Gateway) -> Report:
    """Counters equal the log (and the budget window view equals a replay)."""
    report = Report()
    assert gw.store.dsn is not None
    await verify_projection(gw.store.dsn, BudgetWindows(), report)
    await verify_counters(gw.counters, report, gw.admission.now())
    assert report.ok, [f"{d.where}: {d.detail}" for d in report.drifts]
    return report


async def charged(store: EventStore, tag: str) -> Decimal:
    total = Decimal(0)
    for r in await store.read_types(list(ev.CHARGING_TYPES), 0, 100_000):
        e = ev.decode(r)
        assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
        if tag in e.budget_tags:
            total += e.cost
    return total


# ------------------------------------------------------------------ item 1


async def test_a_rebuild_on_a_live_system_never_drops_an_uncommitted_reservation(
    gateways: GatewayFactory,
) -> None:
    """Item 1: rebuilding while a request had reserved but not yet committed made
    the counter go negative and let $1.20 through on a $1 budget."""
    gw = await gateways()
    await with_budget(gw, "t", "1")
    gw.gate.block("reserved:a")
    first = asyncio.create_task(gw.admission.admit("a", ["t"], Decimal("0.4")))
    await gw.gate.wait_reached("reserved:a")
    # what `ledger counters rebuild` and the allow-policy reconcile did: now a no-op
    assert await rebuild_missing(gw.book, gw.counters, gw.admission.now()) == 0
    assert await gw.counter("t") == (0, to_nanos(Decimal("0.4")))
    gw.gate.release("reserved:a")
    a = await first
    assert isinstance(a, Admitted)
    await gw.admission.record_spend(a, Decimal("0.4"))
    await gw.spend("b", ["t"], "0.4")
    assert isinstance(await gw.admission.admit("c", ["t"], Decimal("0.4")), BudgetExceeded)
    assert await charged(gw.store, "t") == Decimal("0.8")
    await verified(gw)


async def test_a_counter_flushed_between_reserve_and_commit_gets_the_reservation_back(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """Item 1 (Redis lost): a counter rebuilt before an admission commits does not
    hold it; the admission's confirm puts it back, or refuses it if no room is left."""
    g1, g2 = await gateways(), await gateways()
    await with_budget(g1, "t", "1")
    await g2.refresh()
    g1.gate.block("reserved:a")
    first = asyncio.create_task(g1.admission.admit("a", ["t"], Decimal("0.4")))
    await g1.gate.wait_reached("reserved:a")
    await flush()
    b = await g2.admission.admit("b", ["t"], Decimal("0.4"))  # rebuilds without a
    c = await g2.admission.admit("c", ["t"], Decimal("0.4"))
    assert isinstance(b, Admitted)
    assert isinstance(c, Admitted)
    g1.gate.release("reserved:a")
    a = await first
    assert isinstance(a, BudgetExceeded)  # 0.8 + 0.4 > 1: refused before going upstream
    [_, released] = await g1.store.read_stream("request:a")
    assert released.type == "RequestReleased"
    assert "budget_recheck" in released.data
    assert await g1.counter("t") == (0, to_nanos(Decimal("0.8")))
    await g2.admission.record_spend(b, Decimal("0.4"))
    await g2.admission.record_spend(c, Decimal("0.4"))
    await verified(g1)


# ------------------------------------------------------------------ item 2


async def test_a_stale_rebuild_never_lands_after_the_counter_was_lost_again(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """Item 2: gateway 1 read the log, gateway 2 rebuilt and settled 0.5, the key was
    lost again, then gateway 1's old answer was written: $1.40 on a $1 budget."""
    g1, g2 = await gateways(), await gateways()
    await with_budget(g1, "t", "1")
    await g2.refresh()
    g1.gate.block("rebuild:t")
    slow = asyncio.create_task(g1.counters.read(g1.budget("t")))
    await g1.gate.wait_reached("rebuild:t")  # it read the log: nothing charged yet
    await g2.spend("x", ["t"], "0.5")
    await flush()
    g1.gate.release("rebuild:t")
    await slow
    assert await g1.counter("t") == (to_nanos(Decimal("0.5")), 0)
    assert isinstance(await g1.admission.admit("y", ["t"], Decimal("0.6")), BudgetExceeded)
    await verified(g1)


async def test_a_rebuild_that_read_the_log_before_a_settle_on_a_missing_counter_retries(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """The same race without a second loss: the rebuild saw the request open, the
    request settled while the counter was missing, and the rebuild would have
    written a reservation nobody would ever settle."""
    g1, g2 = await gateways(), await gateways()
    await with_budget(g1, "t", "1")
    await g2.refresh()
    x = await g2.admission.admit("x", ["t"], Decimal("0.5"))
    assert isinstance(x, Admitted)
    await flush()
    g1.gate.block("rebuild:t")
    slow = asyncio.create_task(g1.counters.read(g1.budget("t")))
    await g1.gate.wait_reached("rebuild:t")  # read: x open, 0.5 reserved
    await g2.admission.record_spend(x, Decimal("0.3"))  # settles on a missing counter
    g1.gate.release("rebuild:t")
    spend = await slow
    assert (spend.spent_nanos, spend.reserved_nanos) == (to_nanos(Decimal("0.3")), 0)
    await verified(g1)


# ------------------------------------------------------------------ item 4


async def test_a_window_boundary_rebuilds_each_counter_once_without_exhausting_the_pool(
    gateways: GatewayFactory,
) -> None:
    """Item 4: 50 concurrent first requests of a new window ran 50 full-log rebuilds,
    took the whole pool and 20 failed with StoreUnavailable."""
    clock = Clock(WED)
    gw = await gateways(clock, pool=4)
    for i in range(10):
        await with_budget(gw, f"t{i}", "100")
    for i in range(30):  # some history in the log
        await gw.spend(f"old{i}", [f"t{i % 10}"], "0.01")
    clock.now = WED.replace(hour=0) + timedelta(days=1)  # the next day: a new window for all
    before = gw.counters.rebuilds
    results = await asyncio.gather(
        *(
            gw.admission.admit(f"new{i}", [f"t{i % 10}", f"t{(i + 3) % 10}"], Decimal("0.01"))
            for i in range(50)
        )
    )
    assert all(isinstance(r, Admitted) for r in results)
    assert gw.counters.rebuilds - before == 10  # one per counter, however many requests asked
    for r in results:
        assert isinstance(r, Admitted)
        await gw.admission.record_spend(r, Decimal("0.005"))
    await verified(gw)


# ------------------------------------------------------------------ item 5


async def test_windows_are_about_time_not_definitions(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """Item 5: 1d -> 7d -> 1d on one day let $1.30 through a $1 daily budget (the old
    1d counter missed what was charged under 7d), and the decision depended on
    whether Redis had been flushed."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "1", "1d")
    await gw.spend("a", ["t"], "0.5")
    clock.now += timedelta(minutes=1)
    await gw.tags.update("t", ev.TagFields(budget_duration="7d"))
    await gw.refresh()
    await gw.spend("b", ["t"], "0.5")
    clock.now += timedelta(minutes=1)
    await gw.tags.update("t", ev.TagFields(budget_duration="1d"))
    await gw.refresh()
    assert isinstance(await gw.admission.admit("c", ["t"], Decimal("0.3")), BudgetExceeded)
    await flush()
    assert isinstance(await gw.admission.admit("d", ["t"], Decimal("0.3")), BudgetExceeded)
    await verified(gw)


async def test_a_request_in_flight_across_a_definition_change_settles_on_both_counters(
    gateways: GatewayFactory,
) -> None:
    """Item 5: a request admitted under 1d and settled under 7d left its estimate
    reserved on the new counter all week."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "1", "1d")
    inflight = await gw.admission.admit("r", ["t"], Decimal("0.3"))
    assert isinstance(inflight, Admitted)
    clock.now += timedelta(minutes=1)
    await gw.tags.update("t", ev.TagFields(budget_duration="7d"))
    await gw.refresh()
    other = await gw.admission.admit("s", ["t"], Decimal("0.1"))  # builds the 7d counter: r is open in it
    assert isinstance(other, Admitted)
    assert await gw.counter("t") == (0, to_nanos(Decimal("0.4")))
    await gw.admission.record_spend(inflight, Decimal("0.2"))
    await gw.admission.record_spend(other, Decimal("0.1"))
    assert await gw.counter("t") == (to_nanos(Decimal("0.3")), 0)
    await verified(gw)


async def test_a_lowered_budget_denies_and_a_deleted_one_no_longer_applies(gateways: GatewayFactory) -> None:
    gw = await gateways()
    await with_budget(gw, "t", "1")
    await gw.spend("a", ["t"], "0.5")
    await gw.tags.update("t", ev.TagFields(max_budget=Decimal("0.4")))  # below what is spent
    await gw.refresh()
    denied = await gw.admission.admit("b", ["t"], Decimal("0.01"))
    assert isinstance(denied, BudgetExceeded)
    assert (denied.spent, denied.limit) == (Decimal("0.5"), Decimal("0.4"))
    await gw.tags.delete("t")
    await gw.refresh()
    free = await gw.admission.admit("c", ["t"], Decimal("5"))
    assert isinstance(free, Admitted)
    assert free.budgets == ()
    # re-created in the same window: what was charged while it had a budget still counts
    await gw.admission.record_spend(free, Decimal("5"))
    await with_budget(gw, "t", "1")
    assert isinstance(await gw.admission.admit("d", ["t"], Decimal("0.6")), BudgetExceeded)
    assert isinstance(await gw.admission.admit("e", ["t"], Decimal("0.5")), Admitted)
    await verified(gw)


# ------------------------------------------------------------------ item 6


async def test_reservations_are_found_in_the_log_after_redis_lost_them(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """Item 6: the sweep index lived only in Redis: after a FLUSHALL, a gateway that
    died left its request never swept, its estimate reserved until the window ended."""
    clock = Clock(WED)
    dead, survivor = await gateways(clock), await gateways(clock)
    await with_budget(dead, "t", "1", None)  # a lifetime budget: its window never ends
    await survivor.refresh()
    orphan = await dead.admission.admit("o", ["t"], Decimal("0.25"))
    assert isinstance(orphan, Admitted)
    await flush()
    await dead.close()  # it never settles
    clock.now += timedelta(seconds=61)
    report = await survivor.admission.sweep()
    assert report.expired == 1
    [_, expired] = await survivor.store.read_stream("request:o")
    assert expired.type == "ReservationExpired"
    # the counter is rebuilt with the charge, and nothing reserved
    assert (await survivor.counters.read(survivor.budget("t"))).reserved_nanos == 0
    assert await survivor.counter("t") == (to_nanos(Decimal("0.25")), 0)
    assert (await survivor.admission.sweep()).expired == 0  # once
    await verified(survivor)


async def test_a_gateway_dead_before_its_confirm_is_charged_only_the_room_redis_forgot(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """A request reserved, Redis lost the counter, two others were admitted into its
    room, its admission committed, and its gateway died before the confirm (which
    would have refused it). Redis is lost again: the rebuilt counter holds it from
    the log, so whether it was confirmed is unknown. Charging its estimate made
    $1.20 on a $1 budget (schedule seed 327); it is charged the room left."""
    clock = Clock(WED)
    dead, survivor = await gateways(clock), await gateways(clock)
    await with_budget(dead, "t", "1")
    await survivor.refresh()
    dead.gate.block("reserved:a")
    dead.gate.block("appended:a")
    task = asyncio.create_task(dead.admission.admit("a", ["t"], Decimal("0.4")))
    await dead.gate.wait_reached("reserved:a")
    await flush()
    b = await survivor.admission.admit("b", ["t"], Decimal("0.4"))  # rebuilt without a
    c = await survivor.admission.admit("c", ["t"], Decimal("0.4"))
    assert isinstance(b, Admitted)
    assert isinstance(c, Admitted)
    dead.gate.release("reserved:a")
    await dead.gate.wait_reached("appended:a")  # committed, not confirmed
    dead.admission._spawn = lambda work: work.close()  # type: ignore[method-assign]  # SIGKILL
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await flush()  # the next counter is built from a log that holds a
    await survivor.admission.record_spend(b, Decimal("0.4"))
    await survivor.admission.record_spend(c, Decimal("0.4"))
    clock.now += timedelta(seconds=61)
    assert (await survivor.admission.sweep()).expired == 1
    [_, expired] = await survivor.store.read_stream("request:a")
    event = ev.decode(expired)
    assert isinstance(event, ev.ReservationExpired)
    assert (event.cost, event.estimate) == (Decimal("0.2"), Decimal("0.4"))
    assert await charged(survivor.store, "t") == Decimal("1.0")
    rebuilt = await survivor.counters.read(survivor.budget("t"))
    assert (rebuilt.spent_nanos, rebuilt.reserved_nanos) == (to_nanos(Decimal("1")), 0)
    await verified(survivor)


async def test_an_expired_reservation_redis_held_throughout_is_charged_in_full(
    gateways: GatewayFactory,
) -> None:
    """The cap applies only where Redis lost the answer: a counter that held the
    reservation since its reserve proves every later admission counted it."""
    clock = Clock(WED)
    dead, survivor = await gateways(clock), await gateways(clock)
    await with_budget(dead, "t", "1")
    await survivor.refresh()
    dead.gate.block("appended:a")
    task = asyncio.create_task(dead.admission.admit("a", ["t"], Decimal("0.4")))
    await dead.gate.wait_reached("appended:a")
    dead.admission._spawn = lambda work: work.close()  # type: ignore[method-assign]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await survivor.spend("b", ["t"], "0.6")
    clock.now += timedelta(seconds=61)
    assert (await survivor.admission.sweep()).expired == 1
    [_, expired] = await survivor.store.read_stream("request:a")
    event = ev.decode(expired)
    assert isinstance(event, ev.ReservationExpired)
    assert (event.cost, event.estimate) == (Decimal("0.4"), None)
    await verified(survivor)


@pytest.mark.parametrize("redis_lost", [False, True])
async def test_a_confirmed_admission_is_charged_in_full_after_a_spend_reset(
    gateways: GatewayFactory, flush: Callable[[], Any], redis_lost: bool
) -> None:
    """Confirmed (its counter held it throughout), then the tag's spend was reset
    and its gateway died. The reset's counter is of a newer epoch, built after the
    admission: that is no loss of Redis, and the reset window does not count this
    charge at all. The cap computed on it charged $0.10 of a $0.60 request; and
    when Redis did lose the answer, that window still leaves no reason to cap."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "1")
    a = await gw.admission.admit("a", ["t"], Decimal("0.6"))
    assert isinstance(a, Admitted)
    assert a.reserved  # confirmed: it went upstream; its gateway dies before settling
    clock.now += timedelta(seconds=30)
    await gw.tags.update("t", ev.TagFields(), spend=Decimal(0))
    await gw.refresh()
    clock.now += timedelta(seconds=20)
    assert isinstance(await gw.admission.admit("b", ["t"], Decimal("0.9")), Admitted)
    clock.now += timedelta(seconds=11)  # a is past its deadline, b is not
    if redis_lost:
        await flush()
    assert (await gw.admission.sweep()).expired == 1
    [_, expired] = await gw.store.read_stream("request:a")
    event = ev.decode(expired)
    assert isinstance(event, ev.ReservationExpired)
    assert (event.cost, event.estimate) == (Decimal("0.6"), None)


async def test_a_confirmed_admission_is_charged_in_full_after_its_windows_changed(
    gateways: GatewayFactory,
) -> None:
    """Confirmed under $1 a day; then the tag became $0.50 a week (a new epoch) and
    its gateway died. Lowering max_budget alone charges it in full (the counter
    still says held); a changed duration must not turn that into a cap ($0.50)."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "1")
    a = await gw.admission.admit("a", ["t"], Decimal("0.6"))
    assert isinstance(a, Admitted)
    assert a.reserved
    clock.now += timedelta(seconds=10)
    await gw.tags.update("t", ev.TagFields(budget_duration="7d", max_budget=Decimal("0.5")))
    await gw.refresh()
    clock.now += timedelta(seconds=51)
    assert (await gw.admission.sweep()).expired == 1
    [_, expired] = await gw.store.read_stream("request:a")
    event = ev.decode(expired)
    assert isinstance(event, ev.ReservationExpired)
    assert (event.cost, event.estimate) == (Decimal("0.6"), None)


async def test_a_reservation_that_never_reached_the_log_is_given_back(gateways: GatewayFactory) -> None:
    clock = Clock(WED)
    dead, survivor = await gateways(clock), await gateways(clock)
    await with_budget(dead, "t", "1")
    await survivor.refresh()
    # what a process does before it dies between its reserve and its append
    await dead.counters.reserve(
        "o", [dead.budget("t")], to_nanos(Decimal("0.25")), WED + timedelta(seconds=60)
    )
    assert await survivor.counter("t") == (0, to_nanos(Decimal("0.25")))
    clock.now += timedelta(seconds=59)
    assert (await survivor.admission.sweep()).dropped == 0  # not before its deadline
    clock.now += timedelta(seconds=2)
    assert (await survivor.admission.sweep()).dropped == 1
    assert await survivor.counter("t") == (0, 0)
    assert await survivor.store.read_stream("request:o") == []


async def test_a_cancelled_admission_never_leaves_a_phantom(gateways: GatewayFactory) -> None:
    """Item 6: an admit cancelled after its append was queued released Redis while
    the writer still committed the event: counter 0 vs log 0.3."""
    gw = await gateways()
    await with_budget(gw, "t", "1")
    gw.gate.block("appended:a")
    task = asyncio.create_task(gw.admission.admit("a", ["t"], Decimal("0.3")))
    await gw.gate.wait_reached("appended:a")  # committed
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await gw.admission.drain()
    [admitted, released] = await gw.store.read_stream("request:a")
    assert (admitted.type, released.type) == ("RequestAdmitted", "RequestReleased")
    assert await gw.counter("t") == (0, 0)
    # cancelled before the writer took it: never written, nothing held
    gw.gate.block("reserved:b")
    task = asyncio.create_task(gw.admission.admit("b", ["t"], Decimal("0.3")))
    await gw.gate.wait_reached("reserved:b")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await gw.admission.drain()
    assert await gw.store.read_stream("request:b") == []
    assert await gw.counter("t") == (0, 0)
    await verified(gw)


async def test_admissions_while_redis_is_down_are_reconciled_and_swept(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    """Item 6: allow-policy admissions never entered the sweep index; settles that
    failed while Redis was down were lost."""
    clock = Clock(WED)
    with EmbeddedRedis(tmp_path / "redis") as redis_server:
        gw = await gateways(clock, on_redis_down="allow", redis_url=redis_server.url)
        await with_budget(gw, "t", "1")
        await gw.counters.read(gw.budget("t"))
        port = redis_server.port
        redis_server.stop()  # a restart: everything in Redis is gone
        finished = await gw.admission.admit("done", ["t"], Decimal("0.2"))
        lost = await gw.admission.admit("lost", ["t"], Decimal("0.3"))
        assert isinstance(finished, Admitted)
        assert isinstance(lost, Admitted)
        assert not finished.reserved
        with pytest.raises(CountersUnavailable):
            await gw.admission.record_spend(finished, Decimal("0.1"))  # recorded; the settle fails
        assert set(gw.admission.unreconciled) == {"done", "lost"}
        redis_server.preferred_port = port
        redis_server.start()
        assert await gw.admission.reconcile() == 0
        assert await gw.counter("t") == (to_nanos(Decimal("0.1")), to_nanos(Decimal("0.3")))
        clock.now += timedelta(seconds=61)  # "lost" never finishes: swept from the log
        assert (await gw.admission.sweep()).expired == 1
        assert await gw.counter("t") == (to_nanos(Decimal("0.4")), 0)
        await verified(gw)
        await gw.close()


# ------------------------------------------------------------------ item 7


async def test_sweeping_charges_once_and_one_bad_item_does_not_stop_a_pass(gateways: GatewayFactory) -> None:
    """Item 7: past the marker's TTL a sweep charged the estimate and left it reserved,
    on every pass; and one item that raised aborted the whole pass."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "1")
    for i in range(3):
        assert isinstance(await gw.admission.admit(f"o{i}", ["t"], Decimal("0.1")), Admitted)
    # an admission the sweeper cannot decode (written by a broken writer)
    await gw.store.append(
        "request:bad",
        0,
        [
            ev.NewEvent(
                "RequestAdmitted",
                b'{"request_id":"bad","at":"2026-11-25T09:00:00Z","estimate":"1",'
                b'"deadline":"2026-11-25T09:00:01Z","windows":"not a list"}',
            )
        ],
    )
    clock.now += timedelta(hours=2)
    first = await gw.admission.sweep()
    assert (first.expired, first.failed) == (3, 1)
    for _ in range(3):
        again = await gw.admission.sweep()
        assert (again.expired, again.settled) == (0, 0)
    assert await gw.counter("t") == (to_nanos(Decimal("0.3")), 0)


# ------------------------------------------------------------------ item 8


async def test_a_request_with_many_budgeted_tags_in_a_fresh_window_is_admitted(
    gateways: GatewayFactory,
) -> None:
    """Item 8: reserve gave up after 5 rebuild retries: 6 budgeted tags were a 503."""
    gw = await gateways()
    names = [f"t{i}" for i in range(12)]
    for n in names:
        await with_budget(gw, n, "1")
    admitted = await gw.admission.admit("many", names, Decimal("0.1"))
    assert isinstance(admitted, Admitted)
    assert len(admitted.budgets) == 12
    await gw.admission.record_spend(admitted, Decimal("0.05"))
    await verified(gw)


# ------------------------------------------------------------------ item 9


class FailsOnce(BudgetWindows):
    """Applies a batch (changing its memory), then fails it once."""

    failed = False

    async def apply(self, conn: asyncpg.Connection, events: Any, tables: Any) -> None:
        await super().apply(conn, events, tables)
        if not self.failed and any(e.type == "TagUpdated" for e in events):
            self.failed = True
            raise RuntimeError("the database went away mid-batch")


async def test_a_failed_projection_batch_reloads_its_memory(gateways: GatewayFactory) -> None:
    """Item 9: in-memory definitions changed before a failed write; the retry booked
    charges in the wrong window row."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "10", "1d")
    await gw.spend("a", ["t"], "0.5")
    await gw.tags.update("t", ev.TagFields(budget_duration="7d"))
    await gw.refresh()
    await gw.spend("b", ["t"], "0.25")
    projection = FailsOnce()
    worker = Worker(gw.store, projection)
    assert gw.store.dsn is not None
    conn = await asyncpg.connect(gw.store.dsn)
    try:
        await conn.execute("insert into projection_checkpoints (name) values ('budget_windows')")
        with pytest.raises(RuntimeError):
            await worker.step(conn)
        assert projection.failed
        while await worker.step(conn):
            pass
        spend = await conn.fetchval(
            "select spend from budget_window_spend where subject = 'tag:t' and window_end - window_start = "
            "interval '7 days'"
        )
    finally:
        await conn.close()
    assert spend == Decimal("0.75")  # the week holds both, once each
    await verified(gw)


# ------------------------------------------------------------------ item 10


async def test_values_at_their_largest_are_applied_by_every_view(gateways: GatewayFactory) -> None:
    """Item 10: prompt_tokens >= 2^31 stalled spend_logs forever; costs near 2^63
    nano-USD overflowed the counters."""
    from projections.spend import SpendLogs, SpendRollups

    gw = await gateways()
    await with_budget(gw, "t", "1000000000")  # the largest budget accepted
    a = await gw.admission.admit("huge", ["t"], Decimal("999999999"))
    assert isinstance(a, Admitted)
    await gw.admission.record_spend(
        a, Decimal("999999999.123456789"), prompt_tokens=10**12, completion_tokens=10**12, model="m" * 256
    )
    assert gw.store.dsn is not None
    report = Report()
    for projection in (SpendLogs(), SpendRollups(), BudgetWindows()):
        await verify_projection(gw.store.dsn, projection, report)  # builds every view from the log
    assert report.ok
    assert await gw.counter("t") == (to_nanos(Decimal("999999999.123456789")), 0)


# ------------------------------------------------------------------ item 11


async def test_a_request_refused_because_the_store_was_down_can_be_retried(gateways: GatewayFactory) -> None:
    """Item 11: the 503 said 'nothing was recorded, retry' and the retry got a 409 for
    three days (a settled marker was left in Redis)."""
    down, up = await gateways(), await gateways()
    await with_budget(up, "t", "1")
    await down.refresh()
    await down.store.close()  # PostgreSQL unreachable for this gateway
    with pytest.raises(Exception, match="closed"):
        await down.admission.admit("retry-me", ["t"], Decimal("0.1"))
    await down.admission.drain()
    retried = await up.admission.admit("retry-me", ["t"], Decimal("0.1"))
    assert isinstance(retried, Admitted)
    await up.admission.record_spend(retried, Decimal("0.1"))
    with pytest.raises(DuplicateRequest, match="was charged"):
        await up.admission.admit("retry-me", ["t"], Decimal("0.1"))
    await verified(up)


def test_the_reservation_must_outlast_the_longest_request() -> None:
    """Item 11: the upstream total timeout equalled the reservation TTL, so a long
    request could be swept while it ran."""
    from ledger.errors import SettingsError

    with pytest.raises(SettingsError, match="RESERVATION_TTL_S"):
        Settings.from_env({"LEDGER_RESERVATION_TTL_S": "600", "LEDGER_UPSTREAM_TOTAL_TIMEOUT_S": "600"})
    settings = Settings.from_env({})
    assert settings.reservation_ttl_s >= settings.upstream_total_timeout_s + 2 * settings.append_timeout_s


# ------------------------------------------------------------------ windows


async def test_a_settle_across_a_window_boundary_counts_in_the_admission_window(
    gateways: GatewayFactory,
) -> None:
    clock = Clock(WED.replace(hour=23, minute=59, second=59))
    gw = await gateways(clock)
    await with_budget(gw, "t", "1", "1d")
    late = await gw.admission.admit("late", ["t"], Decimal("0.5"))
    assert isinstance(late, Admitted)
    yesterday = gw.budget("t")
    clock.now += timedelta(seconds=2)  # the next day
    assert isinstance(await gw.admission.admit("early", ["t"], Decimal("0.9")), Admitted)
    await gw.admission.record_spend(late, Decimal("0.4"))
    old = await gw.counters.peek(yesterday.key)
    assert old is not None
    assert (old.spent_nanos, old.reserved_nanos) == (to_nanos(Decimal("0.4")), 0)
    assert await gw.counter("t") == (0, to_nanos(Decimal("0.9")))
    await verified(gw)


async def test_concurrent_reserves_from_four_gateways_admit_exactly_what_fits(
    gateways: GatewayFactory,
) -> None:
    """Four gateways' admission paths in this one process, each with its own Redis
    client and connection pool (four real processes: tests/faults/test_overshoot.py)."""
    gws = [await gateways() for _ in range(4)]
    await with_budget(gws[0], "t", "1")
    for g in gws[1:]:
        await g.refresh()
    results = await asyncio.gather(
        *(
            g.admission.admit(f"r{i}-{j}", ["t"], Decimal("0.03"))
            for j, g in enumerate(gws)
            for i in range(125)
        )
    )
    admitted = [r for r in results if isinstance(r, Admitted)]
    assert len(admitted) == 33  # floor(1 / 0.03): exact, never one more
    assert await gws[0].counter("t") == (0, 33 * to_nanos(Decimal("0.03")))
    await verified(gws[0])


# ------------------------------------------------------------------ review findings
# A hostile review of the redesign reproduced each of these against real services;
# each test below failed then.


def _redis_at(directory: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        with contextlib.suppress(Exception):
            if redis.Redis(port=port).ping():
                return proc
        time.sleep(0.05)
    raise AssertionError("redis-server did not start")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH")
async def test_a_redis_restored_from_its_snapshot_never_overshoots(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    """Finding 1: Redis restarted from an RDB snapshot (default redis.conf saves them)
    brought back a counter missing the last settles: $1.30 on a $1 budget."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _redis_at(tmp_path, port)
    try:
        gw = await gateways(redis_url=f"redis://127.0.0.1:{port}/0")
        await with_budget(gw, "t", "1")
        await gw.spend("a", ["t"], "0.5")
        redis.Redis(port=port).save()
        await gw.spend("b", ["t"], "0.4")  # settled after the snapshot
        proc.kill()
        proc.wait()
        proc = _redis_at(tmp_path, port)  # loads dump.rdb: the counter says 0.5
        for _ in range(5):  # the pool's old sockets fail once each
            with contextlib.suppress(CountersUnavailable):
                outcome = await gw.admission.admit("c", ["t"], Decimal("0.4"))
                break
        assert isinstance(outcome, BudgetExceeded)
        assert outcome.spent == Decimal("0.9")
        await verified(gw)
    finally:
        proc.kill()
        proc.wait()


async def test_a_refusal_on_recheck_is_released_even_when_the_first_release_fails(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """Finding 5: a budget_recheck refusal whose release failed was later charged its
    estimate by the sweeper on a window with no room, and the counter missed it."""
    clock = Clock(WED)
    g1, g2 = await gateways(clock), await gateways(clock)
    await with_budget(g1, "t", "1")
    await g2.refresh()
    g1.gate.block("reserved:a")
    first = asyncio.create_task(g1.admission.admit("a", ["t"], Decimal("0.4")))
    await g1.gate.wait_reached("reserved:a")
    await flush()  # lost between reserve and commit
    b = await g2.admission.admit("b", ["t"], Decimal("0.4"))
    c = await g2.admission.admit("c", ["t"], Decimal("0.4"))
    assert isinstance(b, Admitted)
    assert isinstance(c, Admitted)
    g1.gate.block("appended:a")
    g1.gate.release("reserved:a")
    await g1.gate.wait_reached("appended:a")
    real_append = g1.store.append
    failures = 2

    async def flaky(*args: Any, **kw: Any) -> Any:  # PostgreSQL away for two appends
        nonlocal failures
        if failures:
            failures -= 1
            raise StoreUnavailable("PostgreSQL went away")
        return await real_append(*args, **kw)

    g1.store.append = flaky  # type: ignore[method-assign]
    g1.gate.release("appended:a")
    with contextlib.suppress(StoreUnavailable):
        assert isinstance(await first, BudgetExceeded)
    await g1.admission.drain()
    [_, released] = await g1.store.read_stream("request:a")
    assert released.type == "RequestReleased"
    await g2.admission.record_spend(b, Decimal("0.4"))
    await g2.admission.record_spend(c, Decimal("0.4"))
    clock.now += timedelta(seconds=61)
    await g2.admission.sweep()
    assert await charged(g2.store, "t") == Decimal("0.8")
    await verified(g2)


async def test_allow_policy_a_confirm_that_times_out_is_settled_as_never_held(
    gateways: GatewayFactory, flush: Callable[[], Any], redis_url: str
) -> None:
    """Finding 8: under allow, a confirm that timed out after a rebuild left the
    admission marked as held; its settle charged nothing: drift 0.4 and $1.30 on $1."""
    clock = Clock(WED)
    g1 = await gateways(clock, on_redis_down="allow")
    g2 = await gateways(clock)
    await with_budget(g1, "t", "1")
    await g2.refresh()
    g1.gate.block("reserved:a")
    first = asyncio.create_task(g1.admission.admit("a", ["t"], Decimal("0.4")))
    await g1.gate.wait_reached("reserved:a")
    await flush()
    b = await g2.admission.admit("b", ["t"], Decimal("0.3"))  # rebuilds without a
    assert isinstance(b, Admitted)
    g1.gate.block("appended:a")
    g1.gate.release("reserved:a")
    await g1.gate.wait_reached("appended:a")
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command("CLIENT", "PAUSE", "2500", "WRITE")  # a Redis stall
    g1.gate.release("appended:a")
    a = await first
    assert isinstance(a, Admitted)
    assert not a.reserved
    await asyncio.sleep(2.7)
    await admin.aclose()
    await g1.admission.record_spend(a, Decimal("0.4"))
    await g2.admission.record_spend(b, Decimal("0.3"))
    assert await g2.counter("t") == (to_nanos(Decimal("0.7")), 0)
    assert isinstance(await g2.admission.admit("d", ["t"], Decimal("0.6")), BudgetExceeded)
    await verified(g2)


async def test_a_reused_request_id_whose_reserve_timed_out_is_never_charged_twice(
    gateways: GatewayFactory, redis_url: str
) -> None:
    """Finding 9: a retried id whose reserve reply timed out left its reservation;
    the sweeper then settled the earlier, finished attempt a second time."""
    busy = """
    local t0 = redis.call('TIME'); local s = tonumber(t0[1]) * 1000000 + tonumber(t0[2])
    while true do
      local t = redis.call('TIME')
      if tonumber(t[1]) * 1000000 + tonumber(t[2]) - s > 1500000 then break end
    end
    return 1
    """
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_budget(gw, "t", "1")
    await gw.spend("x", ["t"], "0.3")
    blocker = threading.Thread(target=lambda: redis.Redis.from_url(redis_url).eval(busy, 0))
    blocker.start()
    await asyncio.sleep(0.2)
    with pytest.raises(CountersUnavailable):
        await gw.admission.admit("x", ["t"], Decimal("0.3"))  # the same id, retried
    await asyncio.to_thread(blocker.join)
    await gw.admission.drain()
    clock.now += timedelta(seconds=61)
    await gw.admission.sweep()
    assert await gw.counter("t") == (to_nanos(Decimal("0.3")), 0)
    await verified(gw)


async def test_a_cancelled_duplicate_never_releases_the_original(gateways: GatewayFactory) -> None:
    """Finding 4: a retry of an in-flight id, cancelled during its reserve, gave back
    the first attempt's reservation: $1.50 on a $1 budget."""
    gw = await gateways(Clock(WED))
    await with_budget(gw, "t", "1")
    first = await gw.admission.admit("x", ["t"], Decimal("0.5"))
    assert isinstance(first, Admitted)
    retry = asyncio.create_task(gw.admission.admit("x", ["t"], Decimal("0.5")))
    for _ in range(3):
        await asyncio.sleep(0)
    retry.cancel()
    with contextlib.suppress(asyncio.CancelledError, DuplicateRequest):
        await retry
    await gw.admission.drain()
    assert await gw.counter("t") == (0, to_nanos(Decimal("0.5")))
    assert isinstance(await gw.admission.admit("y", ["t"], Decimal("0.5")), Admitted)
    assert isinstance(await gw.admission.admit("z", ["t"], Decimal("0.5")), BudgetExceeded)


async def test_a_counter_lost_twice_never_takes_a_rebuild_older_than_a_confirm(
    gateways: GatewayFactory, redis_url: str
) -> None:
    """Finding 6: a rebuild that read the log before an admission committed landed
    after the admission confirmed (the counter alone evicted twice): $1.20 on $1."""
    clock = Clock(WED)
    g1, g2 = await gateways(clock), await gateways(clock)
    await with_budget(g1, "t", "1")
    await g2.refresh()
    r = aioredis.Redis.from_url(redis_url)
    key = g1.budget("t").key
    g1.gate.block("reserved:a")
    first = asyncio.create_task(g1.admission.admit("a", ["t"], Decimal("0.4")))
    await g1.gate.wait_reached("reserved:a")
    await r.delete(key)  # evicted
    g2.gate.block("rebuild:t")
    slow = asyncio.create_task(g2.counters.read(g2.budget("t")))
    await g2.gate.wait_reached("rebuild:t")  # read the log: a not committed
    g1.gate.release("reserved:a")
    a = await first
    assert isinstance(a, Admitted)
    await r.delete(key)  # evicted again
    g2.gate.release("rebuild:t")
    await slow
    await r.aclose()
    assert await g1.counter("t") == (0, to_nanos(Decimal("0.4")))  # the rebuild re-read the log
    b = await g2.admission.admit("b", ["t"], Decimal("0.4"))
    assert isinstance(b, Admitted)
    assert isinstance(await g2.admission.admit("c", ["t"], Decimal("0.4")), BudgetExceeded)
    await g1.admission.record_spend(a, Decimal("0.4"))
    await g2.admission.record_spend(b, Decimal("0.4"))
    await verified(g1)


async def test_a_definition_change_stamped_before_a_boundary_counts_the_next_window(
    gateways: GatewayFactory, flush: Callable[[], Any]
) -> None:
    """Finding 7: 7d -> 1d stamped Wed 23:59:59, committed after a charge admitted Thu
    00:00:01: Thursday's window row missed it, and a rebuild from it let $1.20 through."""
    clock = Clock(WED.replace(hour=10))
    gw = await gateways(clock)
    await with_budget(gw, "t", "1", "7d")
    clock.now = WED.replace(hour=0) + timedelta(days=1, seconds=1)
    await gw.spend("r", ["t"], "0.6")
    late = TagService(gw.store, clock=Clock(WED.replace(hour=23, minute=59, second=59)))
    await late.update("t", ev.TagFields(budget_duration="1d"))
    await gw.refresh()
    assert gw.store.dsn is not None
    conn = await asyncpg.connect(gw.store.dsn)
    try:
        await conn.execute("insert into projection_checkpoints (name) values ('budget_windows')")
        worker = Worker(gw.store, BudgetWindows())
        while await worker.step(conn):
            pass
    finally:
        await conn.close()
    await flush()
    assert isinstance(await gw.admission.admit("s", ["t"], Decimal("0.6")), BudgetExceeded)
    await verified(gw)
