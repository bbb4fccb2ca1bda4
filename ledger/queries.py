"""Read-side queries the gateway serves. The SQL of each answer lives here, once.

Totals are computed from the event log for now; the projections issue moves
them onto maintained views behind these same functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from ledger.errors import StoreUnavailable


@dataclass(frozen=True, slots=True)
class TagTotals:
    total_spend: Decimal
    request_count: int


_TAG_TOTALS = """
select t.name,
       coalesce(sum((e.data->>'cost')::numeric), 0) as spend,
       count(e.position) as requests
from unnest($1::text[]) as t(name)
left join events e
  on e.type in ('SpendRecorded', 'ReservationExpired') and e.data->'tags' ? t.name
group by t.name
"""


async def tag_totals(pool: asyncpg.Pool, names: list[str]) -> dict[str, TagTotals]:
    """All-time spend and request count of each tag (every request carrying it)."""
    try:
        rows = await pool.fetch(_TAG_TOTALS, names)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as e:
        raise StoreUnavailable(f"PostgreSQL unavailable: {e}") from e
    return {r["name"]: TagTotals(Decimal(r["spend"]), int(r["requests"])) for r in rows}
