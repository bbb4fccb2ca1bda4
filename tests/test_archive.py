"""`ledger archive`: old months of the log to Parquet, detached; replay and verify
read the archive merged with the live partitions (sql/0050, ledger/postgres/archive.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow.parquet as pq
import pytest

from ledger import events as ev
from ledger.errors import ArchiveError, ArchiveRefused, ConcurrencyError
from ledger.postgres import archive as archiving
from ledger.postgres.archive import Archive, archive, current_month, load_manifest, read_log
from ledger.postgres.store import EventStore
from projections.replay import replay_all
from projections.spend import PROJECTIONS, create
from projections.verify import Report, verify_projection


def months_back(n: int) -> date:
    m = current_month(datetime.now(UTC))
    for _ in range(n):
        m = (m - timedelta(days=1)).replace(day=1)
    return m


def at(month: date, day: int, hour: int = 12) -> datetime:
    return datetime(month.year, month.month, day, hour, 0, 0, 123456, tzinfo=UTC)


THIS = months_back(0)
OLD = [months_back(3), months_back(2)]  # archived by the tests
TAGS = ["team:a", "team:b"]


async def _insert(conn: asyncpg.Connection, rows: list[tuple[str, int, ev.NewEvent, datetime]]) -> None:
    """History as the log holds it: the gateway only ever records "now", so past
    months are written directly (with the time they happened), through the
    triggers (append lock, stream heads)."""
    await conn.executemany(
        "insert into events (stream, version, type, data, recorded_at) values ($1, $2, $3, $4::jsonb, $5)",
        [(s, v, e.type, e.data.decode(), t) for s, v, e, t in rows],
    )


def _request(
    when: datetime, cost: str, tags: list[str], *, settled: bool = True, spent_at: datetime | None = None
):  # type: ignore[no-untyped-def]
    rid = uuid.uuid4().hex
    admitted = ev.RequestAdmitted(
        rid,
        when,
        Decimal(cost),
        when + timedelta(minutes=10),
        tags=tags,
        budget_tags=tags,
        model="gpt-4o-mini",
    )
    rows = [(f"request:{rid}", 1, ev.to_new(admitted), when)]
    if settled:
        spent = ev.SpendRecorded(
            rid,
            when,
            Decimal(cost),
            tags=tags,
            budget_tags=tags,
            model="gpt-4o-mini",
            provider="mock",
            metadata={"n": 1.50, "note": "ünïcode ✓"},
            prompt_tokens=12,
            completion_tokens=34,
            status=200,
        )
        rows.append((f"request:{rid}", 2, ev.to_new(spent), spent_at or when))
    return rid, rows


async def seed(store: EventStore, database_url: str) -> int:
    """Definitions through the store (the books: never archived), traffic in two
    past months and this one; returns how many traffic events the past months hold."""
    for tag in TAGS:
        created = ev.TagCreated(
            name=tag, at=at(OLD[0], 1, 0), max_budget=Decimal("100"), budget_duration="30d"
        )
        await store.append(ev.stream_of_tag(tag), 0, [ev.to_new(created)])
    conn = await asyncpg.connect(database_url)
    old = 0
    try:
        for month in OLD:
            rows: list[Any] = []
            for i in range(40):
                _, r = _request(at(month, 1 + i % 27, i % 24), f"0.00{i + 1}5", [TAGS[i % 2]])
                rows += r
            denied = ev.RequestDenied(
                uuid.uuid4().hex,
                at(month, 3),
                "team:a",
                Decimal("1"),
                Decimal("0"),
                Decimal("2"),
                Decimal("100"),
            )
            rows.append((f"denied:{denied.request_id}", 1, ev.to_new(denied), at(month, 3)))
            old += len(rows)
            await _insert(conn, rows)
        # admitted in the last archived month, settled this month: the two halves part
        _, r = _request(at(OLD[1], 28, 23), "0.5", ["team:a"], spent_at=at(THIS, 1, 0))
        await _insert(conn, r[:1])
        old += 1
        await _insert(conn, r[1:])
        # rows of months with no partition landed in the default one: their month is created, they move
        assert await conn.fetchval("select count(*) from events_traffic_default") == old
        await conn.execute("select ledger_ensure_event_partitions(2)")
        assert await conn.fetchval("select count(*) from events_traffic_default") == 0
    finally:
        await conn.close()
    for i in range(10):  # this month, through the store
        _, r = _request(datetime.now(UTC), "0.01", [TAGS[i % 2]])
        for stream, version, event, _t in r:
            await store.append(stream, version - 1, [event])
    return old


async def views(database_url: str) -> dict[str, list[str]]:
    """Every projection table, as sorted row texts."""
    conn = await asyncpg.connect(database_url)
    try:
        out = {}
        for name in PROJECTIONS:
            for table in create(name).tables:
                rows = await conn.fetch(f"select t::text from public.{table} t")  # noqa: S608
                out[table] = sorted(r[0] for r in rows)
        return out
    finally:
        await conn.close()


async def rebuild(database_url: str, archive_dir: Path | None = None) -> dict[str, list[str]]:
    a = await Archive.open(archive_dir) if archive_dir is not None else None
    await replay_all(database_url, [create(n) for n in PROJECTIONS], archive=a)
    return await views(database_url)


async def test_archive_then_replay_from_the_archive_gives_the_same_views(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    old = await seed(store, database_url)
    before = await rebuild(database_url)
    assert sum(len(rows) for rows in before.values()) > 100

    report = await archive(database_url, THIS, tmp_path)
    assert [e.partition for e in report.archived] == [f"events_{m:%Y_%m}" for m in OLD]
    assert sum(e.rows for e in report.archived) == old
    manifest = load_manifest(tmp_path)
    for entry in manifest.partitions:
        table = pq.read_table(tmp_path / entry.file)
        assert table.num_rows == entry.rows
        assert table.column("position").to_pylist() == sorted(table.column("position").to_pylist())
        assert (entry.first_position, entry.last_position) == (
            table.column("position")[0].as_py(),
            table.column("position")[-1].as_py(),
        )
        assert str(table.schema.field("recorded_at").type) == "timestamp[us, tz=UTC]"
    conn = await asyncpg.connect(database_url)
    try:
        for entry in manifest.partitions:
            assert await conn.fetchval("select to_regclass($1)", entry.partition) is None
        live = await conn.fetchval("select count(*) from events where stream like 'request:%'")
    finally:
        await conn.close()
    assert live == 2 * 10 + 1  # this month's requests and the settlement that crossed over

    # the live log alone no longer gives those views, so a rebuild from it alone is
    # refused (it would count too little); archive + live gives them, exactly
    with pytest.raises(ArchiveError, match=r"were archived .* no archive was given: pass --archive"):
        await rebuild(database_url)
    assert await rebuild(database_url, tmp_path) == before
    # and verify agrees with the views, reading the same archive
    result = Report()
    a = await Archive.open(tmp_path)
    for name in PROJECTIONS:
        await verify_projection(database_url, create(name), result, archive=a)
    assert result.ok, result.drifts
    # an exact copy: jsonb text, timestamps to the microsecond
    conn = await asyncpg.connect(database_url)
    try:
        merged = await read_log(conn, 0, 100_000, await Archive.open(tmp_path))
    finally:
        await conn.close()
    spent = [e for e in merged if e.type == "SpendRecorded" and e.recorded_at < at(THIS, 1, 0)]
    assert spent
    assert all('"note": "ünïcode ✓"' in e.data and '"n": 1.5' in e.data for e in spent)
    assert all(e.recorded_at.microsecond == 123456 for e in spent)


async def test_a_tampered_file_is_refused(store: EventStore, database_url: str, tmp_path: Path) -> None:
    await seed(store, database_url)
    await rebuild(database_url)
    await archive(database_url, THIS, tmp_path)
    entry = load_manifest(tmp_path).partitions[0]
    path = tmp_path / entry.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="sha256"):
        await Archive.open(tmp_path)
    path.unlink()
    with pytest.raises(ArchiveError, match="missing"):
        await Archive.open(tmp_path)


async def test_a_rerun_after_a_crash_between_write_and_detach_neither_loses_nor_duplicates(
    store: EventStore, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await seed(store, database_url)
    before = await rebuild(database_url)

    async def crash(*_: object) -> None:
        raise RuntimeError("killed between write and detach")

    with monkeypatch.context() as m:
        m.setattr(archiving, "_detach", crash)
        with pytest.raises(RuntimeError):
            await archive(database_url, THIS, tmp_path)
    # written and listed, still attached: both in the archive and live
    assert [e.partition for e in load_manifest(tmp_path).partitions] == [f"events_{OLD[0]:%Y_%m}"]
    assert await rebuild(database_url, tmp_path) == before  # read once each, not twice

    report = await archive(database_url, THIS, tmp_path)
    assert len(report.archived) == 2
    again = await archive(database_url, THIS, tmp_path)
    assert again.archived == []
    assert again.already == [f"events_{m:%Y_%m}" for m in OLD]
    manifest = load_manifest(tmp_path)
    assert len(manifest.partitions) == 2
    assert sum(e.rows for e in manifest.partitions) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", *(f"events_{m:%Y_%m}.parquet" for m in OLD)]
    )
    assert await rebuild(database_url, tmp_path) == before


async def test_appends_after_archiving_keep_positions_gap_free_and_versions_exact(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    await seed(store, database_url)
    await rebuild(database_url)
    await archive(database_url, THIS, tmp_path)
    a = await Archive.open(tmp_path)
    archived = pq.read_table(tmp_path / a.manifest.partitions[0].file)
    stream = archived.column("stream")[0].as_py()
    # the stream's events are archived, its head is not: the version check still holds
    with pytest.raises(ConcurrencyError) as info:
        await store.append(stream, 0, [ev.NewEvent("Tested", b"{}")])
    assert info.value.actual_version == 2
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.pool.execute(
            "insert into events (stream, version, type, data) values ($1, 2, 'X', '{}')", stream
        )
    [position] = await store.append("request:after-archive", 0, [ev.NewEvent("Tested", b"{}")])
    conn = await asyncpg.connect(database_url)
    try:
        every = await read_log(conn, 0, 100_000, a)
    finally:
        await conn.close()
    positions = [e.position for e in every]
    # only the direct insert refused above drew a number it never used
    assert positions[-1] == position
    assert set(range(1, position + 1)) - set(positions) == {position - 1}
    assert positions == sorted(set(positions))


async def test_refusals(store: EventStore, database_url: str, tmp_path: Path) -> None:
    await seed(store, database_url)
    with pytest.raises(ArchiveRefused, match="current month"):
        await archive(database_url, THIS + timedelta(days=1), tmp_path)
    conn = await asyncpg.connect(database_url)
    try:
        # a projection that has not read the old months yet
        await conn.execute("insert into projection_checkpoints (name, position) values ('spend_logs', 3)")
        with pytest.raises(ArchiveRefused, match="spend_logs"):
            await archive(database_url, THIS, tmp_path)
        await conn.execute("delete from projection_checkpoints")
        # an admission the sweeper has yet to settle
        rid, r = _request(at(OLD[0], 20), "0.3", ["team:b"], settled=False)
        await _insert(conn, r)
        with pytest.raises(ArchiveRefused, match=rf"admission.*request:{rid}"):
            await archive(database_url, THIS, tmp_path)
        assert await conn.fetchval("select to_regclass($1)", f"events_{OLD[0]:%Y_%m}") is not None
    finally:
        await conn.close()


async def test_the_commands(store: EventStore, database_url: str, redis_url: str, tmp_path: Path) -> None:
    from tests.test_cli import ledger, ledger_here

    await seed(store, database_url)
    await rebuild(database_url)
    env = {"LEDGER_DATABASE_URL": database_url, "LEDGER_REDIS_URL": redis_url}

    def here(*args: str, **extra: str) -> tuple[int, str, str]:
        return ledger_here(*args, env={**env, **extra})

    code, _, err = await asyncio.to_thread(
        here, "archive", "--before", f"{THIS + timedelta(days=1)}", "--to", str(tmp_path)
    )
    assert code == 1
    assert "current month" in err
    # once as a real process, as an operator runs it
    done = await asyncio.to_thread(ledger, "archive", "--before", f"{THIS}", "--to", str(tmp_path), env=env)
    assert done.returncode == 0, done.stderr
    assert f"events_{OLD[0]:%Y_%m}: " in done.stdout
    assert "detached" in done.stdout
    code, out, _ = await asyncio.to_thread(here, "archive", "--before", f"{THIS}", "--to", str(tmp_path))
    assert code == 0
    assert "nothing to archive" in out
    code, _, err = await asyncio.to_thread(here, "verify")
    assert code == 1
    assert "were archived" in err
    code, out, err = await asyncio.to_thread(here, "verify", "--archive", str(tmp_path))
    assert code == 0, out + err
    assert "checksums match" in out
    code, _, err = await asyncio.to_thread(here, "replay", "--all", LEDGER_ARCHIVE_DIR=str(tmp_path))
    assert code == 0, err
    (tmp_path / f"events_{OLD[0]:%Y_%m}.parquet").write_bytes(b"not parquet")
    code, _, err = await asyncio.to_thread(here, "verify", "--archive", str(tmp_path))
    assert code == 1
    assert "does not match the manifest" in err
