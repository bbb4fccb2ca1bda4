"""Migrations: applied once, in order, checksummed, safe to run concurrently."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from ledger.errors import MigrationError
from ledger.postgres.migrations import load, migrate, sql_dir


async def applied(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select version, name from schema_migrations order by version")
    finally:
        await conn.close()
    return [f"{r['version']:04d}_{r['name']}.sql" for r in rows]


def test_migration_files_are_numbered_in_order() -> None:
    migrations = load()
    assert migrations[0].version == 1
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)


async def test_first_run_applies_all_and_rerun_is_a_no_op(empty_database_url: str) -> None:
    names = [f"{m.version:04d}_{m.name}.sql" for m in load()]
    assert await migrate(empty_database_url) == names
    assert await migrate(empty_database_url) == []
    assert await applied(empty_database_url) == names
    conn = await asyncpg.connect(empty_database_url)
    try:
        cols = {
            r["column_name"]: r["data_type"]
            for r in await conn.fetch(
                "select column_name, data_type from information_schema.columns where table_name = 'events'"
            )
        }
    finally:
        await conn.close()
    assert cols == {
        "position": "bigint",
        "stream": "text",
        "version": "integer",
        "type": "text",
        "data": "jsonb",
        "recorded_at": "timestamp with time zone",
        "tx": "xid8",
    }


async def test_changed_applied_file_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    await migrate(empty_database_url, folder)
    first = sorted(folder.glob("0001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after the fact\n")
    with pytest.raises(MigrationError, match=r"0001_events\.sql was changed after it was applied"):
        await migrate(empty_database_url, folder)


async def test_new_file_is_applied_in_its_own_transaction(empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    await migrate(empty_database_url, folder)
    (folder / "9001_broken.sql").write_text("create table half_done (x int);\nselect 1/0;\n")
    with pytest.raises(MigrationError, match=r"9001_broken\.sql failed"):
        await migrate(empty_database_url, folder)
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("select to_regclass('half_done')") is None
    finally:
        await conn.close()
    assert "9001_broken.sql" not in await applied(empty_database_url)


async def test_badly_named_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "first.sql").write_text("select 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        load(tmp_path)


async def test_unknown_applied_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    (folder / "9002_extra.sql").write_text("select 1;")
    await migrate(empty_database_url, folder)
    with pytest.raises(MigrationError, match="does not know"):
        await migrate(empty_database_url)


async def test_concurrent_migrators(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(4)))
    names = [f"{m.version:04d}_{m.name}.sql" for m in load()]
    assert sorted(n for r in results for n in r) == sorted(names)  # each applied exactly once
    assert await applied(empty_database_url) == names


async def test_partitioning_the_log_keeps_every_row_of_an_existing_install(
    empty_database_url: str, tmp_path: Path
) -> None:
    """0050 on a log that has rows: each row keeps its position, time, tx and data,
    lands in its month (or the books), and appends go on after the last position."""
    folder = tmp_path / "sql"
    folder.mkdir()
    for path in sql_dir().glob("*.sql"):
        if int(path.name[:4]) < 50:
            shutil.copy(path, folder)
    await migrate(empty_database_url, folder)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            """insert into events (stream, version, type, data, recorded_at) values
               ('request:a', 1, 'RequestAdmitted', '{"n": 1.50}', '2025-10-31 23:59:59.999999+00'),
               ('tag:t', 1, 'TagCreated', '{"name": "t"}', '2025-10-01 00:00:00+00'),
               ('request:a', 2, 'SpendRecorded', '{"cost": "0.10"}', '2025-11-01 00:00:00+00'),
               ('denied:d', 1, 'RequestDenied', '{}', '2024-02-29 12:00:00+00')"""
        )
        with pytest.raises(asyncpg.UniqueViolationError):  # rolled back: draws a position
            await conn.execute(
                "insert into events (stream, version, type, data) values ('tag:t', 1, 'X', '{}')"
            )
        every = "select position, stream, version, type, data::text, recorded_at, tx::text from events"
        before = await conn.fetch(f"{every} order by position")
        applied = await migrate(empty_database_url)
        assert applied == ["0050_partitioned_events.sql", "0051_archived_months.sql"]
        after = await conn.fetch(f"{every} order by position")
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        where = await conn.fetch("select position, tableoid::regclass::text from events order by position")
        assert [r[1] for r in where] == ["events_2025_10", "events_books", "events_2025_11", "events_2024_02"]
        assert await conn.fetchval("select relkind::text from pg_class where relname = 'events'") == "p"
        heads = {r[0]: r[1] for r in await conn.fetch("select stream, version from stream_heads")}
        assert heads == {"request:a": 2, "tag:t": 1, "denied:d": 1}
        # appends go on: past every number drawn before, versions still checked
        rows = await conn.fetch(
            "select * from ledger_append_batch(array['request:a', 'tag:t'], array[1, 1], array[1, 1], "
            "array['X', 'Y'], array['{}', '{}'], 'test')"
        )
        assert [(r["stream"], r["version"], r["position"], r["refused"]) for r in rows] == [
            ("request:a", 2, None, 1),
            ("tag:t", 2, 6, None),
        ]
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "insert into events (stream, version, type, data) values ('request:a', 2, 'X', '{}')"
            )
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("delete from events_2025_10")
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("update events set type = 'Y'")
    finally:
        await conn.close()
