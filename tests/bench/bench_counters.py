"""Budget counters.

1. Admit decision latency: `Counters.reserve` with 1 and 5 tags vs a Redis PING,
   through the same client and pool in the same run, so the ratio isolates what
   the Lua script costs over a bare round trip. Sequential calls; medians of runs.
2. Rebuild latency as the log grows (100k, 1M, 5M events): a counter rebuilt
   from the checkpointed window total plus the log's tail (1,000 events the
   projection has not applied yet) plus the open reservations. Half of every
   log is charges in the measured tag's current window: the worst case for
   anything that would sum the window. Should stay flat.
3. A window boundary on the largest log: 200 concurrent first requests over 50
   budgeted tags right after their windows open — failures and admit p99.

The logs are written with set-based SQL (generate_series), and the projection's
tables are filled from them the same way, for speed; what is measured is the
ledger's own rebuild and admission code against them.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from ledger.counters import Budget, Counters, connect_redis
from ledger.domain.money import to_nanos
from ledger.domain.windows import parse_duration, window_at
from ledger.postgres.migrations import migrate
from ledger.run.embedded import EmbeddedPostgres, EmbeddedRedis

N = 5000


async def _latencies(call: Callable[[int], Awaitable[object]], n: int = N) -> list[float]:
    for i in range(200):  # warm up: connections, script cache
        await call(-i - 1)
    out = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - started)
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e6


async def run(database_url: str, redis_url: str, repeats: int = 5) -> list[tuple[str, float]]:
    await migrate(database_url)
    client = connect_redis(redis_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    counters = Counters(client, pool)
    now = datetime.now(UTC)
    window = window_at(parse_duration("1d"), now, now)
    budgets = [Budget(f"tag:bench-{i}", 1, window, to_nanos(Decimal(10**9))) for i in range(5)]
    deadline = now + timedelta(minutes=10)
    estimate = to_nanos(Decimal("0.001"))
    results: dict[str, list[tuple[float, float]]] = {
        "ping": [],
        "reserve, 1 tag": [],
        "reserve, 5 tags": [],
    }
    try:
        for r in range(repeats):
            ping = await _latencies(lambda i: client.ping())
            one = await _latencies(
                lambda i, r=r: counters.reserve(f"a{r}-{i}", budgets[:1], estimate, deadline)
            )
            five = await _latencies(lambda i, r=r: counters.reserve(f"b{r}-{i}", budgets, estimate, deadline))
            for name, values in (
                ("ping", ping),
                ("reserve, 1 tag", one),
                ("reserve, 5 tags", five),
            ):
                results[name].append((_pct(values, 0.5), _pct(values, 0.99)))
    finally:
        await counters.close()
        await pool.close()
        await client.aclose()
    rows: list[tuple[str, float]] = []
    ping_p50 = statistics.median(p50 for p50, _ in results["ping"])
    for name, runs in results.items():
        p50 = statistics.median(a for a, _ in runs)
        p99 = statistics.median(b for _, b in runs)
        rows.append((f"{name}: p50 (µs)", p50))
        rows.append((f"{name}: p99 (µs)", p99))
        if name != "ping":
            rows.append((f"{name}: p50 / PING p50", p50 / ping_p50))
    return rows


# ------------------------------------------------------------------ rebuilds

SIZES = (100_000, 1_000_000, 5_000_000)
TAIL = 1_000

_FILL = """
insert into events (stream, version, type, data)
select 'request:b' || g, v,
       case when v = 1 then 'RequestAdmitted' else 'SpendRecorded' end,
       case when v = 1 then jsonb_build_object(
                'request_id', 'b' || g, 'at', $3::timestamptz - (g % 86400) * interval '1 second',
                'estimate', '0.01', 'deadline', $3::timestamptz + interval '15 minutes',
                'tags', jsonb_build_array(case when g % 2 = 0 then 'hot' else 'cold' || (g % 40) end),
                'budget_tags', jsonb_build_array(case when g % 2 = 0 then 'hot' else 'cold' || (g % 40) end))
            else jsonb_build_object(
                'request_id', 'b' || g, 'admitted_at', $3::timestamptz - (g % 86400) * interval '1 second',
                'cost', '0.001',
                'tags', jsonb_build_array(case when g % 2 = 0 then 'hot' else 'cold' || (g % 40) end),
                'budget_tags', jsonb_build_array(case when g % 2 = 0 then 'hot' else 'cold' || (g % 40) end))
       end
from generate_series($1::bigint, $2::bigint) g, (values (1), (2)) as versions(v)
order by g, v
"""

_PROJECT = """
insert into budget_charges (subject, admitted_at, position, nanos, cost)
select 'tag:' || (data->'budget_tags'->>0), (data->>'admitted_at')::timestamptz, position,
       ceil((data->>'cost')::numeric * 1000000000), (data->>'cost')::numeric
from events where type = 'SpendRecorded' and position > $1 and position <= $2;
"""

_WINDOWS = """
insert into budget_window_spend (subject, window_start, window_end, spend, spend_nanos, requests)
select subject, $1, $2, sum(cost), sum(nanos), count(*) from budget_charges
where admitted_at >= $1 and admitted_at < $2 group by subject
on conflict (subject, window_start, window_end) do update set
    spend = excluded.spend, spend_nanos = excluded.spend_nanos, requests = excluded.requests
