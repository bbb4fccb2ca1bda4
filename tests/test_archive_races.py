"""The partitioned log and `ledger archive` under the races a running install
meets: a long reader at the month rollover, two archive runs at once, a replay
while a month is archived. Interleavings are forced with hooks (the other party
runs whole at a chosen point), not sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ledger.errors import ArchiveRefused
from ledger.events import NewEvent
from ledger.postgres import archive as archiving
from ledger.postgres.archive import archive, load_manifest
from ledger.postgres.partitions import ensure_partitions
from ledger.postgres.store import EventStore
from projections import replay as replaying
from projections.replay import replay_all
from projections.spend import PROJECTIONS, create
from tests.test_archive import OLD, THIS, rebuild, seed, views


async def _until_waiting(watcher: asyncpg.Connection, pid: int) -> None:
    """Until backend ``pid`` waits for a lock."""
    while not await watcher.fetchval(
        "select exists (select 1 from pg_locks where pid = $1 and not granted)", pid
    ):
        await asyncio.sleep(0.01)


async def test_creating_next_months_partition_does_not_hold_appends_behind_a_long_reader(
    store: EventStore, database_url: str
) -> None:
    """At a month rollover every gateway creates a partition (attach: ACCESS
    EXCLUSIVE on the default partition) while holding the append lock. A long
    reader of the log (pg_dump, a report, verify) must not stall every append
    behind it for as long as it reads."""
    reader = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    creator = await asyncpg.connect(database_url)
    tx = reader.transaction()
    await tx.start()
    ensure: asyncio.Task[list[str]] | None = None
    append: asyncio.Task[list[int]] | None = None
    try:
        await reader.fetchval("select count(*) from events")  # holds ACCESS SHARE on every partition
        ensure = asyncio.create_task(ensure_partitions(creator, ahead=3))  # a month to create
        await _until_waiting(watcher, creator.get_server_pid())
        append = asyncio.create_task(store.append("request:at-rollover", 0, [NewEvent("Tested", b"{}")]))
        done, _ = await asyncio.wait({append}, timeout=4.0)  # the store gives up at 5 s
        assert append in done, "an append waited behind the partition creator, itself behind a reader"
    finally:
        await tx.rollback()
        for task in (ensure, append):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        for c in (reader, watcher, creator):
            await c.close()


async def test_two_archive_runs_at_once_keep_every_detached_month_in_the_manifest(
    store: EventStore, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run B reads the manifest, then run A archives the older month whole (cron
    and an operator, or two cron hosts); B then archives the newer one. Every
    month dropped from PostgreSQL must stay listed, or replay --archive silently
    leaves it out."""
    await seed(store, database_url)
    before = await rebuild(database_url)
    real = archiving.ensure_partitions
    other: list[object] = []

    async def interleaved(conn: Any, *args: Any, **kwargs: Any) -> list[str]:
        if not other:
            other.append("running")
            try:  # the other run, whole, at this point of this one
                other[0] = await archive(database_url, OLD[1], tmp_path)
            except ArchiveRefused as e:
                other[0] = e
        return await real(conn, *args, **kwargs)

    monkeypatch.setattr(archiving, "ensure_partitions", interleaved)
    await archive(database_url, THIS, tmp_path)

    conn = await asyncpg.connect(database_url)
    try:
        gone = [
            f"events_{m:%Y_%m}"
            for m in OLD
            if await conn.fetchval("select to_regclass($1)", f"events_{m:%Y_%m}") is None
        ]
    finally:
        await conn.close()
    assert gone == [f"events_{m:%Y_%m}" for m in OLD]
    assert sorted(e.partition for e in load_manifest(tmp_path).partitions) == gone
    assert await rebuild(database_url, tmp_path) == before


