"""Operator commands over the projections: run, status, replay, verify, counters."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ledger.counters import Counters, connect_redis
from ledger.settings import Settings
from ledger.store import EventStore, create_pool
from projections.replay import replay
from projections.runtime import Worker, lag
from projections.spend import PROJECTIONS, create
from projections.verify import Report, rebuild_counters, verify_counters, verify_projection

console = Console(stderr=False)


async def run_workers(settings: Settings) -> None:
    """Run every projection's worker until cancelled (Ctrl-C)."""
    store = await EventStore.open(settings)
    workers = [Worker(store, create(name), poll_interval_s=settings.poll_interval_s) for name in PROJECTIONS]
    console.print(f"projection workers running: {', '.join(PROJECTIONS)} (Ctrl-C to stop)")
    try:
        await asyncio.gather(*(w.run() for w in workers))
    finally:
        await store.close()


async def status(settings: Settings) -> int:
    assert settings.database_url is not None
    pool = await create_pool(settings)
    try:
        rows = await lag(pool, list(PROJECTIONS))
    finally:
        await pool.close()
    table = Table(title="projections")
    for column in ("projection", "checkpoint", "head", "events behind", "seconds behind"):
        table.add_column(column, justify="right" if column != "projection" else "left")
    for r in rows:
        table.add_row(r.name, str(r.position), str(r.head), str(r.events_behind), f"{r.seconds_behind:.1f}")
    console.print(table)
    return 0


async def replay_command(settings: Settings, names: list[str], until: datetime | None) -> int:
    assert settings.database_url is not None
    for name in names:
        projection = create(name)
        with Progress(
            TextColumn(f"[bold]{name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>10} events/s"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(name, total=None, rate="-")
            started = asyncio.get_running_loop().time()

            def advance(done: int, total: int, task: TaskID = task, started: float = started) -> None:
                elapsed = max(asyncio.get_running_loop().time() - started, 1e-6)
                bar.update(task, completed=done, total=max(total, done), rate=f"{done / elapsed:,.0f}")

            result = await replay(settings.database_url, projection, until=until, progress=advance)
        where = "swapped into the live views" if result.schema == "public" else f"in schema {result.schema}"
        console.print(
            f"{name}: {result.events:,} events in {result.seconds:.1f}s "
            f"({result.events / max(result.seconds, 1e-6):,.0f}/s), up to position {result.position}, {where}"
        )
        if until is not None and name == "spend_rollups":
            await _as_of_report(settings.database_url, result.schema, until)
    return 0


async def _as_of_report(dsn: str, schema: str, until: datetime) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"select tag, total_spend, request_count from {schema}.tag_info order by total_spend desc"
        )
    finally:
        await conn.close()
    table = Table(title=f"spend per tag as of {until.isoformat()}")
    table.add_column("tag")
    table.add_column("spend (USD)", justify="right")
    table.add_column("requests", justify="right")
    for r in rows:
        table.add_row(r["tag"], f"{r['total_spend']}", str(r["request_count"]))
    console.print(table)


async def verify(settings: Settings) -> int:
    """Exit status 0 when log, views and counters agree; 1 with a readable diff otherwise."""
    assert settings.database_url is not None
    report = Report()
    for name in PROJECTIONS:
        await verify_projection(settings.database_url, create(name), report)
    if settings.redis_url is not None:
        pool = await create_pool(settings)
        client = connect_redis(settings.redis_url)
        counters = Counters(client, pool)
        try:
            await verify_counters(counters, report)
        finally:
            await counters.close()
            await client.aclose()
            await pool.close()
    if report.ok:
        console.print(
            f"ok: {report.views_checked} views ({report.rows_checked:,} rows) and "
            f"{report.counters_checked} counters agree with the event log"
        )
        return 0
    console.print(
        f"[red]drift: {len(report.drifts)} difference(s) between the log and what was derived from it"
    )
    for d in report.drifts:
        console.print(f"  {d.where}: {d.detail}")
    return 1


async def counters_rebuild(settings: Settings) -> int:
    assert settings.database_url is not None
    assert settings.redis_url is not None
    pool = await create_pool(settings)
    client = connect_redis(settings.redis_url)
    counters = Counters(client, pool)
    try:
        n = await rebuild_counters(counters)
    finally:
        await counters.close()
        with contextlib.suppress(Exception):
            await client.aclose()
        await pool.close()
    console.print(f"rebuilt {n} live window counter(s) from the event log")
    return 0
