"""Projections: exactly once across SIGKILLs, standby takeover, replay = live, --until, verify."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from ledger import events as ev
from ledger.admission import Admission, Admitted
from ledger.budgets import BudgetBook
from ledger.counters import Counters, connect_redis
from ledger.events import RecordedEvent
from ledger.postgres.store import EventStore
from ledger.tags import TagService
from projections.replay import replay, replay_all
from projections.runtime import Projection, lock_key
from projections.spend import PROJECTIONS, create
from projections.verify import Report, verify_counters, verify_projection

pytestmark = pytest.mark.slow

VIEW_TABLES = (
    "spend_logs",
    "tag_info",
    "tag_daily_spend",
    "user_spend",
    "user_daily_spend",
    "budget_window_spend",
    "budget_charges",
    "open_reservations",
)


@pytest.fixture
async def ledger_parts(
    store: EventStore, redis_url: str
) -> AsyncIterator[tuple[Admission, TagService, Counters]]:
    client = connect_redis(redis_url)
    counters = Counters(client, store.pool)
    book = BudgetBook(store)
    await book.refresh()
    tags = TagService(store)
    await tags.create("team:a", ev.TagFields(max_budget=Decimal("1000"), budget_duration="1d"))
    await tags.create("tiny", ev.TagFields(max_budget=Decimal("0.001"), budget_duration="1d"))
    await tags.create("fixed", ev.TagFields(max_budget=Decimal("1000"), budget_duration="3h"))
    await book.refresh()
    yield Admission(store, counters, book), tags, counters
    await counters.close()
    await client.aclose()


async def workload(admission: Admission, n: int, concurrency: int = 50) -> None:
    """A mix: tags, users, metadata, denials, releases."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            tags = (
                ["team:a", f"app:{i % 7}"]
                + (["tiny"] if i % 11 == 0 else [])
                + (["fixed"] if i % 3 == 0 else [])
            )
            outcome = await admission.admit(
                f"w{i}-{random.random()}", tags, Decimal("0.0002"), model="gpt-4o-mini"
            )
            if not isinstance(outcome, Admitted):
                return  # denied: recorded as RequestDenied
            if i % 13 == 0:
                await admission.release(outcome, "upstream_status_500", 500)
                return
            await admission.record_spend(
                outcome,
                Decimal("0.0001") + Decimal(i % 5) / 100000,
                model="gpt-4o-mini" if i % 2 else "gpt-4o",
                provider="mock",
                user_hash=f"user-{i % 17}",
                metadata={"customer": f"c{i % 4}"},
                prompt_tokens=10 + i % 9,
                completion_tokens=20 + i % 7,
            )

    await asyncio.gather(*(one(i) for i in range(n)))


