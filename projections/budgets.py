"""The budget windows view: what counter rebuilds and the sweeper read.

* ``budget_charges``: one row per charge and budgeted subject.
* ``budget_window_spend``: totals per subject and window of the definition in
  force. When a definition changes how time is cut (its budget epoch moves),
  the window that contains the change is summed from ``budget_charges`` once,
  so it holds every charge admitted within it, whatever definition was in force
  then (windows are about time, not definitions).
* ``budget_epochs``: the epoch applied per subject; a rebuild trusts a window
  row only under the same epoch (else it sums ``budget_charges`` itself).
* ``open_reservations``: admissions without a terminal event.

See ``ledger/counters/log.py`` for the queries that read these tables.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from ledger import events as ev
from ledger.counters import tag_subject
from ledger.money import to_nanos
from ledger.store import RecordedEvent
from ledger.tags import TagState
from projections.runtime import Projection

_REQUEST_TYPES = ("RequestAdmitted", "SpendRecorded", "ReservationExpired", "RequestReleased")


@dataclass(slots=True)
class _Window:
    spend: Decimal = Decimal(0)
    nanos: int = 0
    requests: int = 0


@dataclass(slots=True)
class _Pending:
    """What a batch has accumulated since its last write."""

    charges: list[tuple[str, datetime, int, int, Decimal]] = field(default_factory=list)
    windows: dict[tuple[str, datetime, datetime], _Window] = field(
        default_factory=lambda: defaultdict(_Window)
    )
    opened: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # stream -> row
    closed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.charges or self.windows or self.opened or self.closed)


class BudgetWindows(Projection):
    name = "budget_windows"
    tables = ("budget_charges", "budget_window_spend", "budget_epochs", "open_reservations")
    types = frozenset({*ev.TAG_EVENT_TYPES, *_REQUEST_TYPES})

    def __init__(self) -> None:
        self.definitions: dict[str, TagState] = {}

    async def load(self, conn: asyncpg.Connection, position: int) -> None:
        """Tag definitions as of ``position``: which window a charge lands in depends on them."""
        self.definitions = {}
        rows = await conn.fetch(
            "select position, stream, version, type, data::text, recorded_at from events "
            "where type = any($1::text[]) and position <= $2 order by position",
            list(ev.TAG_EVENT_TYPES),
            position,
        )
        for row in rows:
            self._define(RecordedEvent(row[0], row[1], row[2], row[3], row[4], row[5]))

    def _define(self, r: RecordedEvent) -> tuple[TagState, TagState | None]:
        event = ev.decode_tag(r)
        before = self.definitions.get(event.name)
        state = (before or TagState(name=event.name, version=0)).apply(event, r.version)
        self.definitions[event.name] = state
        return state, before

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        pending = _Pending()
        for r in events:
            if r.type in ev.TAG_EVENT_TYPES:
                state, before = self._define(r)
                if before is None or before.budget_epoch != state.budget_epoch:
                    # Window bounds change: write what came before, then sum the
                    # window that holds the change from the charges themselves.
                    await _write(conn, pending, tables)
                    pending = _Pending()
                    await _new_epoch(conn, state, state.updated_at or r.recorded_at, tables)
                continue
            e = ev.decode(r)
            if isinstance(e, ev.RequestAdmitted):
                pending.opened[r.stream] = (
                    r.stream,
                    e.request_id,
                    r.position,
                    e.at,
                    e.deadline,
                    Decimal(to_nanos(e.estimate)),
                    ev.subjects_of(e),
                    e.reservation,
                )
                continue
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired | ev.RequestReleased)
            if pending.opened.pop(r.stream, None) is None:
                pending.closed.add(r.stream)
            if isinstance(e, ev.RequestReleased):
                continue
            nanos = to_nanos(e.cost)
            for subject in ev.subjects_of(e):
                pending.charges.append((subject, e.admitted_at, r.position, nanos, e.cost))
                defined = self.definitions.get(subject.removeprefix("tag:"))
                if defined is None or not defined.has_budget or not subject.startswith("tag:"):
                    continue  # no window in force: the charge waits in budget_charges
                window = defined.window(e.admitted_at)
                w = pending.windows[(subject, window.start, window.end)]
                w.spend += e.cost
                w.nanos += nanos
                w.requests += 1
        await _write(conn, pending, tables)


async def _new_epoch(conn: asyncpg.Connection, state: TagState, at: datetime, t: Mapping[str, str]) -> None:
    subject = tag_subject(state.name)
    await conn.execute(
        f"""insert into {t["budget_epochs"]} (subject, epoch) values ($1, $2)
            on conflict (subject) do update set epoch = excluded.epoch""",
        subject,
        state.budget_epoch,
    )
    if not state.has_budget:
        return
    # Every window of the new definition from the one that holds the change on is
    # summed from the charges themselves: a charge admitted after a window boundary
    # but recorded before the change was booked under the old definition.
    since = state.window(at).start
    rows = await conn.fetch(
        f"""select admitted_at, nanos, cost from {t["budget_charges"]}
            where subject = $1 and admitted_at >= $2""",
        subject,
        since,
    )
    sums: dict[tuple[datetime, datetime], _Window] = defaultdict(_Window)
    sums[(since, state.window(at).end)]  # the change's own window exists even when empty
    for admitted_at, nanos, cost in rows:
        window = state.window(admitted_at)
        w = sums[(window.start, window.end)]
        w.spend += cost
        w.nanos += int(nanos)
        w.requests += 1
    items = list(sums.items())
    await conn.execute(
        f"""
        insert into {t["budget_window_spend"]}
            (subject, window_start, window_end, spend, spend_nanos, requests)
        select $1, * from unnest($2::timestamptz[], $3::timestamptz[], $4::numeric[], $5::numeric[],
                                 $6::bigint[])
        on conflict (subject, window_start, window_end) do update set
            spend = excluded.spend, spend_nanos = excluded.spend_nanos, requests = excluded.requests
        """,
        subject,
        [k[0] for k, _ in items],
        [k[1] for k, _ in items],
        [v.spend for _, v in items],
        [Decimal(v.nanos) for _, v in items],
        [v.requests for _, v in items],
    )


async def _write(conn: asyncpg.Connection, p: _Pending, t: Mapping[str, str]) -> None:
    if not p:
        return
    if p.charges:
        schema, _, table = t["budget_charges"].rpartition(".")
        await conn.copy_records_to_table(
            table,
            records=p.charges,
            columns=("subject", "admitted_at", "position", "nanos", "cost"),
            schema_name=schema or None,
        )
    if p.windows:
        items = list(p.windows.items())
        tbl = t["budget_window_spend"]
        await conn.execute(
            f"""
            insert into {tbl} (subject, window_start, window_end, spend, spend_nanos, requests)
            select * from unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::numeric[],
                                 $5::numeric[], $6::bigint[])
            on conflict (subject, window_start, window_end) do update set
                spend = {tbl}.spend + excluded.spend,
                spend_nanos = {tbl}.spend_nanos + excluded.spend_nanos,
                requests = {tbl}.requests + excluded.requests
            """,
            [k[0] for k, _ in items],
            [k[1] for k, _ in items],
            [k[2] for k, _ in items],
            [v.spend for _, v in items],
            [Decimal(v.nanos) for _, v in items],
            [v.requests for _, v in items],
        )
    if p.closed:
        await conn.execute(
            f"delete from {t['open_reservations']} where stream = any($1::text[])", list(p.closed)
        )
    if p.opened:
        schema, _, table = t["open_reservations"].rpartition(".")
        await conn.copy_records_to_table(
            table,
            records=list(p.opened.values()),
            columns=(
                "stream",
                "request_id",
                "position",
                "at",
                "deadline",
                "estimate_nanos",
                "subjects",
                "nonce",
            ),
            schema_name=schema or None,
        )
