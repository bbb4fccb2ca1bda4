"""The alerting worker: follows charges per budget window and raises threshold
and forecast alerts (each exactly once, see ledger/alerts.py). It owns no
tables, so it has nothing to replay; its checkpoint says how far it has looked."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from ledger import events as ev
from ledger.alerts import check_window
from ledger.store import EventStore, RecordedEvent
from ledger.tags import TagState
from ledger.windows import Window
from projections.runtime import Projection

_CHARGES = ("SpendRecorded", "ReservationExpired")
_HORIZON = timedelta(days=62)  # covers every calendar window that can still be current


class Alerts(Projection):
    name = "alerts"
    tables = ()
    types = frozenset({*ev.TAG_EVENT_TYPES, *_CHARGES})

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.definitions: dict[str, TagState] = {}
        self.spend: dict[tuple[str, datetime], Decimal] = {}
        self.raised: set[str] = set()  # alert streams that exist: never appended again

    async def load(self, conn: asyncpg.Connection, position: int) -> None:
        self.definitions, self.spend = {}, {}
        self.raised = {
            r[0]
            for r in await conn.fetch(
                "select stream from events where type = any($1::text[])", list(ev.ALERT_TYPES)
            )
        }
        rows = await conn.fetch(
            "select position, stream, version, type, data::text, recorded_at from events "
            "where type = any($1::text[]) and position <= $2 order by position",
            list(ev.TAG_EVENT_TYPES),
            position,
        )
        for r in rows:
            self._define(RecordedEvent(r[0], r[1], r[2], r[3], r[4], r[5]))
        rows = await conn.fetch(
            "select position, stream, version, type, data::text, recorded_at from events "
            "where type = any($1::text[]) and position <= $2 "
            "and jsonb_array_length(data->'budget_tags') > 0 "
            "and (data->>'admitted_at')::timestamptz >= $3 order by position",
            list(_CHARGES),
            position,
            datetime.now(UTC) - _HORIZON,
        )
        for r in rows:
            self._charge(RecordedEvent(r[0], r[1], r[2], r[3], r[4], r[5]))

    def _define(self, r: RecordedEvent) -> None:
        event = ev.decode_tag(r)
        state = self.definitions.get(event.name) or TagState(name=event.name, version=0)
        self.definitions[event.name] = state.apply(event, r.version)

    def _charge(self, r: RecordedEvent) -> list[tuple[TagState, Window, Decimal, Decimal, datetime]]:
        e = ev.decode(r)
        assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
        moved: list[tuple[TagState, Window, Decimal, Decimal, datetime]] = []
        for tag in e.budget_tags:
            state = self.definitions.get(tag)
            if state is None or not state.has_budget:
                continue
            window = state.window(e.admitted_at)
            key = (tag, window.start)
            before = self.spend.get(key, Decimal(0))
            after = before + e.cost
            self.spend[key] = after
            moved.append((state, window, before, after, e.admitted_at))
        return moved

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        for r in events:
            if r.type in ev.TAG_EVENT_TYPES:
                self._define(r)
                continue
            for state, window, before, after, at in self._charge(r):
                await check_window(self.store, state, window, before, after, at, self.raised)
