"""What the log says a budget window holds, read in O(recent): the checkpointed
view of the ``budget_windows`` projection plus the log's tail after its checkpoint
(a range of the primary key), plus the open reservations. Never a scan of the
events table: ``tests/test_counters_log.py`` checks the plans.

One statement each, so each answer is one snapshot: the view, its checkpoint and
the tail agree, and ``head`` is the position the answer reflects (appends are
serialized, so a snapshot holds exactly the events up to its head).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from ledger.counters.budget import Budget
from ledger.domain.money import from_nanos
from ledger.postgres.store import unavailable_as_store_error

PROJECTION = "budget_windows"  # the projection that maintains the views read here

_TAIL = """
cp as (
    select coalesce((select position from projection_checkpoints where name = 'budget_windows'), 0) as c
),
head as (select coalesce(max(position), 0) as p from events),
tail as (
    select e.stream, e.version, e.type, e.data
    from events e, cp, head
    where e.position > cp.c and e.position <= head.p
      and e.type in ('RequestAdmitted', 'SpendRecorded', 'ReservationExpired', 'RequestReleased')
),
ended as (select stream from tail where version >= 2)
"""

WINDOW_STATE_SQL = (  # constant text: the tail CTEs, then this query
    "with "  # noqa: S608
    + _TAIL
    + """,
mine as (
    select t.stream, t.type, t.data from tail t
    where (t.data->'budget_tags' ? $5 or t.data->'budget_subjects' ? $1)
      and coalesce(t.data->>'admitted_at', t.data->>'at')::timestamptz >= $6
      and coalesce(t.data->>'admitted_at', t.data->>'at')::timestamptz < $4
),
viewed as (
    select case when (select epoch from budget_epochs where subject = $1) = $2
        then coalesce((select spend_nanos from budget_window_spend
                       where subject = $1 and window_start = $3 and window_end = $4), 0)
        else $7::numeric + (select coalesce(sum(nanos), 0) from budget_charges
              where subject = $1 and admitted_at >= $6 and admitted_at < $4)
    end as nanos
),
charged as (
    select coalesce(sum(ceil((data->>'cost')::numeric * 1000000000)), 0) as nanos
    from mine where type in ('SpendRecorded', 'ReservationExpired')
),
open as (
    select o.request_id as id, o.estimate_nanos as nanos, o.nonce from open_reservations o
    where o.subjects @> array[$1] and o.at >= $6 and o.at < $4
      and not exists (select 1 from ended where ended.stream = o.stream)
    union all
    select m.data->>'request_id', ceil((m.data->>'estimate')::numeric * 1000000000),
           coalesce(m.data->>'reservation', '')
    from mine m
    where m.type = 'RequestAdmitted' and not exists (select 1 from ended where ended.stream = m.stream)
)
select head.p, (viewed.nanos + charged.nanos)::text,
       array(select id from open order by id), array(select nanos::text from open order by id),
       array(select nonce from open order by id)
from head, viewed, charged
"""
)

EXPIRED_SQL = (
    "with "  # noqa: S608
    + _TAIL
    + """
(select o.request_id from open_reservations o
 where o.deadline < $1 and not exists (select 1 from ended where ended.stream = o.stream)
 order by o.deadline limit $2)
union all
(select t.data->>'request_id' from tail t
 where t.type = 'RequestAdmitted' and (t.data->>'deadline')::timestamptz < $1
   and not exists (select 1 from ended where ended.stream = t.stream)
 limit $2)
"""
)


@dataclass(frozen=True, slots=True)
class WindowState:
    """A window as of log position ``position``: charged nano-USD and the open
    reservations (request id -> (estimate in nano-USD, attempt nonce))."""

    position: int
    spent_nanos: int
    open: dict[str, tuple[int, str]]

    @property
    def reserved_nanos(self) -> int:
        return sum(nanos for nanos, _ in self.open.values())


def _tag_of(subject: str) -> str | None:
    """The tag name a subject's charges list in ``budget_tags`` (model subjects are
    only in ``budget_subjects``)."""
    return subject[4:] if subject.startswith("tag:") and "|model:" not in subject else None


async def window_state(pool: asyncpg.Pool, budget: Budget) -> WindowState:
    w = budget.window
    async with unavailable_as_store_error("cannot read the budget window from the log"):
        row = await pool.fetchrow(
            WINDOW_STATE_SQL,
            budget.subject,
            budget.epoch,
            w.start,
            w.end,
            _tag_of(budget.subject),
            budget.counts_from,
            budget.base_nanos,
        )
    assert row is not None
    held = zip(map(int, row[3]), row[4], strict=True)
    return WindowState(int(row[0]), int(row[1]), dict(zip(row[2], held, strict=True)))


async def expired_reservations(pool: asyncpg.Pool, now: datetime, limit: int = 200) -> list[str]:
    """Request ids admitted in the log, with no terminal event, past their deadline."""
    async with unavailable_as_store_error("cannot read open reservations from the log"):
        rows = await pool.fetch(EXPIRED_SQL, now, limit)
    return list(dict.fromkeys(r[0] for r in rows))


CHARGED_BEFORE_SQL = """
with upto as (
    select least(
        coalesce((select position from projection_checkpoints where name = 'budget_windows'), 0), $5
    ) as u
)
select
    (select coalesce(sum(c.cost), 0) from budget_charges c, upto
     where c.subject = $1 and c.admitted_at >= $2 and c.admitted_at < $3 and c.position <= upto.u)
  + (select coalesce(sum((e.data->>'cost')::numeric), 0) from events e, upto
     where e.position > upto.u and e.position <= $5
       and e.type in ('SpendRecorded', 'ReservationExpired')
       and (e.data->'budget_tags' ? $4 or e.data->'budget_subjects' ? $1)
       and (e.data->>'admitted_at')::timestamptz >= $2
       and (e.data->>'admitted_at')::timestamptz < $3)
"""


async def charged_up_to(conn: asyncpg.Connection, budget: Budget, position: int) -> Decimal:
    """USD charged to a budget's window by the events up to ``position`` (exact,
    whatever definitions were in force; a spend reset's base included)."""
    value = await conn.fetchval(
        CHARGED_BEFORE_SQL,
        budget.subject,
        budget.counts_from,
        budget.window.end,
        _tag_of(budget.subject),
        position,
    )
    return Decimal(value) + from_nanos(budget.base_nanos)
