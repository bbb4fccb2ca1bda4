"""Archives of the event log: old month partitions as Parquet files, and the log
as replay and verify read it (archives merged with the live partitions).

The layout is ``sql/0050_partitioned_events.sql``: request and denial streams
live in monthly partitions of ``events_traffic``; everything else (definitions,
alerts) in ``events_books``, which is never archived.

``archive`` writes each month partition whose whole range is before a date to
``DIR/events_YYYY_MM.parquet``, re-reads it (row digest and count must match
what was read from PostgreSQL), records it in ``DIR/manifest.json`` (range,
positions, rows, the file's sha256), and only then detaches and drops the
partition, in one transaction that first checks, under the append lock, that
the partition still holds exactly what was written. Every step is safe to
rerun: a partition that is still attached is written again (same name, same
rows, same entry), one that is gone is done. It refuses (ArchiveRefused) the
current month, a partition holding admissions the sweeper has yet to settle
(the sweeper reads their stream from the live log), and a partition some
projection has not read yet (its worker tails the live log only).

``read_log`` is the one log source replay and verify read: the archived events
(each file's checksum verified against the manifest when the archive is
opened) merged by position with the live table. Month ranges overlap in
positions (a transaction that started before midnight may draw its positions
after one that started after, and definitions interleave with traffic), so
the merge is by position, never file after file.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from ledger.errors import ArchiveError, ArchiveRefused
from ledger.events import RecordedEvent
from ledger.postgres.partitions import (
    LOCK_TIMEOUT,
    PARTITION_NAME,
    Partition,
    ensure_partitions,
    month_partitions,
)
from ledger.postgres.store import read_after

log = structlog.get_logger(__name__)

MANIFEST = "manifest.json"
# Advisory locks (namespace 4242 as the append lock): one archive run at a time
# (each rewrites the manifest from what it read), and replays/verifies reading
# the log from its start (shared) against a detach (exclusive): a month detached
# under a reader that has not reached it would be missing from what it builds.
ARCHIVE_LOCK = (4242, 3)
READERS_LOCK = (4242, 4)
_BATCH = 20_000  # rows per Parquet row group / per fetch

# Exact types: jsonb as its text, positions int64, timestamps with their zone
# (PostgreSQL keeps microseconds), tx (xid8) as uint64.
SCHEMA = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),
        pa.field("stream", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("data", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("tx", pa.uint64(), nullable=False),
    ]
)
_COLUMNS = [f.name for f in SCHEMA]
# xid8 goes through numeric: asyncpg reads it exactly as a Python int from there
_ROW = "position, stream, version, type, data::text, recorded_at, tx::text::numeric"


class ArchivedPartition(msgspec.Struct, frozen=True, kw_only=True):
    """One manifest entry: a detached month partition and its file."""

    partition: str
    file: str
    range_start: datetime
    range_end: datetime
    rows: int
    first_position: int | None
    last_position: int | None
    sha256: str


class Manifest(msgspec.Struct, kw_only=True):
    format: int = 1
    partitions: list[ArchivedPartition] = msgspec.field(default_factory=list)


@dataclass(slots=True)
class ArchiveReport:
    archived: list[ArchivedPartition] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # in the manifest and detached before this run


# ------------------------------------------------------------------ writing


def load_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.exists():
        return Manifest()
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except msgspec.ValidationError as e:
        raise ArchiveError(f"{path}: not a budget-ledger archive manifest: {e}") from e
    except msgspec.DecodeError as e:
        raise ArchiveError(f"{path}: not valid JSON: {e}") from e


def _table(name: str) -> str:
    """A month partition's name, checked (it goes into SQL text)."""
    if PARTITION_NAME.match(name) is None:
        raise ArchiveError(f"{name!r} is not a month partition of the event log")
    return name


async def _shape(conn: asyncpg.Connection[Any], name: str) -> tuple[int, int | None, int | None]:
    """A partition's rows, first and last position."""
    row = await conn.fetchrow(
        f"select count(*), min(position), max(position) from {_table(name)}"  # noqa: S608
    )
    assert row is not None
    return int(row[0]), row[1], row[2]


