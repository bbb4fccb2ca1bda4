"""Numbered plain-SQL migrations (``sql/NNNN_name.sql``).

Each file is applied once, in order, in its own transaction, and recorded with
its SHA-256 in ``schema_migrations``. A file changed after it was applied is
refused. A session-level advisory lock makes concurrent migrators safe: the
second waits, then finds everything applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from ledger.errors import MigrationError, StoreUnavailable
from ledger.postgres.partitions import ensure_partitions

log = structlog.get_logger(__name__)

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Distinct from the append lock (4242, 1).
_MIGRATION_LOCK = (4242, 0)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_dir() -> Path:
    """The migrations folder: inside the wheel (``ledger/sql``), or at the
    repository root (this module is ``ledger/postgres/migrations.py``)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "sql", package.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise MigrationError(f"no sql/ folder found next to {package}")


def load(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    migrations: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        m = _FILE_RE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        migrations.append(Migration(int(m[1]), m[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {directory}")
    return migrations


async def migrate(dsn: str, directory: Path | None = None, *, timeout: float = 10.0) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    migrations = load(directory)
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresConnectionError) as e:
        raise StoreUnavailable(f"cannot connect to PostgreSQL to migrate: {e}") from e
    try:
        return await _migrate(conn, migrations)
    finally:
        await conn.close()


async def _migrate(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute("select pg_advisory_lock($1, $2)", *_MIGRATION_LOCK)
    try:
        await conn.execute(
            """
            create table if not exists schema_migrations (
                version    integer primary key,
                name       text not null,
                checksum   text not null,
                applied_at timestamptz not null default now()
            )
            """
        )
        applied = {r["version"]: r for r in await conn.fetch("select * from schema_migrations")}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(
                f"database has migrations {unknown} that this version does not know; "
                "refusing to run an older release against a newer schema"
            )
        done: list[str] = []
        for m in migrations:
            row = applied.get(m.version)
            label = f"{m.version:04d}_{m.name}.sql"
            if row is not None:
                if row["checksum"] != m.checksum:
                    raise MigrationError(
                        f"{label} was changed after it was applied "
                        f"(applied checksum {row['checksum'][:12]}, file {m.checksum[:12]}); "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                try:
                    await conn.execute(m.sql)
                except asyncpg.PostgresError as e:
                    raise MigrationError(f"{label} failed: {e}") from e
                await conn.execute(
                    "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            log.info("migration_applied", migration=label)
            done.append(label)
        # every migrate (`ledger migrate`, each `ledger dev` start and operator command) also
        # creates the coming months' partitions; gateways do it at start and hourly
        if await conn.fetchval("select to_regproc('ledger_ensure_event_partitions') is not null"):
            await ensure_partitions(conn)
        return done
    finally:
        await conn.execute("select pg_advisory_unlock($1, $2)", *_MIGRATION_LOCK)
