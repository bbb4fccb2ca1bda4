"""The split allocation view: each charge's share per tag dimension and value."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from ledger import events as ev
from ledger.allocation import allocate
from ledger.store import RecordedEvent
from projections.runtime import Projection

_COLUMNS = ("position", "recorded_at", "dimension", "value", "share")


class SpendAllocations(Projection):
    """spend_allocations: what ``allocation=split`` reports sum."""

    name = "spend_allocations"
    tables = ("spend_allocations",)
    types = frozenset({"SpendRecorded", "ReservationExpired"})  # the kinds that charge

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        rows = []
        for r in events:
            e = ev.decode(r)
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
            for (dimension, value), share in allocate(e.cost, e.tags).items():
                rows.append((r.position, r.recorded_at, dimension, value, share))
        if rows:
            schema, _, table = tables["spend_allocations"].rpartition(".")
            await conn.copy_records_to_table(
                table, records=rows, columns=_COLUMNS, schema_name=schema or None
            )