def _publish(tmp: Path, final: Path) -> None:
    """A fully written file under its final name, durably."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.partitions.sort(key=lambda p: p.range_start)
    _write_atomically(directory / MANIFEST, msgspec.json.format(msgspec.json.encode(manifest), indent=2))


def _digest_rows(h: Any, table: pa.Table) -> None:
    """Fold rows into a running digest: the same rows give the same digest whether
    they come from PostgreSQL or back from the file."""
    for row in zip(*(table.column(c).to_pylist() for c in _COLUMNS), strict=True):
        h.update(msgspec.json.encode([*row[:5], row[5].isoformat(), row[6]]))
        h.update(b"\n")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _reread(path: Path) -> tuple[int, str]:
    """Rows and row digest of a written file, read back from disk."""
    h = hashlib.sha256()
    rows = 0
    pf = pq.ParquetFile(path)
    if pf.schema_arrow != SCHEMA:
        raise ArchiveError(f"{path.name}: written with schema {pf.schema_arrow}, expected {SCHEMA}")
    for batch in pf.iter_batches(batch_size=_BATCH):
        table = pa.Table.from_batches([batch])
        _digest_rows(h, table)
        rows += table.num_rows
    return rows, h.hexdigest()


async def _write_partition(conn: asyncpg.Connection[Any], p: Partition, directory: Path) -> ArchivedPartition:
    """The partition's rows, in position order, to its file; verified by reading it back."""
    final = directory / f"{p.name}.parquet"
    tmp = directory / f".{p.name}.parquet.partial"
    h = hashlib.sha256()
    rows = 0
    first: int | None = None
    last: int | None = None
    # one snapshot for the whole file (nothing should be arriving, but be exact)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        writer = pq.ParquetWriter(tmp, SCHEMA)
        try:
            cursor = conn.cursor(f"select {_ROW} from {_table(p.name)} order by position")  # noqa: S608
            batch: list[asyncpg.Record] = []
            async for r in cursor:
                batch.append(r)
                if len(batch) >= _BATCH:
                    h, rows, first, last = await _write_batch(writer, batch, h, rows, first)
                    batch = []
            if batch:
                h, rows, first, last = await _write_batch(writer, batch, h, rows, first)
        finally:
            writer.close()
    await asyncio.to_thread(_publish, tmp, final)
    back_rows, back_digest = await asyncio.to_thread(_reread, final)
    if (back_rows, back_digest) != (rows, h.hexdigest()):
        raise ArchiveError(
            f"{final}: read back {back_rows} rows (digest {back_digest[:12]}), wrote {rows} "
            f"(digest {h.hexdigest()[:12]}); the partition is kept"
        )
    return ArchivedPartition(
        partition=p.name,
        file=final.name,
        range_start=p.start,
        range_end=p.end,
        rows=rows,
        first_position=first,
        last_position=last,
        sha256=await asyncio.to_thread(_file_sha256, final),
    )


