"""The budget windows view: what counter rebuilds and the sweeper read.

* ``budget_charges``: one row per charge and budgeted subject.
* ``budget_window_spend``: totals per subject and window of the definition in
  force. When a definition changes how time is cut (its epoch moves: see
  ledger/subjects.py), every window of the new definition from the one that
  holds the change on is summed from ``budget_charges``, so it holds every
  charge admitted within it, whatever definition was in force then (windows are
  about time, not definitions); a spend reset counts from its moment, plus its
  base. Tags whose budget comes from a template are summed the first time one of
  their charges arrives after the template changed.
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

import asyncpg

from ledger import events as ev
from ledger.domain.money import to_nanos
from ledger.domain.windows import LIFETIME
from ledger.events import RecordedEvent
from ledger.subjects import DEFINITION_TYPES, Definitions, Spec
from projections.rows import Row, Upsert, copy_rows
from projections.runtime import Projection

_REQUEST_TYPES = ("RequestAdmitted", "SpendRecorded", "ReservationExpired", "RequestReleased")
_DEFINITIONS = frozenset(DEFINITION_TYPES)


class ChargeRow(Row, frozen=True):
    """One budget_charges row."""

    subject: str
    admitted_at: datetime
    position: int
    nanos: int  # the charge in nano-USD, rounded up as counters do
    cost: Decimal


class WindowRow(Row, frozen=True):
    """One budget_window_spend row."""

    subject: str
    window_start: datetime
    window_end: datetime
    spend: Decimal
    spend_nanos: Decimal
    requests: int


class EpochRow(Row, frozen=True):
    subject: str
    epoch: int


class OpenRow(Row, frozen=True):
    """One open_reservations row."""

    stream: str
    request_id: str
    position: int
    at: datetime
    deadline: datetime
    estimate_nanos: Decimal
    subjects: list[str]
    nonce: str


# A batch adds to its windows; a re-sum (a definition changed) replaces them.
_ADD_WINDOWS = Upsert(
    WindowRow, key=("subject", "window_start", "window_end"), add=("spend", "spend_nanos", "requests")
)
_SET_WINDOWS = Upsert(WindowRow, key=("subject", "window_start", "window_end"))
_SET_EPOCH = Upsert(EpochRow, key=("subject",))


@dataclass(slots=True)
class _Window:
    spend: Decimal = Decimal(0)
    nanos: int = 0
    requests: int = 0


@dataclass(slots=True)
class _Pending:
    """What a batch has accumulated since its last write."""

    charges: list[ChargeRow] = field(default_factory=list)
    windows: dict[tuple[str, datetime, datetime], _Window] = field(
        default_factory=lambda: defaultdict(_Window)
    )
    opened: dict[str, OpenRow] = field(default_factory=dict)  # by stream
    closed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.charges or self.windows or self.opened or self.closed)


class BudgetWindows(Projection):
    name = "budget_windows"
    tables = ("budget_charges", "budget_window_spend", "budget_epochs", "open_reservations")
    types = frozenset({*DEFINITION_TYPES, *_REQUEST_TYPES})

    def __init__(self) -> None:
        self.definitions = Definitions()
        self.epochs: dict[str, int] = {}  # budget_epochs as written (a cache of the table)

    async def load(self, conn: asyncpg.Connection, position: int) -> None:
        """Definitions as of ``position``: which window a charge lands in depends on them."""
        self.definitions, self.epochs = Definitions(), {}
        rows = await conn.fetch(
            "select position, stream, version, type, data::text, recorded_at from events "
            "where type = any($1::text[]) and position <= $2 order by position",
            list(DEFINITION_TYPES),
            position,
        )
        for row in rows:
            self.definitions.apply(RecordedEvent(row[0], row[1], row[2], row[3], row[4], row[5]))

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        pending = _Pending()
        for r in events:
            if r.type in _DEFINITIONS:
                subject = self.definitions.apply(r)
                spec = self.definitions.spec(subject) if subject else None
                if spec is not None and spec.has_budget:
                    # Window bounds change: write what came before, then sum the windows
                    # of the new definition from the charges themselves.
                    await _write(conn, pending, tables)
                    pending = _Pending()
                    await self._resum(conn, spec, tables)
                continue
            e = ev.decode(r)
            if isinstance(e, ev.RequestAdmitted):
                pending.opened[r.stream] = OpenRow(
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
                pending.charges.append(ChargeRow(subject, e.admitted_at, r.position, nanos, e.cost))
                spec = self.definitions.spec(subject)
                budget = spec.budget(e.admitted_at) if spec is not None else None
                if spec is None or budget is None:
                    continue  # no window in force: the charge waits in budget_charges
                if await self._epoch(conn, subject, tables) != spec.epoch:
                    # a definition this view has not summed yet (a template's tag)
                    await _write(conn, pending, tables)
                    pending = _Pending()
                    await self._resum(conn, spec, tables)
                    continue  # the sum read this charge already
                if budget.since is not None and e.admitted_at < budget.since:
                    continue  # before a spend reset: it does not count
                w = pending.windows[(subject, budget.window.start, budget.window.end)]
                w.spend += e.cost
                w.nanos += nanos
                w.requests += 1
        await _write(conn, pending, tables)

    async def _epoch(self, conn: asyncpg.Connection, subject: str, t: Mapping[str, str]) -> int | None:
        """The epoch this view last summed ``subject`` under (cached)."""
        if subject not in self.epochs:
            found = await conn.fetchval(f"select epoch from {t['budget_epochs']} where subject = $1", subject)
            if found is None:
                return None
            self.epochs[subject] = int(found)
        return self.epochs[subject]

    async def _resum(self, conn: asyncpg.Connection, spec: Spec, t: Mapping[str, str]) -> None:
        """Sum every window of ``spec`` from the one that holds its last change on."""
        changed = self.definitions.changed_at(spec.subject)
        since = spec.window(changed).start if changed is not None else LIFETIME.start
        rows = await conn.fetch(
            f"""select admitted_at, nanos, cost from {t["budget_charges"]}
                where subject = $1 and admitted_at >= $2""",
            spec.subject,
            since,
        )
        sums: dict[tuple[datetime, datetime], _Window] = defaultdict(_Window)
        for admitted_at, nanos, cost in rows:
            budget = spec.budget(admitted_at)
            assert budget is not None
            if budget.since is not None and admitted_at < budget.since:
                continue  # before a spend reset: it does not count
            w = sums[(budget.window.start, budget.window.end)]
            w.spend += cost
            w.nanos += int(nanos)
            w.requests += 1
        reset = spec.budget(spec.reset_at) if spec.reset_at is not None else None
        if reset is not None and reset.since is not None:
            w = sums[(reset.window.start, reset.window.end)]  # what the reset set counts
            w.spend += spec.reset_to
            w.nanos += reset.base_nanos
        await _SET_WINDOWS.run(
            conn,
            t["budget_window_spend"],
            [WindowRow(spec.subject, *k, v.spend, Decimal(v.nanos), v.requests) for k, v in sums.items()],
        )
        await _SET_EPOCH.run(conn, t["budget_epochs"], [EpochRow(spec.subject, spec.epoch)])
        self.epochs[spec.subject] = spec.epoch


async def _write(conn: asyncpg.Connection, p: _Pending, t: Mapping[str, str]) -> None:
    if not p:
        return
    await copy_rows(conn, t["budget_charges"], ChargeRow, p.charges)
    await _ADD_WINDOWS.run(
        conn,
        t["budget_window_spend"],
        [WindowRow(*k, v.spend, Decimal(v.nanos), v.requests) for k, v in p.windows.items()],
    )
    if p.closed:
        await conn.execute(
            f"delete from {t['open_reservations']} where stream = any($1::text[])", list(p.closed)
        )
    await copy_rows(conn, t["open_reservations"], OpenRow, list(p.opened.values()))