"""


async def rebuild_runs(database_url: str, redis_url: str) -> list[tuple[str, float]]:
    from ledger import events as ev
    from ledger.budgets import BudgetBook
    from ledger.postgres.store import EventStore
    from ledger.settings import Settings
    from ledger.tags import TagService

    await migrate(database_url)
    now = datetime.now(UTC)
    month = window_at(parse_duration("1mo"), now, now)
    store = await EventStore.open(Settings.from_dsn(database_url, pool_max_size=10))
    client = connect_redis(redis_url)
    counters = Counters(client, store.pool)
    tags = TagService(store)
    rows: list[tuple[str, float]] = []
    try:
        edges = [f"{kind}{i}" for kind in ("fresh", "edge") for i in range(50)]
        for name in ["hot", *(f"cold{i}" for i in range(40)), *edges]:
            await tags.create(name, ev.TagFields(max_budget=Decimal(10**6), budget_duration="1mo"))
        book = BudgetBook(store)
        await book.refresh()
        conn = await asyncpg.connect(database_url)
        await conn.execute(
            "insert into projection_checkpoints (name) values ('budget_windows') on conflict do nothing"
        )
        for spec in book.definitions.budgeted():
            await conn.execute(
                "insert into budget_epochs values ($1, $2) on conflict (subject) do update set epoch = $2",
                spec.subject,
                spec.epoch,
            )
        rows += await _boundary(store, counters, book, month.end, "fresh", "empty log")
        written = 0
        for size in SIZES:
            pairs = (size - written) // 2
            await conn.execute(_FILL, written // 2 + 1, written // 2 + pairs, now)
            written += 2 * pairs
            head = await conn.fetchval("select max(position) from events")
            checkpoint = await conn.fetchval(
                "select position from projection_checkpoints where name = 'budget_windows'"
            )
            await conn.execute(_PROJECT, checkpoint, head - TAIL)
            await conn.execute("truncate budget_window_spend")
            await conn.execute(_WINDOWS, month.start, month.end)
            await conn.execute(
                "update projection_checkpoints set position = $1 where name = 'budget_windows'", head - TAIL
            )
            await conn.execute("analyze")
            budget = book.budgets_for(["hot"], now)[0]
            times = []
            for _ in range(30):
                await client.delete(budget.key)  # no traffic here: a lost counter, on purpose
                started = time.perf_counter()
                await counters.rebuild(budget)
                times.append(time.perf_counter() - started)
            found = await counters.peek(budget.key)
            assert found is not None
            assert found.spent_nanos > 0
            rows.append((f"rebuild, {size:,} events in the log: p50 (ms)", _pct(times, 0.5) / 1000))
            rows.append((f"rebuild, {size:,} events in the log: p99 (ms)", _pct(times, 0.99) / 1000))
        await conn.close()
        rows += await _boundary(store, counters, book, month.end, "edge", f"{written:,}-event log")
    finally:
        await counters.close()
        await client.aclose()
        await store.close()
    return rows


async def _boundary(
    store: Any, counters: Counters, book: Any, boundary: datetime, prefix: str, label: str
) -> list[tuple[str, float]]:
    """200 concurrent first requests over 50 tags right as their windows open."""
    from ledger.admission import Admission, Admitted

    admission = Admission(store, counters, book, clock=lambda: boundary)
    latencies: list[float] = []
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        chosen = [f"{prefix}{(i + k) % 50}" for k in range(1 + i % 3)]
        started = time.perf_counter()
        try:
            outcome = await admission.admit(f"{prefix}-{i}", chosen, Decimal("0.01"))
        except Exception:
            failures += 1
            return
        latencies.append(time.perf_counter() - started)
        if not isinstance(outcome, Admitted):
            failures += 1
            return
        await admission.record_spend(outcome, Decimal("0.005"))

    await asyncio.gather(*(one(i) for i in range(200)))
    return [
        (f"window boundary on the {label}, 200 first requests / 50 tags: failures", float(failures)),
        (f"window boundary on the {label}: admit p50 (ms)", _pct(latencies, 0.5) / 1000),
        (f"window boundary on the {label}: admit p99 (ms)", _pct(latencies, 0.99) / 1000),
    ]


def main() -> list[tuple[str, float]]:
    db, rd = os.environ.get("LEDGER_BENCH_DATABASE_URL"), os.environ.get("LEDGER_BENCH_REDIS_URL")
    if db and rd:
        return asyncio.run(run(db, rd)) + asyncio.run(rebuild_runs(db, rd))
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedPostgres(Path(tmp) / "pg") as pg,
        EmbeddedRedis(Path(tmp) / "redis") as redis,
    ):
        return asyncio.run(run(db or pg.url, rd or redis.url)) + asyncio.run(rebuild_runs(pg.url, redis.url))


if __name__ == "__main__":
    for name, value in main():
        print(f"{name:70s} {value:12,.1f}")
