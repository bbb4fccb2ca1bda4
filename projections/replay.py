"""Replay: rebuild projections from position 0 into fresh tables, then swap them in.

Several projections are rebuilt in ONE pass over the log: each batch is read
once and handed to every projection (each applies the types it wants), each on
a connection of its own so PostgreSQL writes one view while Python prepares the
next, and the next batch is read meanwhile. Batches are larger than a live worker's: fewer
round trips and commits, and rollups merge more rows before writing them.

The fresh tables are built in a schema per projection (so index names never
collide), up to the head of the log. Each swap then happens in one transaction
that first locks the projection's checkpoint row — the live worker takes the
same lock for each batch, so it waits — catches the fresh tables up to the live
checkpoint or the head, whichever is later, drops the live tables and moves the
fresh ones in. Readers see the old view or the new one, never half of either;
and a projection that fails to build fails the whole replay before anything is
swapped.

``until`` replays only the events recorded up to a moment, into a schema of its
own, and leaves the live views alone: "what did each tag spend as of then".

``archive`` (see ``ledger/postgres/archive.py``) adds the months ``ledger archive``
detached: the log is then read from their files merged with the live partitions,
in position order, so a replay after archiving builds the views it built before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ledger import events as ev
from ledger.events import RecordedEvent
from ledger.postgres.archive import Archive, hold_off_archiving, read_log
from projections.runtime import Projection

Progress = Callable[[int, int], None]  # (events done, events total)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    projection: str
    events: int
    position: int
    seconds: float
    schema: str  # where the rebuilt tables are now ("public" after a swap)
    read: int = 0  # events the whole replay read from the log (shared by a single pass)


@dataclass(slots=True)
class LogReader:
    """Reads the log in position order for a replay, counting what it read: a
    single pass over several projections reads each event once. With an archive,
    its events come merged with the live ones (the one log source: read_log)."""

    conn: asyncpg.Connection
    batch_size: int
    archive: Archive | None = None
    batches: int = 0
    events: int = 0

    async def read(self, after: int) -> list[RecordedEvent]:
        events = await read_log(self.conn, after, self.batch_size, self.archive)
        self.batches += 1
        self.events += len(events)
        return events


@dataclass(slots=True)
class _Target:
    projection: Projection
    conn: asyncpg.Connection
    tables: dict[str, str]


async def _create_shadow(conn: asyncpg.Connection, schema: str, projection: Projection) -> dict[str, str]:
    # Schema names are generated here (lower-case, digits, underscores): safe unquoted.
    # Several projections may build into one schema (an as-of replay): each replaces
    # only its own tables.
    await conn.execute(f"create schema if not exists {schema}")
    for table in projection.tables:
        await conn.execute(f"drop table if exists {schema}.{table}")
        await conn.execute(f"create table {schema}.{table} (like view_templates.{table} including all)")
    return {t: f"{schema}.{t}" for t in projection.tables}


async def _apply(target: _Target, events: list[RecordedEvent]) -> None:
    p = target.projection
    relevant = [e for e in events if e.type in p.types]
    if not relevant:
        return
    # Outside a transaction the tables are fresh ones nobody reads yet: a crash loses
    # the replay whatever is flushed, and the swap's durable commit flushes them
    # first. Inside one (the swap, verify's catch-up) the commit must stay durable.
    scratch = not target.conn.is_in_transaction()
    async with target.conn.transaction():
        if scratch:
            await target.conn.execute("set local synchronous_commit = off")
        await p.apply(target.conn, relevant, target.tables)


async def _apply_all(targets: Sequence[_Target], events: list[RecordedEvent]) -> None:
    with ev.shared_decoding():  # each event decoded once for all the projections
        if len({id(t.conn) for t in targets}) < len(targets):  # a shared connection: in turn
            for t in targets:
                await _apply(t, events)
            return
        results = await asyncio.gather(*(_apply(t, events) for t in targets), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _build(
    reader: LogReader,
    targets: Sequence[_Target],
    *,
    after: int,
    stop_position: int | None,
    until: datetime | None,
    progress: Progress | None,
    total: int,
    done: int = 0,
) -> tuple[int, int]:
    """Apply events after ``after`` (to the stop position / time); return (position, count).

    When the projections write on connections of their own, the next batch is
    read while this one is applied."""
    read_ahead = all(t.conn is not reader.conn for t in targets)
    position = after
    ahead: asyncio.Task[list[RecordedEvent]] | None = None
    try:
        while True:
            if ahead is not None:
                events, ahead = await ahead, None
            else:
                events = await reader.read(position)
            stop = False
            if stop_position is not None:
                cut = [e for e in events if e.position <= stop_position]
                stop, events = len(cut) < len(events), cut
            if until is not None:
                cut = [e for e in events if e.recorded_at <= until]
                stop, events = stop or len(cut) < len(events), cut
            if not events:
                return position, done
            if read_ahead and not stop:
                ahead = asyncio.create_task(reader.read(events[-1].position))
            await _apply_all(targets, events)
            position = events[-1].position
            done += len(events)
            if progress is not None:
                progress(done, total)
            if stop:
                return position, done
    finally:
        if ahead is not None:
            ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ahead


async def replay(
    dsn: str,
    projection: Projection,
    *,
    until: datetime | None = None,
    until_position: int | None = None,
    schema: str | None = None,
    swap: bool = True,
    batch_size: int = 20000,
    progress: Progress | None = None,
    archive: Archive | None = None,
) -> ReplayResult:
    """Rebuild ``projection`` from the log. Swaps it in unless ``until``/``swap=False``."""
    [result] = await replay_all(
        dsn,
        [projection],
        until=until,
        until_position=until_position,
        schema=schema,
        swap=swap,
        batch_size=batch_size,
        progress=progress,
        archive=archive,
    )
    return result


async def replay_all(
    dsn: str,
    projections: Sequence[Projection],
    *,
    until: datetime | None = None,
    until_position: int | None = None,
    schema: str | None = None,
    swap: bool = True,
    batch_size: int = 20000,
    progress: Progress | None = None,
    archive: Archive | None = None,
) -> list[ReplayResult]:
    """Rebuild ``projections`` from ONE pass over the log, then swap each in (unless
    ``until``/``until_position``/``swap=False``).

    If any projection fails to build, the replay raises and no view is swapped."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    targets: list[_Target] = []
    try:
        await hold_off_archiving(conn, archive)
        head = int(await conn.fetchval("select coalesce(max(position), 0) from events"))
        if archive is not None:
            head = max(head, archive.last_position)
        total = head if until_position is None else min(head, until_position)
        schemas: dict[str, str] = {}
        for projection in projections:
            where = schema
            if where is None:
                where = f"replay_{projection.name}" if until is None else f"asof_{until:%Y%m%d%H%M%S}"
            schemas[projection.name] = where
            tables = await _create_shadow(conn, where, projection)
            # a connection per projection: their writes overlap (statement_cache_size=0
            # as everywhere around replays: tables are swapped under cached plans)
            build = await asyncpg.connect(dsn, statement_cache_size=0)
            targets.append(_Target(projection, build, tables))
            await projection.load(build, 0)
        reader = LogReader(conn, batch_size, archive)
        position, count = await _build(
            reader,
            targets,
            after=0,
            stop_position=until_position,
            until=until,
            progress=progress,
            total=total,
        )
        if until is not None or until_position is not None or not swap:
            seconds = time.perf_counter() - started
            return [
                ReplayResult(
                    t.projection.name, count, position, seconds, schemas[t.projection.name], reader.events
                )
                for t in targets
            ]
        # Catch up together with what was committed while building, still one read
        # for all, so that each swap below has only the last moments to read.
        position, count = await _build(
            reader,
            targets,
            after=position,
            stop_position=None,
            until=None,
            progress=progress,
            total=total,
            done=count,
        )
        # Then each projection is swapped in its own transaction, as a single
        # replay always was: locks on one projection's tables at a time, so a
        # reader joining views of two projections cannot deadlock with the swap.
        last_use = {where: t for t in targets if (where := schemas[t.projection.name])}
        results = []
        for t in targets:
            name = t.projection.name
            async with conn.transaction():
                checkpoint = await conn.fetchval(
                    "select position from projection_checkpoints where name = $1 for update", name
                )
                if checkpoint is None:
                    await conn.execute(
                        "insert into projection_checkpoints (name, position) values ($1, 0)", name
                    )
                # catch up with everything committed since
                at, done = await _build(
                    reader,
                    [_Target(t.projection, conn, t.tables)],
                    after=position,
                    stop_position=None,
                    until=None,
                    progress=progress,
                    total=total,
                    done=count,
                )
                for table in t.projection.tables:
                    await conn.execute(f"drop table if exists public.{table}")
                    await conn.execute(f"alter table {t.tables[table]} set schema public")
                await conn.execute(
                    "update projection_checkpoints set position = $2, updated_at = now() where name = $1",
                    name,
                    at,
                )
                if last_use[schemas[name]] is t:
                    await conn.execute(f"drop schema {schemas[name]}")
            results.append(
                ReplayResult(name, done, at, time.perf_counter() - started, "public", reader.events)
            )
        return results
    finally:
        for t in targets:
            await t.conn.close()
        await conn.close()
