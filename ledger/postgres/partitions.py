"""The event log's month partitions (``sql/0050_partitioned_events.sql``): created
ahead by the application, at migrate time and by every gateway periodically
(``gateway/app.py``), so that an append lands in its month, not in the default
partition. Should rows land there anyway (no gateway ran for months, or an old
time written by hand), creating their month moves them into it: they never
block a partition from being created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = structlog.get_logger(__name__)

PARTITION_NAME = re.compile(r"^events_(\d{4})_(\d{2})$")
AHEAD = 2  # months created ahead of the current one
# Creating a month attaches it, which takes ACCESS EXCLUSIVE on the default
# partition (and so waits for every reader of the whole log: pg_dump, a long
# report) while the append lock is held: every append would wait as long.
LOCK_TIMEOUT = "1s"


async def ensure_partitions(conn: asyncpg.Connection[Any] | asyncpg.Pool, ahead: int = AHEAD) -> list[str]:
    """Create this month's and the next ``ahead`` months' partitions if missing
    (and move rows that landed in the default partition into theirs). Cheap when
    there is nothing to do: the append lock is only taken when something is."""
    needed = await conn.fetchval(
        "select exists (select 1 from events_traffic_default) or exists ("
        " select 1 from generate_series(0, $1::int) g where to_regclass('events_' || to_char("
        "  date_trunc('month', now() at time zone 'UTC') + make_interval(months => g), 'YYYY_MM')) is null)",
        ahead,
    )
    if not needed:
        return []
    try:
        if isinstance(conn, asyncpg.Pool):
            async with conn.acquire() as c:
                created = await _create(c, ahead)
        else:
            created = await _create(conn, ahead)
    except asyncpg.LockNotAvailableError:
        # months are created ahead: the next pass (hourly, or the next start) has time
        log.warning("event_partitions_deferred", reason=f"a lock was held past {LOCK_TIMEOUT}")
        return []
    if created:
        log.info("event_partitions_created", partitions=created)
    return created


async def _create(conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any], ahead: int) -> list[str]:
    async with conn.transaction():
        await conn.execute(f"set local lock_timeout = '{LOCK_TIMEOUT}'")
        return [r[0] for r in await conn.fetch("select * from ledger_ensure_event_partitions($1)", ahead)]


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start: datetime
    end: datetime


def month_partition(name: str) -> Partition | None:
    m = PARTITION_NAME.match(name)
    if m is None:
        return None
    year, month = int(m[1]), int(m[2])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return Partition(name, start, end)


async def month_partitions(conn: asyncpg.Connection[Any]) -> list[Partition]:
    """The month partitions attached to events_traffic, oldest first."""
    rows = await conn.fetch(
        "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
        "where i.inhparent = 'events_traffic'::regclass"
    )
    found = [p for r in rows if (p := month_partition(r[0])) is not None]
    return sorted(found, key=lambda p: p.start)
