"""Budget counters in a real Redis, rebuilt from a real PostgreSQL log."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
import redis.asyncio as aioredis

from ledger import events as ev
from ledger.admission import Admission, Admitted, BudgetExceeded, DuplicateRequest
from ledger.budgets import BudgetBook
from ledger.counters import Budget, Counters, Denied, Reserved, connect_redis
from ledger.money import to_nanos
from ledger.settings import Settings
from ledger.store import EventStore
from ledger.tags import TagService
from ledger.windows import parse_duration, window_at


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def rclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def counters(rclient: aioredis.Redis, store: EventStore) -> AsyncIterator[Counters]:
    c = Counters(rclient, store.pool)
    yield c
    await c.close()


def day_budget(tag: str, limit: Decimal, now: datetime | None = None) -> Budget:
    now = now or datetime.now(UTC)
    return Budget(tag, "1d", window_at(parse_duration("1d"), now, now), to_nanos(limit))


async def new_ledger(
    store: EventStore, counters: Counters, clock: Clock | None = None
) -> tuple[Admission, TagService, BudgetBook]:
    book = BudgetBook(store)
    await book.refresh()
    tags = TagService(store, clock=clock)
    admission = Admission(store, counters, book, clock=clock, reservation_ttl=timedelta(seconds=60))
    return admission, tags, book


async def with_tag(tags: TagService, book: BudgetBook, name: str, budget: str, duration: str = "1d") -> None:
    await tags.create(name, ev.TagFields(max_budget=Decimal(budget), budget_duration=duration))
    await book.refresh()


# ------------------------------------------------------------- reserve


def _reserve_in_process(args: tuple[str, str, int, int, str, int]) -> int:
    """One OS process: `count` concurrent reserves; returns how many were admitted."""
    redis_url, database_url, index, count, budget_usd, estimate = args

    async def run() -> int:
        client = connect_redis(redis_url, max_connections=16)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        try:
            c = Counters(client, pool)
            budget = day_budget("shared", Decimal(budget_usd))
            deadline = datetime.now(UTC) + timedelta(minutes=5)
            results = await asyncio.gather(
                *(c.reserve(f"p{index}-{i}", [budget], estimate, deadline) for i in range(count))
            )
            return sum(isinstance(r, Reserved) for r in results)
        finally:
            await pool.close()
            await client.aclose()

    return asyncio.run(run())


async def test_500_concurrent_reserves_across_4_processes(
    redis_url: str, database_url: str, counters: Counters
) -> None:
    estimate = to_nanos(Decimal("0.003"))
    budget_usd = "0.1"  # room for floor(0.1 / 0.003) = 33
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        admitted = await asyncio.to_thread(
            pool.map,
            _reserve_in_process,
            [(redis_url, database_url, i, 125, budget_usd, estimate) for i in range(4)],
        )
    assert sum(admitted) == 33
    spend = await counters.read(day_budget("shared", Decimal(budget_usd)))
    assert spend.spent_nanos == 0
    assert spend.reserved_nanos == 33 * estimate
    assert spend.reserved_nanos <= to_nanos(Decimal(budget_usd))


async def test_multi_tag_reserve_is_all_or_nothing(counters: Counters) -> None:
    a, b = day_budget("a", Decimal(1)), day_budget("b", Decimal("0.001"))
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    big = to_nanos(Decimal("0.01"))
    result = await counters.reserve("r1", [a, b], big, deadline)
    assert isinstance(result, Denied)
    assert result.budget.tag == "b"
    assert (await counters.read(a)).reserved_nanos == 0  # nothing reserved on a
    small = to_nanos(Decimal("0.0005"))
    assert isinstance(await counters.reserve("r2", [a, b], small, deadline), Reserved)
    assert (await counters.read(a)).reserved_nanos == small
    assert (await counters.read(b)).reserved_nanos == small


async def test_reserve_is_idempotent_per_request_id(counters: Counters) -> None:
    a = day_budget("a", Decimal(1))
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    first = await counters.reserve("same", [a], 1000, deadline)
    again = await counters.reserve("same", [a], 1000, deadline)
    assert isinstance(first, Reserved)
    assert not first.duplicate
    assert isinstance(again, Reserved)
    assert again.duplicate
    assert (await counters.read(a)).reserved_nanos == 1000


async def test_exact_money_above_2_pow_53_nanos(counters: Counters) -> None:
    """$9M+ in nanos passes 2^53: the Lua compare must still be exact."""
    big = day_budget("big", Decimal("10000000.000000001"))
    deadline = datetime.now(UTC) + timedelta(minutes=1)
    exact = to_nanos(Decimal("10000000.000000001"))
    assert isinstance(await counters.reserve("x1", [big], exact - 1, deadline), Reserved)
    assert isinstance(
        await counters.reserve("x2", [big], 1, deadline), Reserved
    )  # lands exactly on the limit
    assert isinstance(await counters.reserve("x3", [big], 1, deadline), Denied)  # one nano over


# ------------------------------------------------------------- settle and release


async def test_settle_release_and_idempotency(store: EventStore, counters: Counters) -> None:
    admission, tags, book = await new_ledger(store, counters)
    await with_tag(tags, book, "team", "1")
    a = await admission.admit("q1", ["team"], Decimal("0.10"))
    assert isinstance(a, Admitted)
    budget = a.budgets[0]
    assert (await counters.read(budget)).reserved_nanos == to_nanos(Decimal("0.10"))

    # settle higher than the estimate
    position = await admission.record_spend(a, Decimal("0.15"))
    after = await counters.read(budget)
    assert (after.spent_nanos, after.reserved_nanos) == (to_nanos(Decimal("0.15")), 0)
    # a repeated settle changes nothing
    again = await counters.settle(
        "q1",
        [budget],
        actual_nanos=999,
        estimate_nanos=999,
        position=position,
        admitted_position=a.position,
    )
    assert again is False
    assert await counters.read(budget) == after

    # release: the reservation goes back, nothing is charged
    b = await admission.admit("q2", ["team"], Decimal("0.20"))
    assert isinstance(b, Admitted)
    await admission.release(b, "upstream_error")
    final = await counters.read(budget)
    assert (final.spent_nanos, final.reserved_nanos) == (to_nanos(Decimal("0.15")), 0)
    types = [e.type for e in await store.read_stream("request:q2")]
    assert types == ["RequestAdmitted", "RequestReleased"]

    # the same request id is never admitted twice
    with pytest.raises(DuplicateRequest):
        await admission.admit("q1", ["team"], Decimal("0.01"))


async def test_denial_names_tag_limit_spend_and_reset(store: EventStore, counters: Counters) -> None:
    admission, tags, book = await new_ledger(store, counters)
    await with_tag(tags, book, "small", "0.05")
    a = await admission.admit("d1", ["small", "free-tag"], Decimal("0.04"))
    assert isinstance(a, Admitted)
    await admission.record_spend(a, Decimal("0.04"))
    denied = await admission.admit("d2", ["free-tag", "small"], Decimal("0.02"))
    assert isinstance(denied, BudgetExceeded)
    assert denied.tag == "small"
    assert denied.limit == Decimal("0.05")
    assert denied.spent == Decimal("0.04")
    assert denied.reset_at == denied.budget.window.end
    [event] = [ev.decode(e) for e in await store.read_stream("denied:d2")]
    assert isinstance(event, ev.RequestDenied)
    assert (event.tag, event.spent, event.max_budget) == ("small", Decimal("0.04"), Decimal("0.05"))


# ------------------------------------------------------------- rebuild


async def test_flushall_never_resets_a_budget(
    store: EventStore, counters: Counters, rclient: aioredis.Redis
) -> None:
    admission, tags, book = await new_ledger(store, counters)
    await with_tag(tags, book, "flush", "1")
    spent = Decimal(0)
    for i in range(5):
        a = await admission.admit(f"f{i}", ["flush"], Decimal("0.2"))
        assert isinstance(a, Admitted)
        cost = Decimal("0.1") + Decimal(i) / 100
        await admission.record_spend(a, cost)
        spent += cost
    open_one = await admission.admit("f-open", ["flush"], Decimal("0.3"))  # in flight across the flush
    assert isinstance(open_one, Admitted)
    budget = open_one.budgets[0]
    before = await counters.read(budget)
    await rclient.flushall()
    after = await counters.read(budget)  # rebuilt from the log
    assert (after.spent_nanos, after.reserved_nanos) == (before.spent_nanos, before.reserved_nanos)
    assert after.spent_nanos == to_nanos(spent)
    # $0.60 spent and $0.30 reserved of $1: $0.15 more must be denied
    denied = await admission.admit("f-next", ["flush"], Decimal("0.15"))
    assert isinstance(denied, BudgetExceeded)
    # the in-flight request settles correctly into the rebuilt counter
    await admission.record_spend(open_one, Decimal("0.25"))
    final = await counters.read(budget)
    assert (final.spent_nanos, final.reserved_nanos) == (to_nanos(spent + Decimal("0.25")), 0)


async def test_concurrent_rebuilders_agree(
    store: EventStore, counters: Counters, rclient: aioredis.Redis
) -> None:
    admission, tags, book = await new_ledger(store, counters)
    await with_tag(tags, book, "race", "100")
    for i in range(20):
        a = await admission.admit(f"c{i}", ["race"], Decimal("0.5"))
        assert isinstance(a, Admitted)
        if i % 2 == 0:
            await admission.record_spend(a, Decimal("0.3"))
    budget = book.budgets_for(["race"], datetime.now(UTC))[0]
    expected = await counters.read(budget)
    await rclient.delete(budget.key)
    results = await asyncio.gather(*(counters.rebuild(budget) for _ in range(20)))
    assert {(r.spent_nanos, r.reserved_nanos) for r in results} == {
        (expected.spent_nanos, expected.reserved_nanos)
    }
    now = await counters.read(budget)
    assert (now.spent_nanos, now.reserved_nanos) == (expected.spent_nanos, expected.reserved_nanos)
    assert expected.spent_nanos == to_nanos(Decimal("3.0"))
    assert expected.reserved_nanos == to_nanos(Decimal("5.0"))


# ------------------------------------------------------------- windows


async def test_window_rollover_with_injected_clock(store: EventStore, counters: Counters) -> None:
    created = datetime.now(UTC)
    clock = Clock(created)
    admission, tags, book = await new_ledger(store, counters, clock)
    await with_tag(tags, book, "minute", "0.05", duration="1m")
    a = await admission.admit("m1", ["minute"], Decimal("0.04"))
    assert isinstance(a, Admitted)
    await admission.record_spend(a, Decimal("0.04"))
    assert isinstance(await admission.admit("m2", ["minute"], Decimal("0.02")), BudgetExceeded)
    clock.now += timedelta(seconds=59)  # still the first window
    assert isinstance(await admission.admit("m2b", ["minute"], Decimal("0.02")), BudgetExceeded)
    clock.now += timedelta(seconds=1)  # the next one-minute window, counted from creation
    b = await admission.admit("m3", ["minute"], Decimal("0.02"))
    assert isinstance(b, Admitted)
    assert b.budgets[0].window.start == created + timedelta(minutes=1)
    spend = await counters.read(b.budgets[0])
    assert spend.spent_nanos == 0


async def test_old_window_keys_expire(store: EventStore, counters: Counters, rclient: aioredis.Redis) -> None:
    admission, tags, book = await new_ledger(store, counters)
    await with_tag(tags, book, "short", "1", duration="2s")
    a = await admission.admit("s1", ["short"], Decimal("0.1"))
    assert isinstance(a, Admitted)
    await admission.record_spend(a, Decimal("0.1"))
    key = a.budgets[0].key
    ttl = await rclient.ttl(key)
    assert 0 < ttl <= 5  # window end (<= 2 s) + a margin of one window
    deadline = time.monotonic() + 8
    while await rclient.exists(key):
        assert time.monotonic() < deadline, "old window key never expired"
        await asyncio.sleep(0.2)
    later = await admission.admit("s2", ["short"], Decimal("0.1"))
    assert isinstance(later, Admitted)
    assert later.budgets[0].key != key
    assert (await counters.read(later.budgets[0])).spent_nanos == 0


# ------------------------------------------------------------- sweeping


async def test_expired_reservation_is_swept_and_charged(store: EventStore, counters: Counters) -> None:
    clock = Clock(datetime.now(UTC))
    admission, tags, book = await new_ledger(store, counters, clock)
    await with_tag(tags, book, "sweep", "1")
    crashed = await admission.admit("gone", ["sweep"], Decimal("0.07"))  # gateway "dies" here
    finished = await admission.admit("done", ["sweep"], Decimal("0.05"))
    assert isinstance(crashed, Admitted)
    assert isinstance(finished, Admitted)
    # settled in the log, but the gateway died before settling Redis:
    done_event = ev.SpendRecorded(
        request_id="done",
        admitted_at=finished.at,
        cost=Decimal("0.01"),
        tags=["sweep"],
        budget_tags=["sweep"],
    )
    await store.append("request:done", 1, [ev.to_new(done_event)])
    assert (await admission.sweep()).expired == 0  # nothing past its deadline yet
    clock.now += timedelta(seconds=61)
    report = await admission.sweep()
    assert (report.expired, report.settled) == (1, 1)
    types = [e.type for e in await store.read_stream("request:gone")]
    assert types == ["RequestAdmitted", "ReservationExpired"]
    spend = await counters.read(crashed.budgets[0])
    assert spend.spent_nanos == to_nanos(Decimal("0.08"))  # estimate of 'gone' + actual of 'done'
    assert spend.reserved_nanos == 0
    assert (await admission.sweep()).expired == 0
    # a late gateway cannot settle the swept request a second time
    with pytest.raises(Exception, match="version"):
        await admission.record_spend(crashed, Decimal("0.01"))


async def test_reservation_that_never_reached_the_log_is_dropped(
    store: EventStore, counters: Counters
) -> None:
    clock = Clock(datetime.now(UTC))
    admission, tags, book = await new_ledger(store, counters, clock)
    await with_tag(tags, book, "lost", "1")
    budget = book.budgets_for(["lost"], clock.now)[0]
    deadline = clock.now + timedelta(seconds=60)
    assert isinstance(await counters.reserve("unlogged", [budget], 5000, deadline), Reserved)
    clock.now += timedelta(seconds=61)
    report = await admission.sweep()
    assert report.dropped == 1
    spend = await counters.read(budget)
    assert (spend.spent_nanos, spend.reserved_nanos) == (0, 0)


async def test_budget_book_sees_updates_from_another_process_within_a_second(
    database_url: str, store: EventStore
) -> None:
    other = await EventStore.open(Settings.from_dsn(database_url))
    book = BudgetBook(other, poll_interval_s=30)  # only NOTIFY can make it in time
    await book.start()
    try:
        tags = TagService(store)
        await tags.create("live", ev.TagFields(max_budget=Decimal(5), budget_duration="1d"))
        started = time.monotonic()
        while (state := book.get("live")) is None:
            assert time.monotonic() - started < 1.0, "budget cache did not refresh within 1 s"
            await asyncio.sleep(0.01)
        await tags.update("live", ev.TagFields(max_budget=Decimal(7)))
        started = time.monotonic()
        while (state := book.get("live")) is None or state.max_budget != Decimal(7):
            assert time.monotonic() - started < 1.0, "update not seen within 1 s"
            await asyncio.sleep(0.01)
    finally:
        await book.close()
        await other.close()