def start_worker(database_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_LOG_LEVEL": "warning",
        "LEDGER_POLL_INTERVAL_S": "0.2",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ledger.run.cli", "projections", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def caught_up(database_url: str, timeout: float = 60) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            head = await conn.fetchval("select coalesce(max(position), 0) from events")
            behind = await conn.fetchval(
                "select count(*) from projection_checkpoints where position < $1", head
            )
            known = await conn.fetchval("select count(*) from projection_checkpoints")
            if behind == 0 and known == len(PROJECTIONS):
                return
            assert time.monotonic() < deadline, "projections did not catch up"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def verify_all(database_url: str, counters: Counters | None = None) -> Report:
    report = Report()
    for name in PROJECTIONS:
        await verify_projection(database_url, create(name), report)
    if counters is not None:
        await verify_counters(counters, report)
    return report


async def snapshot(database_url: str) -> dict[str, list[Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        out = {}
        for table in VIEW_TABLES:
            rows = await conn.fetch(f"select * from {table}")  # noqa: S608
            out[table] = sorted(tuple(r) for r in rows)
        return out
    finally:
        await conn.close()


async def test_exactly_once_while_workers_are_killed(
    database_url: str, ledger_parts: tuple[Admission, TagService, Counters]
) -> None:
    admission, _, counters = ledger_parts
    load = asyncio.create_task(workload(admission, 5000, concurrency=4))
    kills = 0
    progress = []  # checkpoint of spend_rollups after each kill
    conn = await asyncpg.connect(database_url)
    try:
        while not load.done() or kills < 6:
            worker = start_worker(database_url)
            await active(conn, worker.pid)  # a loaded machine can take seconds to start Python
            await asyncio.sleep(random.uniform(0.8, 1.6))
            worker.send_signal(signal.SIGKILL)  # mid-batch, more often than not
            await asyncio.to_thread(worker.wait, 10)
            kills += 1
            progress.append(
                await conn.fetchval(
                    "select position from projection_checkpoints where name = 'spend_rollups'"
                )
            )
            assert kills < 60, "load did not finish"
    finally:
        await conn.close()
    await load
    # the killed workers did real work between kills, not only the last one
    assert len({p for p in progress if p}) >= 3, progress
    final = start_worker(database_url)
    try:
        await caught_up(database_url)
    finally:
        final.terminate()
        await asyncio.to_thread(final.wait, 10)
    report = await verify_all(database_url, counters)
    assert report.ok, [f"{d.where}: {d.detail}" for d in report.drifts[:5]]
    assert report.rows_checked > 5000
    assert kills >= 6


async def active(conn: asyncpg.Connection, pid: int, timeout: float = 60) -> None:
    """Wait until the worker process ``pid`` holds at least one projection's lock."""
    deadline = time.monotonic() + timeout
    while not await conn.fetchval(
        """select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid
           where l.locktype = 'advisory' and l.classid = 4243 and l.granted
             and a.application_name = $1""",
        f"ledger-projection-{pid}",
    ):
        assert time.monotonic() < deadline, "the projection worker never became active"
        await asyncio.sleep(0.05)


async def holder_pid(conn: asyncpg.Connection, name: str) -> int | None:
    return await conn.fetchval(  # type: ignore[no-any-return]
        """select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid
           where l.locktype = 'advisory' and l.classid = 4243 and l.objid = $1 and l.granted""",
        lock_key(name),
    )


async def test_standby_takes_over_and_nothing_is_applied_twice(
    database_url: str, ledger_parts: tuple[Admission, TagService, Counters]
) -> None:
    admission, _, _ = ledger_parts
    await workload(admission, 300)
    first = start_worker(database_url)
    await caught_up(database_url)
    second = start_worker(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await asyncio.sleep(1.0)
        active = await holder_pid(conn, "spend_logs")
        assert active == f"ledger-projection-{first.pid}"
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        await workload(admission, 300)
        started = time.monotonic()
        await caught_up(database_url, timeout=15)
        assert time.monotonic() - started < 10  # took over within seconds
        assert await holder_pid(conn, "spend_logs") == f"ledger-projection-{second.pid}"
    finally:
        await conn.close()
        for p in (first, second):
            if p.poll() is None:
                p.terminate()
                await asyncio.to_thread(p.wait, 10)
    report = await verify_all(database_url)
    assert report.ok, [f"{d.where}: {d.detail}" for d in report.drifts[:5]]


async def test_replay_equals_live_and_verify_names_drift(
    database_url: str, redis_url: str, ledger_parts: tuple[Admission, TagService, Counters]
) -> None:
    admission, tags, counters = ledger_parts
    await workload(admission, 400)
    await tags.update("team:a", ev.TagFields(max_budget=Decimal("2000")))
    await tags.delete("fixed")
    await workload(admission, 200)
    worker = start_worker(database_url)
    try:
        await caught_up(database_url)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 10)
    before = await snapshot(database_url)
    assert before["spend_logs"]
    assert any(row[0] == "tiny" and row[9] > 0 for row in before["tag_info"])  # denials counted
    for name in PROJECTIONS:
        result = await replay(database_url, create(name))
        assert result.schema == "public"
    assert await snapshot(database_url) == before
    assert (await verify_all(database_url, counters)).ok

    # drop a view outright; a replay brings it back with the same numbers
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("drop table tag_daily_spend")
    finally:
        await conn.close()
    await replay(database_url, create("spend_rollups"))
    assert await snapshot(database_url) == before

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("update tag_info set total_spend = total_spend + 1 where tag = 'team:a'")
    finally:
        await conn.close()
    report = await verify_all(database_url)
    assert not report.ok
    assert {d.where for d in report.drifts} == {"view tag_info"}
    assert any("team:a" in d.detail for d in report.drifts)

    budget = admission.book.budgets_for(["team:a"], datetime.now(UTC))[0]
    await counters.read(budget)
    client = aioredis.Redis.from_url(redis_url)
    await client.hincrby(budget.key, "spent", 5)
    await client.aclose()
    report = Report()
    await verify_counters(counters, report)
    assert [d.where for d in report.drifts] == [f"counter {budget.key}"]


async def test_replay_until_a_past_moment(
    database_url: str, ledger_parts: tuple[Admission, TagService, Counters]
) -> None:
    admission, _, _ = ledger_parts
    await workload(admission, 150)
    await asyncio.sleep(0.05)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await workload(admission, 150)
    result = await replay(database_url, create("spend_rollups"), until=moment)
    assert result.schema.startswith("asof_")
    # every projection builds into the same as-of schema, none dropping another's tables
    assert (await replay(database_url, create("spend_logs"), until=moment)).schema == result.schema
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval(f"select to_regclass('{result.schema}.tag_info') is not null")
        assert await conn.fetchval(f"select count(*) from {result.schema}.spend_logs") > 0  # noqa: S608
        as_of = await conn.fetchval(
            f"select total_spend from {result.schema}.tag_info where tag = 'team:a'"  # noqa: S608
        )
        expected = await conn.fetchval(
            """select sum((data->>'cost')::numeric) from events
               where type in ('SpendRecorded', 'ReservationExpired') and recorded_at <= $1
                 and data->'tags' ? 'team:a'""",
            moment,
        )
        live = await conn.fetchval("select to_regclass('public.tag_info') is not null")
        everything = await conn.fetchval(
            """select sum((data->>'cost')::numeric) from events
               where type in ('SpendRecorded', 'ReservationExpired') and data->'tags' ? 'team:a'"""
        )
    finally:
        await conn.close()
    assert as_of == expected
    assert as_of < everything
    assert live


class _Failing(Projection):
    """A projection that fails on the first spend it sees."""

    name = "failing"
    tables = ()
    types = frozenset({"SpendRecorded"})

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        raise RuntimeError("this projection cannot apply spend")


async def all_views(database_url: str) -> dict[str, list[Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        out = {}
        for name in PROJECTIONS:
            for table in create(name).tables:
                out[table] = sorted(tuple(r) for r in await conn.fetch(f"select * from {table}"))  # noqa: S608
        out["checkpoints"] = sorted(
            tuple(r) for r in await conn.fetch("select name, position from projection_checkpoints")
        )
        return out
    finally:
        await conn.close()


async def test_replay_all_reads_the_log_once_and_equals_one_replay_per_projection(
    database_url: str, ledger_parts: tuple[Admission, TagService, Counters]
) -> None:
    admission, tags, _ = ledger_parts
    await workload(admission, 300)
    await tags.update("team:a", ev.TagFields(max_budget=Decimal("2000")))
    await tags.delete("fixed")
    await workload(admission, 200)
    conn = await asyncpg.connect(database_url)
    try:
        head = await conn.fetchval("select max(position) from events")
    finally:
        await conn.close()
    for name in PROJECTIONS:
        alone = await replay(database_url, create(name), batch_size=97)
        assert alone.read == head  # one projection: the log read once, too
    expected = await all_views(database_url)
    assert all(expected[t] for t in ("spend_allocations", "budget_charges", "spend_logs"))
    assert [c[1] for c in expected["checkpoints"]] == [head] * len(PROJECTIONS)

    # small batches, so that a batch is handed to several projections many times over
    results = await replay_all(database_url, [create(n) for n in PROJECTIONS], batch_size=97)
    assert [r.projection for r in results] == list(PROJECTIONS)
    assert all(r.schema == "public" and r.position == head and r.events == head for r in results)
    assert {r.read for r in results} == {head}  # not head times the number of projections
    assert await all_views(database_url) == expected

    # the operator's command takes the same single pass, and says so
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url, "LEDGER_LOG_LEVEL": "warning", "COLUMNS": "300"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ledger.run.cli", "replay", "--all"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"read once ({head:,} events read)" in done.stdout, done.stdout
    assert await all_views(database_url) == expected


_LIVE_OIDS = (
    "select relname, oid from pg_class where relnamespace = 'public'::regnamespace "
    "and relname = any($1::text[]) order by relname"
)


async def test_replay_all_swaps_nothing_when_one_projection_fails(
    database_url: str, ledger_parts: tuple[Admission, TagService, Counters]
) -> None:
    admission, _, _ = ledger_parts
    await workload(admission, 100)
    for name in PROJECTIONS:
        await replay(database_url, create(name))
    before = await all_views(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        oids = await conn.fetch(_LIVE_OIDS, VIEW_TABLES)
        with pytest.raises(RuntimeError, match="cannot apply spend"):
            await replay_all(database_url, [*(create(n) for n in PROJECTIONS), _Failing()])
        # the live tables are the very same ones: none was swapped
        assert await conn.fetch(_LIVE_OIDS, VIEW_TABLES) == oids
    finally:
        await conn.close()
    assert await all_views(database_url) == before
