"""Drift verification: recompute every view and every live counter from the log.

Each projection is rebuilt into a scratch schema up to the live checkpoint (from
the archived months too, when given an archive: see ``ledger/postgres/archive.py``); the
final catch-up and the comparison run in one transaction that holds the
checkpoint row, so the live worker cannot move in between. Counters of every
budget's current window are compared with what the log says they should hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from ledger.counters import Budget, Counters
from ledger.counters.log import window_state
from ledger.events import RecordedEvent
from ledger.postgres.archive import Archive, hold_off_archiving
from ledger.subjects import DEFINITION_TYPES, Definitions
from projections.replay import LogReader, _build, _create_shadow, _Target
from projections.runtime import Projection


@dataclass(slots=True)
class Drift:
    where: str  # "view tag_info" or "counter ledger:w:..."
    detail: str


@dataclass(slots=True)
class Report:
    views_checked: int = 0
    rows_checked: int = 0
    counters_checked: int = 0
    drifts: list[Drift] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.drifts


async def verify_projection(
    dsn: str, projection: Projection, report: Report, *, sample: int = 5, archive: Archive | None = None
) -> None:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    schema = f"verify_{projection.name}"
    try:
        await hold_off_archiving(conn, archive)
        tables = await _create_shadow(conn, schema, projection)
        await projection.load(conn, 0)
        live = int(
            await conn.fetchval(
                "select coalesce((select position from projection_checkpoints where name = $1), 0)",
                projection.name,
            )
        )
        targets = [_Target(projection, conn, tables)]
        position, _ = await _build(
            LogReader(conn, 5000, archive),
            targets,
            after=0,
            stop_position=live,
            until=None,
            progress=None,
            total=live,
        )
        async with conn.transaction():
            checkpoint = await conn.fetchval(
                "select position from projection_checkpoints where name = $1 for update",
                projection.name,
            )
            checkpoint = int(checkpoint or 0)
            await _build(
                LogReader(conn, 5000, archive),
                targets,
                after=position,
                stop_position=checkpoint,
                until=None,
                progress=None,
                total=checkpoint,
            )
            for table in projection.tables:
                report.views_checked += 1
                report.rows_checked += int(await conn.fetchval(f"select count(*) from public.{table}"))
                extra = await conn.fetch(
                    f"select * from public.{table} except all select * from {schema}.{table} limit {sample}"
                )
                missing = await conn.fetch(
                    f"select * from {schema}.{table} except all select * from public.{table} limit {sample}"
                )
                for row in extra:
                    report.drifts.append(Drift(f"view {table}", f"row not in the log's version: {dict(row)}"))
                for row in missing:
                    report.drifts.append(Drift(f"view {table}", f"the log says there should be: {dict(row)}"))
    finally:
        await conn.execute(f"drop schema if exists {schema} cascade")
        await conn.close()


async def definitions_from_log(pool: asyncpg.Pool) -> Definitions:
    """Every budget definition, straight from the log."""
    rows = await pool.fetch(
        "select position, stream, version, type, data::text, recorded_at from events "
        "where type = any($1::text[]) order by position",
        list(DEFINITION_TYPES),
    )
    definitions = Definitions()
    for r in rows:
        definitions.apply(RecordedEvent(r[0], r[1], r[2], r[3], r[4], r[5]))
    return definitions


async def live_budgets(counters: Counters, now: datetime) -> list[Budget]:
    """The budget in force now of every subject that has a live counter in Redis
    (found through the subjects' registries: tags, template tags, keys, end users,
    per-model budgets) or a budget of its own."""
    definitions = await definitions_from_log(counters.pool)
    subjects = {s.subject for s in definitions.budgeted()}
    subjects.update(await counters.subjects_with_registries())
    out = []
    for subject in sorted(subjects):
        spec = definitions.spec(subject)
        budget = spec.budget(now) if spec is not None else None
        if budget is not None:
            out.append(budget)
    return out


async def verify_counters(counters: Counters, report: Report, now: datetime | None = None) -> None:
    """Compare each live window counter with what the log says it should hold:
    spent, reserved, and which reservations. Requests in flight make a counter
    move; it is read before and after the log, and compared once it held still."""
    now = now or datetime.now(UTC)
    for budget in await live_budgets(counters, now):
        for _ in range(20):
            before = await counters.peek(budget.key)
            if before is None:
                break  # not built yet: the next decision builds it from the log
            want = await window_state(counters.pool, budget)
            after = await counters.peek(budget.key)
            if before == after:
                break
        if before is None:
            continue
        report.counters_checked += 1
        have = (before.spent_nanos, before.reserved_nanos, sorted(before.held))
        should = (want.spent_nanos, want.reserved_nanos, sorted(want.open))
        if have != should:
            report.drifts.append(
                Drift(
                    f"counter {budget.key}",
                    f"Redis has spent={have[0]} reserved={have[1]} nano-USD holding {len(have[2])} "
                    f"reservation(s); the log says spent={should[0]} reserved={should[1]} "
                    f"holding {len(should[2])}",
                )
            )
