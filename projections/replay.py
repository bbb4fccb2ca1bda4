"""Replay: rebuild a projection from position 0 into fresh tables, then swap them in.

The fresh tables are built in a schema of their own (so index names never
collide), up to the head of the log. The swap then happens in one transaction
that first locks the projection's checkpoint row — the live worker takes the
same lock for each batch, so it waits — catches the fresh tables up to the live
checkpoint or the head, whichever is later, drops the live tables and moves the
fresh ones in. Readers see the old view or the new one, never half of either.

``until`` replays only the events recorded up to a moment, into a schema of its
own, and leaves the live views alone: "what did each tag spend as of then".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from projections.runtime import Projection, read_batch

Progress = Callable[[int, int], None]  # (events done, events total)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    projection: str
    events: int
    position: int
    seconds: float
    schema: str  # where the rebuilt tables are now ("public" after a swap)


async def _create_shadow(conn: asyncpg.Connection, schema: str, projection: Projection) -> dict[str, str]:
    # Schema names are generated here (lower-case, digits, underscores): safe unquoted.
    # Several projections may build into one schema (an as-of replay): each replaces
    # only its own tables.
    await conn.execute(f"create schema if not exists {schema}")
    for table in projection.tables:
        await conn.execute(f"drop table if exists {schema}.{table}")
        await conn.execute(f"create table {schema}.{table} (like view_templates.{table} including all)")
    return {t: f"{schema}.{t}" for t in projection.tables}


async def _build(
    conn: asyncpg.Connection,
    projection: Projection,
    tables: dict[str, str],
    *,
    after: int,
    stop_position: int | None,
    until: datetime | None,
    batch_size: int,
    progress: Progress | None,
    total: int,
    done: int = 0,
) -> tuple[int, int]:
    """Apply events after ``after`` (to the stop position / time); return (position, count)."""
    position = after
    while True:
        events = await read_batch(conn, position, batch_size)
        if stop_position is not None:
            events = [e for e in events if e.position <= stop_position]
        if until is not None:
            cut = [e for e in events if e.recorded_at <= until]
            stop = len(cut) < len(events)
            events = cut
        else:
            stop = False
        if not events:
            return position, done
        relevant = [e for e in events if e.type in projection.types]
        if relevant:
            async with conn.transaction():
                await projection.apply(conn, relevant, tables)
        position = events[-1].position
        done += len(events)
        if progress is not None:
            progress(done, total)
        if stop:
            return position, done


async def replay(
    dsn: str,
    projection: Projection,
    *,
    until: datetime | None = None,
    until_position: int | None = None,
    schema: str | None = None,
    swap: bool = True,
    batch_size: int = 5000,
    progress: Progress | None = None,
) -> ReplayResult:
    """Rebuild ``projection`` from the log. Swaps it in unless ``until``/``swap=False``."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        head = int(await conn.fetchval("select coalesce(max(position), 0) from events"))
        total = head if until_position is None else min(head, until_position)
        if schema is None:
            schema = f"replay_{projection.name}" if until is None else f"asof_{until:%Y%m%d%H%M%S}"
        tables = await _create_shadow(conn, schema, projection)
        await projection.load(conn, 0)
        position, count = await _build(
            conn,
            projection,
            tables,
            after=0,
            stop_position=until_position,
            until=until,
            batch_size=batch_size,
            progress=progress,
            total=total,
        )
        if until is not None or until_position is not None or not swap:
            return ReplayResult(projection.name, count, position, time.perf_counter() - started, schema)
        async with conn.transaction():
            checkpoint = await conn.fetchval(
                "select position from projection_checkpoints where name = $1 for update",
                projection.name,
            )
            if checkpoint is None:
                await conn.execute(
                    "insert into projection_checkpoints (name, position) values ($1, 0)",
                    projection.name,
                )
            # catch up with everything committed while we were building
            position, count = await _build(
                conn,
                projection,
                tables,
                after=position,
                stop_position=None,
                until=None,
                batch_size=batch_size,
                progress=progress,
                total=total,
                done=count,
            )
            for table in projection.tables:
                await conn.execute(f"drop table if exists public.{table}")
                await conn.execute(f"alter table {schema}.{table} set schema public")
            await conn.execute(
                "update projection_checkpoints set position = $2, updated_at = now() where name = $1",
                projection.name,
                position,
            )
            await conn.execute(f"drop schema {schema}")
        return ReplayResult(projection.name, count, position, time.perf_counter() - started, "public")
    finally:
        await conn.close()
