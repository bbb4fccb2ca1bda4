"""Operator commands over the projections: run, status, replay, verify, counters."""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

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

from ledger.budgets import BudgetBook, rebuild_missing
from ledger.counters import Counters, connect_redis
from ledger.settings import Settings
from ledger.store import EventStore, create_pool
from projections.replay import replay
from projections.runtime import Worker, lag
from projections.spend import PROJECTIONS, create
from projections.verify import Report, verify_counters, verify_projection

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
        rows = await lag(pool)  # every worker with a checkpoint: views, alerts, notifiers
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
    assert settings.redis_url is not None
    store = await EventStore.open(settings)
    client = connect_redis(settings.redis_url)
    counters = Counters(client, store.pool)
    try:
        book = BudgetBook(store)
        await book.refresh()
        n = await rebuild_missing(book, counters, datetime.now(UTC))
    finally:
        await counters.close()
        with contextlib.suppress(Exception):
            await client.aclose()
        await store.close()
    console.print(
        f"built {n} missing window counter(s) from the event log "
        "(live counters are never replaced: they may hold reservations not yet in the log)"
    )
    return 0


async def notify(settings: Settings) -> None:
    """Raise alerts and deliver them until cancelled (Ctrl-C)."""
    from projections.runtime import alert_workers

    store = await EventStore.open(settings)
    workers = await alert_workers(store, settings.poll_interval_s, settings.webhooks, settings.webhook_secret)
    names = ", ".join(w.projection.name for w in workers)
    console.print(f"alert workers running: {names} (Ctrl-C to stop)")
    try:
        await asyncio.gather(*(w.run() for w in workers))
    finally:
        await store.close()


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[Decimal]) -> str:
    top = max(values, default=Decimal(0))
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1)))] for v in values)


async def report(settings: Settings, by: str, since: str) -> int:
    """Spend per group over the last days, a total and a daily sparkline per row."""
    from ledger import queries

    if not queries.valid_group(by):
        console.print("[red]--by must be tag, user, model or metadata.<key>")
        return 2
    match = re.fullmatch(r"([1-9][0-9]{0,3})([hdw])", since)
    if match is None:
        console.print("[red]--since must look like 7d, 24h or 2w")
        return 2
    span = timedelta(**{{"h": "hours", "d": "days", "w": "weeks"}[match[2]]: int(match[1])})
    end = datetime.now(UTC)
    start = end - span
    pool = await create_pool(settings)
    try:
        rows = await queries.spend_report(pool, group_by=by, interval="day", start=start, end=end)
    finally:
        await pool.close()
    days = [(start + timedelta(days=i)).date() for i in range((end.date() - start.date()).days + 1)]
    series: dict[str, dict[Any, Decimal]] = {}
    counts: dict[str, int] = {}
    for r in rows:
        name = r["grp"] if r["grp"] is not None else "(none)"
        series.setdefault(name, {})[r["period"]] = Decimal(r["spend"])
        counts[name] = counts.get(name, 0) + int(r["requests"])
    table = Table(title=f"spend by {by}, last {since}")
    table.add_column(by)
    table.add_column("spend (USD)", justify="right")
    table.add_column("requests", justify="right")
    table.add_column(f"daily, {days[0]:%m-%d} .. {days[-1]:%m-%d}")
    ordered = sorted(series.items(), key=lambda kv: sum(kv[1].values()), reverse=True)
    for name, per_day in ordered:
        values = [per_day.get(d, Decimal(0)) for d in days]
        table.add_row(str(name), f"{sum(values)}", str(counts[name]), sparkline(values))
    total = sum((sum(v.values()) for v in series.values()), Decimal(0))
    table.add_section()
    table.add_row("total", f"{total}", str(sum(counts.values())), "")
    console.print(table)
    return 0
