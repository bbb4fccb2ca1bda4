"""Operator commands over the projections: run, status, replay, verify, counters, report, asof."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ledger.budgets import BudgetBook, rebuild_missing
from ledger.counters import Counters, connect_redis
from ledger.postgres import reports
from ledger.postgres.archive import Archive
from ledger.postgres.store import EventStore, create_pool, replica_lag
from ledger.settings import Settings
from projections.replay import replay_all
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
    replica: tuple[int, float] | None = None
    try:
        rows = await lag(pool)  # every worker with a checkpoint: views, alerts, notifiers
        if settings.database_read_url is not None:
            read_pool = await create_pool(settings, settings.database_read_url)
            try:
                replica = await replica_lag(pool, read_pool)
            finally:
                await read_pool.close()
    finally:
        await pool.close()
    table = Table(title="projections")
    for column in ("projection", "checkpoint", "head", "events behind", "seconds behind", "state"):
        table.add_column(column, justify="left" if column in ("projection", "state") else "right")
    for r in rows:
        state = (
            "ok"
            if r.failing_since is None
            else f"FAILING since {r.failing_since:%Y-%m-%d %H:%M:%S}: {r.error}"
        )
        table.add_row(
            r.name, str(r.position), str(r.head), str(r.events_behind), f"{r.seconds_behind:.1f}", state
        )
    console.print(table)
    if replica is not None:
        console.print(f"read replica: {replica[0]:,} bytes of WAL behind, {replica[1]:.1f} s")
    # a stuck projection makes the command fail, so a cron job or a probe notices
    return 1 if any(r.failing_since is not None for r in rows) else 0


def _error(message: str) -> int:
    """A usage error found once the command looked at the data: like argparse's, exit 2."""
    print(f"ledger: {message}", file=sys.stderr)
    return 2


