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
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from ledger import events as ev
from ledger.alerts import check_window
from ledger.counters.log import charged_up_to
from ledger.events import RecordedEvent
from ledger.postgres.store import EventStore
from ledger.subjects import DEFINITION_TYPES, Definitions
from projections.runtime import Projection

_CHARGES = ("SpendRecorded", "ReservationExpired")
_KEEP = 10_000
_DEFINITIONS = frozenset(DEFINITION_TYPES)  # windows followed in memory before the ended ones are forgotten


class Alerts(Projection):
    name = "alerts"
    tables = ()
    types = frozenset({*DEFINITION_TYPES, *_CHARGES})

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.definitions = Definitions()
        # (subject, budget epoch, window start, window end) -> spend so far
        self.spend: dict[tuple[str, int, datetime, datetime], Decimal] = {}
        self.raised: set[str] = set()  # alert streams that exist: never appended again

    async def load(self, conn: asyncpg.Connection, position: int) -> None:
        self.definitions, self.spend = Definitions(), {}
        self.raised = {
            r[0]
            for r in await conn.fetch(
                "select stream from events where type = any($1::text[])", list(ev.ALERT_TYPES)
            )
        }
        rows = await conn.fetch(
            "select position, stream, version, type, data::text, recorded_at from events "
            "where type = any($1::text[]) and position <= $2 order by position",
            list(DEFINITION_TYPES),
            position,
        )
        for r in rows:
            self.definitions.apply(RecordedEvent(r[0], r[1], r[2], r[3], r[4], r[5]))

    def _forget_before(self, moment: datetime) -> None:
        """Drop windows that ended long ago (their spend is read again if a late
        charge ever needs it): memory stays bounded by the windows in use."""
        self.spend = {k: v for k, v in self.spend.items() if k[3] >= moment}

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        for r in events:
            if r.type in _DEFINITIONS:
                self.definitions.apply(r)
                continue
            e = ev.decode(r)
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
            for tag in e.budget_tags:  # alerts are about tags (their thresholds, soft budgets)
                spec = self.definitions.tag(tag)
                budget = spec.budget(e.admitted_at) if spec is not None else None
                if spec is None or budget is None:
                    continue
                if budget.since is not None and e.admitted_at < budget.since:
                    continue  # before a spend reset: it does not count
                key = (spec.subject, spec.epoch, budget.window.start, budget.window.end)
                before = self.spend.get(key)
                if before is None:
                    before = await charged_up_to(conn, budget, r.position - 1)
                after = before + e.cost
                self.spend[key] = after
                if len(self.spend) > _KEEP:
                    self._forget_before(e.admitted_at - timedelta(days=2))
                # a template's thresholds and soft budget, under this tag's name
                state = replace(self.definitions.tags[spec.source or tag], name=tag)
                await check_window(
                    self.store, state, budget.window, before, after, e.admitted_at, self.raised
                )