async def test_a_replay_reading_while_a_month_is_archived_does_not_swap_in_views_without_it(
    store: EventStore, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ledger archive` (cron) detaches a month while `ledger replay` is reading the
    log from the start: the replay must not swap in views that never saw it."""
    await seed(store, database_url)
    before = await rebuild(database_url)
    real = replaying.read_log
    archived: list[object] = []

    async def read(conn: Any, after: int, limit: int, a: Any = None) -> Any:
        if not archived:
            archived.append("running")
            try:  # the archive run, whole, once the replay has started reading
                archived[0] = await archive(database_url, THIS, tmp_path)
            except ArchiveRefused as e:
                archived[0] = e
        return await real(conn, after, limit, a)

    monkeypatch.setattr(replaying, "read_log", read)
    await replay_all(database_url, [create(n) for n in PROJECTIONS], batch_size=50)
    assert await views(database_url) == before


async def test_a_stream_version_exists_once_across_partitions_processes_and_a_move(database_url: str) -> None:
    """Held: version 1 of a stream sits in the default partition (its month had no
    partition); two processes race to append version 2 while the month is created
    and the row moved; every version exists once, in one partition."""
    from ledger.errors import ConcurrencyError
    from ledger.settings import Settings

    conn = await asyncpg.connect(database_url)
    a = await EventStore.open(Settings.from_dsn(database_url))
    b = await EventStore.open(Settings.from_dsn(database_url))
    try:
        await conn.execute(
            "insert into events (stream, version, type, data, recorded_at) "
            "values ('request:old', 1, 'RequestAdmitted', '{}', '2020-02-29 23:59:59.999999+00')"
        )
        assert await conn.fetchval("select count(*) from events_traffic_default") == 1
        event = [NewEvent("Tested", b"{}")]
        results = await asyncio.gather(
            *(s.append("request:old", 1, event) for s in (a, b) for _ in range(5)),
            ensure_partitions(conn),
            *(s.append("request:old", 0, event) for s in (a, b)),
            return_exceptions=True,
        )
        appended = [r for r in results[:10] + results[11:] if isinstance(r, list)]
        assert len(appended) == 1
        assert all(isinstance(r, ConcurrencyError) for r in results[:10] + results[11:] if r not in appended)
        assert results[10] == ["events_2020_02"]
        rows = await conn.fetch(
            "select version, tableoid::regclass::text from events "
            "where stream = 'request:old' order by version"
        )
        assert [r[0] for r in rows] == [1, 2]
        assert rows[0][1] == "events_2020_02"
        assert await conn.fetchval("select version from stream_heads where stream = 'request:old'") == 2
        for version in (1, 2):
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(
                    "insert into events (stream, version, type, data, recorded_at) "
                    "values ('request:old', $1, 'X', '{}', '2020-02-10+00')",
                    version,
                )
    finally:
        await a.close()
        await b.close()
        await conn.close()


async def test_a_detach_behind_a_long_reader_gives_up_and_leaves_appends_alone(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    """The detach holds the append lock while it waits for its table locks; behind
    a reader of the month (a report, pg_dump) it gives up within a second with a
    refusal that says to run again, and appends meanwhile get through."""
    await seed(store, database_url)
    await rebuild(database_url)
    reader = await asyncpg.connect(database_url)
    watcher = await asyncpg.connect(database_url)
    tx = reader.transaction()
    await tx.start()
    try:
        month = f"events_{OLD[0]:%Y_%m}"
        await reader.fetchval(f"select count(*) from {month}")  # noqa: S608 - our own partition name; ACCESS SHARE until rollback
        run = asyncio.create_task(archive(database_url, THIS, tmp_path))
        # until the detach waits for its lock on the month (holding the append lock)
        while not await watcher.fetchval(
            "select exists (select 1 from pg_locks where not granted and relation = to_regclass($1))", month
        ):
            assert not run.done(), run.exception() if not run.cancelled() else "cancelled"
            await asyncio.sleep(0.01)
        append = asyncio.create_task(store.append("request:while-detaching", 0, [NewEvent("Tested", b"{}")]))
        done, _ = await asyncio.wait({append}, timeout=4.0)  # the store gives up at 5 s
        assert append in done, "an append waited behind a detach, itself behind a reader"
        with pytest.raises(ArchiveRefused, match="run `ledger archive` again"):
            await run
    finally:
        await tx.rollback()
        await reader.close()
        await watcher.close()
    # the month is written, listed and still attached: the rerun finishes it
    assert f"events_{OLD[0]:%Y_%m}" in {e.partition for e in load_manifest(tmp_path).partitions}
    report = await archive(database_url, THIS, tmp_path)
    assert {e.partition for e in report.archived} >= {f"events_{OLD[0]:%Y_%m}"}