async def _log_start(dsn: str) -> datetime | None:
    """When the log's first event was recorded (None: the log is empty)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        first: datetime | None = await conn.fetchval(
            "select recorded_at from events order by position limit 1"
        )
    finally:
        await conn.close()
    return first


async def open_archive(settings: Settings) -> Archive | None:
    """The archive ``archive_dir`` names (--archive or LEDGER_ARCHIVE_DIR), checked
    against its manifest; None when there is none."""
    if settings.archive_dir is None:
        return None
    archive = await Archive.open(settings.archive_dir)
    months = len(archive.manifest.partitions)
    console.print(f"archive {settings.archive_dir}: {months} month(s), checksums match the manifest")
    return archive


async def replay_command(settings: Settings, names: list[str] | None, until: datetime | None) -> int:
    assert settings.database_url is not None
    archive = await open_archive(settings)
    start = await _log_start(settings.database_url)
    if archive is not None and archive.first_recorded_at is not None:
        start = archive.first_recorded_at if start is None else min(start, archive.first_recorded_at)
    if until is not None:
        if start is None:
            return _error("the event log is empty: there is nothing to replay up to --until")
        if until < start:
            return _error(
                f"--until {until.isoformat()} is before the log's first event "
                f"({start.isoformat()}): nothing had happened yet"
            )
    elif start is None:
        console.print("the event log is empty: the views are rebuilt empty")
    names = names or list(PROJECTIONS)
    # one pass over the log for all of them: each batch is read once, applied to each
    label = names[0] if len(names) == 1 else f"{len(names)} projections"
    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>10} events/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=None, rate="-")
        started = asyncio.get_running_loop().time()

        def advance(done: int, total: int) -> None:
            elapsed = max(asyncio.get_running_loop().time() - started, 1e-6)
            bar.update(task, completed=done, total=max(total, done), rate=f"{done / elapsed:,.0f}")

        results = await replay_all(
            settings.database_url, [create(n) for n in names], until=until, progress=advance, archive=archive
        )
        # an empty or short log never called advance: the bar ends full, not at "0/?"
        bar.update(task, completed=results[0].events, total=results[0].events)
    first = results[0]
    where = "swapped into the live views" if first.schema == "public" else f"in schema {first.schema}"
    console.print(
        f"{', '.join(names)}: {first.events:,} events in {first.seconds:.1f}s "
        f"({first.events / max(first.seconds, 1e-6):,.0f}/s), read once ({first.read:,} events read), "
        f"up to position {first.position}, {where}"
    )
    rollups = next((r for r in results if r.projection == "spend_rollups"), None)
    if until is not None and rollups is not None:
        await _as_of_report(settings.database_url, rollups.schema, until)
    if until is not None:
        console.print("list these schemas with `ledger asof list`, drop them with `ledger asof drop NAME`")
    return 0


async def _as_of_report(dsn: str, schema: str, until: datetime) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"select tag, total_spend, request_count from {schema}.tag_info "
            "where request_count > 0 order by total_spend desc, tag"
        )
    finally:
        await conn.close()
    table = Table(title=f"spend per tag as of {until.isoformat()}")
    table.add_column("tag")
    table.add_column("spend (USD)", justify="right")
    table.add_column("requests", justify="right")
    for r, money in zip(rows, money_column([Decimal(r["total_spend"]) for r in rows]), strict=True):
        table.add_row(r["tag"], money, str(r["request_count"]))
    if not rows:
        table.caption = "no spend recorded up to then"
    console.print(table)


_ASOF = re.compile(r"asof_[0-9]{14}")


async def _asof_schemas(conn: Any) -> list[Any]:
    return list(
        await conn.fetch(
            r"""
            select n.nspname as schema,
                   coalesce(string_agg(c.relname, ', ' order by c.relname), '') as tables,
                   coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint as bytes
            from pg_namespace n left join pg_class c on c.relnamespace = n.oid and c.relkind = 'r'
            where n.nspname ~ '^asof_[0-9]{14}$'
            group by 1 order by 1
            """
        )
    )


async def asof_list(settings: Settings) -> int:
    """The asof_* schemas `replay --until` left, with the moment each stands for."""
    import asyncpg

    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await _asof_schemas(conn)
    finally:
        await conn.close()
    if not rows:
        console.print("no asof_* schemas (`ledger replay --until TIMESTAMP` makes them)")
        return 0
    table = Table(title="schemas left by `ledger replay --until`")
    table.add_column("schema")
    table.add_column("as of (UTC)")
    table.add_column("tables")
    table.add_column("size", justify="right")
    for r in rows:
        moment = datetime.strptime(r["schema"][5:], "%Y%m%d%H%M%S")
        table.add_row(
            r["schema"], f"{moment:%Y-%m-%d %H:%M:%S}", r["tables"], f"{r['bytes'] / 1024:,.0f} KiB"
        )
    table.caption = "drop with `ledger asof drop NAME ...` or `ledger asof drop --all`"
    console.print(table)
    return 0


async def asof_drop(settings: Settings, names: list[str], *, every: bool) -> int:
    import asyncpg

    assert settings.database_url is not None
    bad = [n for n in names if not _ASOF.fullmatch(n)]
    if bad:
        return _error(f"only asof_<14 digits> schemas can be dropped here; got {', '.join(map(repr, bad))}")
    conn = await asyncpg.connect(settings.database_url)
    try:
        existing = {r["schema"] for r in await _asof_schemas(conn)}
        missing = [n for n in names if n not in existing]
        if missing:
            return _error(f"no such schema: {', '.join(missing)} (see `ledger asof list`)")
        targets = sorted(existing) if every else names
        for name in targets:  # checked against the pattern above: safe to splice
            await conn.execute(f"drop schema {name} cascade")
    finally:
        await conn.close()
    console.print(f"dropped {len(targets)} schema(s)" + (": " + ", ".join(targets) if targets else ""))
    return 0


async def verify(settings: Settings) -> int:
    """Exit status 0 when log, views and counters agree; 1 with a readable diff otherwise."""
    assert settings.database_url is not None
    report = Report()
    archive = await open_archive(settings)
    for name in PROJECTIONS:
        await verify_projection(settings.database_url, create(name), report, archive=archive)
    if settings.redis_url is not None:
        pool = await create_pool(settings)
        client = connect_redis(settings.redis_url, cluster=settings.redis_cluster)
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
    client = connect_redis(settings.redis_url, cluster=settings.redis_cluster)
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
_SPARK_WIDTH = 62  # at most this many marks; longer spans put several buckets in one mark


def sparkline(values: list[Decimal]) -> str:
    top = max(values, default=Decimal(0))
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1)))] for v in values)


def money_column(values: list[Decimal]) -> list[str]:
    """Amounts that line up in a right-aligned column: one number of decimals for
    all, enough for three significant digits of the smallest non-zero one (2..9)."""
    decimals = 2
    for v in values:
        if v != 0:
            decimals = max(decimals, 2 - abs(v).adjusted())
    decimals = min(decimals, 9)
    return [f"{v:,.{decimals}f}" for v in values]


@dataclass(frozen=True, slots=True)
class Span:
    """What `--since` asks for: whole UTC days (today included) or the last hours."""

    start: datetime
    end: datetime
    bucket: str  # "day" or "hour"
    buckets: list[datetime]
    label: str


def parse_since(since: str, now: datetime) -> Span:
    """``Nd``: the last N UTC days, today included; ``Nw``: 7N days; ``Nh``: the last N
    whole hours and this one. The sparkline draws exactly one mark per bucket asked."""
    match = re.fullmatch(r"([1-9][0-9]{0,3})([hdw])", since)
    if match is None or (match[2] == "h" and int(match[1]) > 168):
        raise ValueError(
            f"must be a number of days, weeks or hours like 7d, 2w or 24h (at most 168h), got {since!r}"
        )
    n, unit = int(match[1]), match[2]
    if unit == "h":
        end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        buckets = [end - timedelta(hours=n - i) for i in range(n)]
        return Span(buckets[0], end, "hour", buckets, f"{n} hour" + "s" * (n > 1))
    days = n * 7 if unit == "w" else n
    end = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC) + timedelta(days=1)
    buckets = [end - timedelta(days=days - i) for i in range(days)]
    return Span(buckets[0], end, "day", buckets, f"{days} day" + "s" * (days > 1))


_NONE_LABELS = {"tag": "(untagged)", "user": "(no user)", "model": "(none: swept at estimate)"}


async def report(settings: Settings, by: str, since: str) -> int:
    """Spend per group over a span: a total, requests and a sparkline per row, and a
    total line that counts every request once (tags overlap; the total does not)."""
    from ledger.postgres import queries

    if not queries.valid_group(by):
        return _error(f"--by must be tag, user, model or metadata.<key>; got {by!r}")
    try:
        span = parse_since(since, datetime.now(UTC))
    except ValueError as e:
        return _error(f"--since {e}")
    pool = await create_pool(settings)
    try:
        rows = await queries.spend_buckets(
            pool, group_by=by, bucket=span.bucket, start=span.start, end=span.end
        )
        total = await queries.spend_between(pool, span.start, span.end)
    finally:
        await pool.close()
    series: dict[str, dict[datetime, Decimal]] = {}
    counts: dict[str, int] = {}
    unpriced: dict[str, int] = {}
    for r in rows:
        name = r["grp"] if r["grp"] is not None else _NONE_LABELS.get(by, "(none)")
        if by == "user" and r["grp"] is not None:
            name = name[:12] + "…"  # a keyed hash: the first 12 characters tell users apart
        series.setdefault(name, {})[r["period"].replace(tzinfo=UTC)] = Decimal(r["spend"])
        counts[name] = counts.get(name, 0) + int(r["requests"])
        unpriced[name] = unpriced.get(name, 0) + int(r["unpriced"])
    per_mark = -(-len(span.buckets) // _SPARK_WIDTH)  # ceil
    first, last = span.buckets[0], span.buckets[-1]
    if span.bucket == "hour":
        title_range = f"{first:%Y-%m-%d %H:00} .. {last:%H:00} UTC"
        column = "hourly"
    else:
        title_range = f"{first:%Y-%m-%d} .. {last:%Y-%m-%d} UTC"
        column = "daily" if per_mark == 1 else f"{per_mark} days per mark"
    table = Table(title=f"spend by {by}, {title_range} ({span.label})")
    table.add_column(by)
    table.add_column("spend (USD)", justify="right")
    table.add_column("requests", justify="right")
    show_unpriced = any(unpriced.values())
    if show_unpriced:
        table.add_column("unpriced", justify="right")
    table.add_column(column)
    ordered = sorted(series.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    sums = [sum(v.values(), Decimal(0)) for _, v in ordered]
    money = money_column([*sums, Decimal(total["spend"])])
    for (name, per_bucket), amount in zip(ordered, money, strict=False):
        values = [per_bucket.get(b, Decimal(0)) for b in span.buckets]
        marks = [sum(values[i : i + per_mark], Decimal(0)) for i in range(0, len(values), per_mark)]
        cells = [name, "—" if unpriced[name] == counts[name] else amount, str(counts[name])]
        if show_unpriced:
            cells.append(str(unpriced[name] or ""))
        table.add_row(*cells, sparkline(marks))
    table.add_section()
    total_row = ["total", money[-1], str(total["requests"])]
    if show_unpriced:
        total_row.append(str(total["unpriced"] or ""))
    table.add_row(*total_row, "")
    notes = []
    if by == "tag":
        notes.append("tag rows overlap: a request with several tags counts in each; the total counts it once")
    if not rows:
        notes.append("no spend in this span: widen it (--since 30d) or send requests through the gateway")
    if show_unpriced:
        notes.append(
            "unpriced: requests to a model with no known price, recorded at 0 (— when all of a row's "
            "are); set prices with LEDGER_PRICE_OVERRIDES"
        )
    table.caption = "\n".join(notes) or None
    console.print(table)
    return 0


async def report_command(
    settings: Settings, by: str, since: str, allocation: str | None, compare: bool
) -> int:
    """`ledger report` with a tag dimension, an allocation or --compare."""
    span = parse_since(since, datetime.now(UTC))
    try:
        q = reports.make_query(by, allocation, "day", span.start, span.end)
    except reports.ReportError as e:
        print(f"ledger: --{'by' if e.param == 'group_by' else e.param}: {e}", file=sys.stderr)
        return 2
    pool = await create_pool(settings)
    try:
        report = await reports.build(pool, q)
    finally:
        await pool.close()
    label = f"{span.start:%Y-%m-%d %H:%M} .. {span.end:%Y-%m-%d %H:%M} UTC ({span.label})"
    console.print(reports.table(report, compare=compare, label=label))
    return 0
