"""The split allocation view: each charge's share per tag dimension and value."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal

import asyncpg

from ledger import events as ev
from ledger.domain.allocation import allocate
from ledger.events import RecordedEvent
from projections.rows import Row, copy_rows
from projections.runtime import Projection


class AllocationRow(Row, frozen=True):
    """One spend_allocations row."""

    position: int
    recorded_at: datetime
    dimension: str
    value: str
    share: Decimal


class SpendAllocations(Projection):
    """spend_allocations: what ``allocation=split`` reports sum."""

    name = "spend_allocations"
    tables = ("spend_allocations",)
    types = frozenset({"SpendRecorded", "ReservationExpired"})  # the kinds that charge

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        rows: list[AllocationRow] = []
        for r in events:
            e = ev.decode(r)
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
            for (dimension, value), share in allocate(e.cost, e.tags).items():
                rows.append(AllocationRow(r.position, r.recorded_at, dimension, value, share))
        await copy_rows(conn, tables["spend_allocations"], AllocationRow, rows)