async def _write_batch(
    writer: pq.ParquetWriter, batch: list[asyncpg.Record], h: Any, rows: int, first: int | None
) -> tuple[Any, int, int | None, int | None]:
    columns = list(zip(*batch, strict=True))
    columns[6] = tuple(int(x) for x in columns[6])  # xid8, read as numeric: exact
    arrays = [pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    await asyncio.to_thread(writer.write_table, table)
    _digest_rows(h, table)
    if first is None:
        first = int(batch[0][0])
    return h, rows + len(batch), first, int(batch[-1][0])


async def _refuse_if_live(conn: asyncpg.Connection[Any], p: Partition) -> None:
    """Archiving must not take away what something live still reads from the log."""
    # an admission whose stream's head is still the admission: no terminal event
    unsettled = (
        f"from {_table(p.name)} e join stream_heads h on h.stream = e.stream "
        "where e.type = 'RequestAdmitted' and h.version = e.version"
    )
    open_admissions = await conn.fetch(f"select e.stream {unsettled} limit 3")
    if open_admissions:
        count = await conn.fetchval(f"select count(*) {unsettled}")
        sample = ", ".join(r[0] for r in open_admissions)
        raise ArchiveRefused(
            f"{p.name} holds {count} admission(s) with no terminal event yet (e.g. {sample}); the "
            "sweeper settles them from their stream in the live log: let a gateway run its sweeper "
            "(past the reservation TTL), then archive again"
        )
    _, _, last = await _shape(conn, p.name)
    if last is None:
        return
    behind = await conn.fetch(
        "select name, position from projection_checkpoints where position < $1 order by name", last
    )
    if behind:
        names = ", ".join(f"{r[0]} (at {r[1]})" for r in behind)
        raise ArchiveRefused(
            f"{p.name} ends at position {last} and these projections have not read that far: {names}; "
            "let the projection workers catch up (`ledger projections status`), then archive again"
        )


async def hold_off_archiving(conn: asyncpg.Connection[Any], archive: Archive | None) -> None:
    """For a reader of the whole log (replay, verify): no month is detached
    while ``conn`` is open (a detach meanwhile refuses; rerun it), and every month
    detached before is in ``archive`` (else the reader would count too little)."""
    await conn.execute("select pg_advisory_lock_shared($1, $2)", *READERS_LOCK)
    detached = [r[0] for r in await conn.fetch("select partition from archived_months order by partition")]
    have = {p.partition for p in archive.manifest.partitions} if archive is not None else set()
    missing = [name for name in detached if name not in have]
    if missing:
        where = "the archive given lacks them" if archive is not None else "no archive was given"
        raise ArchiveError(
            f"{len(missing)} month(s) of the log were archived ({', '.join(missing)}) and {where}: "
            "pass --archive DIR (or set LEDGER_ARCHIVE_DIR) to the directory `ledger archive` wrote, "
            "or the views would be rebuilt without them"
        )


async def _detach(conn: asyncpg.Connection[Any], entry: ArchivedPartition) -> None:
    async with conn.transaction():
        if not await conn.fetchval("select pg_try_advisory_xact_lock($1, $2)", *READERS_LOCK):
            raise ArchiveRefused(
                f"a replay or verify is reading the log: {entry.partition} is written and listed in "
                "the manifest but still attached; run `ledger archive` again when it is done"
            )
        # Nothing is appended meanwhile; a lock the detach cannot get soon fails
        # this run (rerun it) rather than queueing every append behind it.
        await conn.execute("select ledger_append_lock()")
        # as creating a month (partitions.LOCK_TIMEOUT): the append lock is held while
        # the detach waits for readers, and appends time out after 5 s
        await conn.execute(f"set local lock_timeout = '{LOCK_TIMEOUT}'")
        rows, first, last = await _shape(conn, entry.partition)
        if (rows, first, last) != (entry.rows, entry.first_position, entry.last_position):
            raise ArchiveError(
                f"{entry.partition} changed while it was being archived ({rows} rows, positions "
                f"{first}..{last}; the file has {entry.rows}); nothing was detached: run again"
            )
        await conn.execute(f"alter table events_traffic detach partition {_table(entry.partition)}")
        await conn.execute(f"drop table {_table(entry.partition)}")
        await conn.execute(
            "insert into archived_months (partition, first_position, last_position, rows, sha256) "
            "values ($1, $2, $3, $4, $5) on conflict (partition) do nothing",
            entry.partition,
            entry.first_position,
            entry.last_position,
            entry.rows,
            entry.sha256,
        )


def current_month(now: datetime) -> date:
    return now.astimezone(UTC).date().replace(day=1)


async def archive(dsn: str, before: date, directory: Path, *, now: datetime | None = None) -> ArchiveReport:
    """Archive and detach every month partition whose whole range is before ``before``."""
    now = now or datetime.now(UTC)
    this_month = current_month(now)
    if before > this_month:
        raise ArchiveRefused(
            f"--before {before} would archive the current month ({this_month:%Y-%m}), which is still "
            f"being written; the latest possible is --before {this_month}"
        )
    limit = datetime(before.year, before.month, before.day, tzinfo=UTC)
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    report = ArchiveReport()
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        if not await conn.fetchval("select pg_try_advisory_lock($1, $2)", *ARCHIVE_LOCK):
            raise ArchiveRefused(
                "another `ledger archive` is running on this database; run again when it is done"
            )
        # read under the lock: what a run that just finished wrote is in it
        manifest = await asyncio.to_thread(load_manifest, directory)
        done = {e.partition: e for e in manifest.partitions}
        # rows that landed in the default partition go to their month first
        await ensure_partitions(conn)
        attached = await month_partitions(conn)
        names = {p.name for p in attached}
        report.already = sorted(n for n, e in done.items() if n not in names and e.range_end <= limit)
        for p in [p for p in attached if p.end <= limit]:
            previous = done.get(p.name)
            if previous is not None:
                rows, first, last = await _shape(conn, p.name)
                if (rows, first, last) != (previous.rows, previous.first_position, previous.last_position):
                    # not a rerun after a crash: the month was archived, and rows came back
                    raise ArchiveError(
                        f"{p.name} is in {directory / MANIFEST} already ({previous.rows} rows) but the "
                        f"live partition holds other rows ({rows}): the month was recreated after it "
                        "was archived; archive it to another directory"
                    )
            await _refuse_if_live(conn, p)
            entry = await _write_partition(conn, p, directory)
            done[p.name] = entry
            manifest.partitions = list(done.values())
            await asyncio.to_thread(
                save_manifest, directory, manifest
            )  # before the detach: the file is accounted for first
            try:
                await _detach(conn, entry)
            except asyncpg.LockNotAvailableError as e:
                raise ArchiveRefused(
                    f"{p.name} is written and listed in the manifest but still attached: a reader of "
                    f"the whole log held it past {LOCK_TIMEOUT}; run `ledger archive` again"
                ) from e
            log.info("partition_archived", partition=p.name, rows=entry.rows, file=entry.file)
            report.archived.append(entry)
    finally:
        await conn.close()
    return report


# ------------------------------------------------------------------ reading


class _FileCursor:
    """One archived file, read in position order a row group at a time."""

    def __init__(self, path: Path) -> None:
        self._batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(batch_size=_BATCH)
        self._buffer: list[RecordedEvent] = []
        self._at = 0

    def peek(self) -> RecordedEvent | None:
        while self._at >= len(self._buffer):
            batch = next(self._batches, None)
            if batch is None:
                return None
            cols = [batch.column(c).to_pylist() for c in _COLUMNS[:6]]
            self._buffer = [RecordedEvent(*row) for row in zip(*cols, strict=True)]
            self._at = 0
        return self._buffer[self._at]

    def pop(self) -> None:
        self._at += 1


class Archive:
    """The archived part of the log, as a manifest lists it (see :meth:`open`)."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.directory = directory
        self.manifest = manifest
        self._after = -1  # the last read's ``after`` (-1: none yet)
        self._cursors: list[_FileCursor] = []
        self._pending: list[RecordedEvent] = []  # read from the files, not yet consumed

    @classmethod
    async def open(cls, directory: Path) -> Archive:
        """The archive in ``directory``, every file checked against its manifest entry."""
        if not (directory / MANIFEST).exists():
            raise ArchiveError(f"{directory}: no {MANIFEST} (not an archive written by `ledger archive`)")
        manifest = load_manifest(directory)
        for entry in manifest.partitions:
            path = directory / entry.file
            if not path.exists():
                raise ArchiveError(f"{path}: listed in the manifest, missing")
            sha = await asyncio.to_thread(_file_sha256, path)
            if sha != entry.sha256:
                raise ArchiveError(
                    f"{path}: sha256 {sha} does not match the manifest's {entry.sha256} "
                    "(the file was changed or damaged)"
                )
        return cls(directory, manifest)

    @property
    def last_position(self) -> int:
        return max((e.last_position or 0 for e in self.manifest.partitions), default=0)

    @property
    def first_recorded_at(self) -> datetime | None:
        """When the archive's earliest month began (its first event is no earlier)."""
        return min((e.range_start for e in self.manifest.partitions if e.rows), default=None)

    def read(self, after: int, limit: int) -> list[RecordedEvent]:
        """Up to ``limit`` archived events with position > ``after``, in position order.
        Reads go forward; an ``after`` behind the last one starts the files again."""
        if self._after < 0 or after < self._after:
            self._cursors = [_FileCursor(self.directory / e.file) for e in self.manifest.partitions]
            self._pending = []
        self._after = after
        out = [e for e in self._pending if e.position > after][:limit]
        heap: list[tuple[int, int]] = []
        for i, c in enumerate(self._cursors):
            while (e := c.peek()) is not None and e.position <= after:
                c.pop()
            if e is not None:
                heap.append((e.position, i))
        heapq.heapify(heap)
        while heap and len(out) < limit:
            _, i = heapq.heappop(heap)
            c = self._cursors[i]
            e = c.peek()
            assert e is not None
            if not out or e.position > out[-1].position:
                out.append(e)
            c.pop()
            if (nxt := c.peek()) is not None:
                heapq.heappush(heap, (nxt.position, i))
        self._pending = out
        return out


async def read_log(
    conn: asyncpg.Connection[Any], after: int, limit: int, archive: Archive | None = None
) -> list[RecordedEvent]:
    """The log after ``after`` in position order: the live table, merged with the
    archive when there is one. Up to ``limit`` events."""
    live = await read_after(conn, after, limit)
    if archive is None:
        return live
    old = await asyncio.to_thread(archive.read, after, limit)
    if not old:
        return live
    # Each side is complete only up to its last event when it filled its limit.
    bound = min(
        old[-1].position if len(old) >= limit else 2**63,
        live[-1].position if len(live) >= limit else 2**63,
    )
    merged: dict[int, RecordedEvent] = {e.position: e for e in live if e.position <= bound}
    # a partition archived but not yet detached (a run that stopped in between) is in both
    merged.update((e.position, e) for e in old if e.position <= bound)
    return [merged[p] for p in sorted(merged)][:limit]
