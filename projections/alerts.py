"""The alerting worker: follows charges per budget window and raises threshold
and forecast alerts (each exactly once, see ledger/alerts.py). It owns no
tables, so it has nothing to replay; its checkpoint says how far it has looked.

A window's spend is read from the log the first time the worker meets the
window (every charge admitted in it, as of the event at hand, whatever
definition was in force: windows are about time), then followed in memory. A
failed batch reloads, so memory never runs ahead of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from ledger import events as ev
from ledger.alerts import check_window
from ledger.counters import tag_subject
from ledger.counters.log import charged_up_to
from ledger.store import EventStore, RecordedEvent
from ledger.tags import TagState
from projections.runtime import Projection

_CHARGES = ("SpendRecorded", "ReservationExpired")
_KEEP = 10_000  # windows followed in memory before the ended ones are forgotten


class Alerts(Projection):
    name = "alerts"
    tables = ()
    types = frozenset({*ev.TAG_EVENT_TYPES, *_CHARGES})

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.definitions: dict[str, TagState] = {}
        # (tag, budget epoch, window start, window end) -> spend so far
        self.spend: dict[tuple[str, int, datetime, datetime], Decimal] = {}
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

    def _forget_before(self, moment: datetime) -> None:
        """Drop windows that ended long ago (their spend is read again if a late
        charge ever needs it): memory stays bounded by the windows in use."""
        self.spend = {k: v for k, v in self.spend.items() if k[3] >= moment}

    def _define(self, r: RecordedEvent) -> None:
        event = ev.decode_tag(r)
        state = self.definitions.get(event.name) or TagState(name=event.name, version=0)
        self.definitions[event.name] = state.apply(event, r.version)

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        for r in events:
            if r.type in ev.TAG_EVENT_TYPES:
                self._define(r)
                continue
            e = ev.decode(r)
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
            for tag in e.budget_tags:
                state = self.definitions.get(tag)
                if state is None or not state.has_budget:
                    continue
                window = state.window(e.admitted_at)
                key = (tag, state.budget_epoch, window.start, window.end)
                before = self.spend.get(key)
                if before is None:
                    before = await charged_up_to(conn, tag_subject(tag), window, r.position - 1)
                after = before + e.cost
                self.spend[key] = after
                if len(self.spend) > _KEEP:
                    self._forget_before(e.admitted_at - timedelta(days=2))
                await check_window(self.store, state, window, before, after, e.admitted_at, self.raised)
