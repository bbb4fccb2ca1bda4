"""Admission: reserve, then settle — the budget side of every request.

1. ``admit`` checks every budgeted tag in one Redis call and reserves the
   estimate on all of them or none; an admitted request is appended to the log
   as ``RequestAdmitted`` (version 1 of ``request:<id>``) before it may go on.
2. ``record_spend`` appends ``SpendRecorded`` (version 2) and only then settles
   the counters at the actual cost. ``release`` does the same with
   ``RequestReleased`` for a request that never cost anything.
3. ``sweep`` finds reservations past their deadline. Their request stream
   decides: if a terminal event exists, the counters are settled from it;
   otherwise ``ReservationExpired`` charges the estimate. The stream's version
   check makes the terminal event unique even when a late gateway and the
   sweeper race.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from ledger import events as ev
from ledger.budgets import BudgetBook, budget_of
from ledger.counters import Budget, Counters, Denied
from ledger.errors import ConcurrencyError, LedgerError
from ledger.money import from_nanos, to_nanos
from ledger.store import EventStore

log = structlog.get_logger(__name__)


class DuplicateRequest(LedgerError):
    """This request id was admitted before; it is never charged twice."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request id {request_id!r} was already used")
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Admitted:
    request_id: str
    at: datetime
    estimate: Decimal
    tags: tuple[str, ...]
    budgets: tuple[Budget, ...]
    position: int  # of RequestAdmitted
    model: str | None = None
    remaining_nanos: int | None = None  # tightest budget's room after the reservation

    def remaining_after(self, cost: Decimal) -> Decimal | None:
        """The tightest budget's room once this request is charged ``cost``."""
        if self.remaining_nanos is None:
            return None
        left = self.remaining_nanos + to_nanos(self.estimate) - to_nanos(cost)
        return from_nanos(max(0, left))

    @property
    def budget_tags(self) -> list[str]:
        return [b.tag for b in self.budgets]


@dataclass(frozen=True, slots=True)
class BudgetExceeded:
    """Why a request was denied: the first budget that could not take it."""

    request_id: str
    budget: Budget
    spent: Decimal
    reserved: Decimal
    estimate: Decimal
    limit: Decimal = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit", from_nanos(self.budget.limit_nanos))

    @property
    def tag(self) -> str:
        return self.budget.tag

    @property
    def reset_at(self) -> datetime | None:
        return self.budget.reset_at


@dataclass(slots=True)
class SweepReport:
    expired: int = 0  # charged at their estimate
    settled: int = 0  # a terminal event existed; counters caught up
    dropped: int = 0  # never reached the log


class Admission:
    def __init__(
        self,
        store: EventStore,
        counters: Counters,
        book: BudgetBook,
        *,
        reservation_ttl: timedelta = timedelta(minutes=10),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.counters = counters
        self.book = book
        self.reservation_ttl = reservation_ttl
        self.now = clock or (lambda: datetime.now(UTC))
        self._background: set[asyncio.Task[bool]] = set()

    async def admit(
        self,
        request_id: str,
        tags: Sequence[str],
        estimate: Decimal,
        *,
        model: str | None = None,
    ) -> Admitted | BudgetExceeded:
        now = self.now()
        budgets = self.book.budgets_for(tags, now)
        estimate_nanos = to_nanos(estimate)
        deadline = now + self.reservation_ttl
        outcome = await self.counters.reserve(
            request_id,
            budgets,
            estimate_nanos,
            deadline,
            reservation_ttl_s=int(self.reservation_ttl.total_seconds() * 3),
        )
        if isinstance(outcome, Denied):
            denied = BudgetExceeded(
                request_id,
                outcome.budget,
                from_nanos(outcome.spent_nanos),
                from_nanos(outcome.reserved_nanos),
                estimate,
            )
            await self._record_denial(denied, tags, model, now)
            return denied
        if outcome.duplicate:
            raise DuplicateRequest(request_id)
        event = ev.RequestAdmitted(
            request_id=request_id,
            at=now,
            estimate=estimate,
            deadline=deadline,
            tags=list(dict.fromkeys(tags)),
            budget_tags=[b.tag for b in budgets],
            model=model,
        )
        try:
            [position] = await self.store.append(ev.stream_of_request(request_id), 0, [ev.to_new(event)])
        except ConcurrencyError:
            # Redis forgot a settled request (its marker expired or was flushed)
            # but the log did not: the id was used. Give the reservation back.
            await self.counters.drop_unlogged(request_id, budgets, estimate_nanos)
            raise DuplicateRequest(request_id) from None
        except BaseException:
            # Not recorded (store down, cancelled): nothing may go upstream, so
            # the reservation goes back at once instead of waiting for the sweeper.
            with contextlib.suppress(Exception):
                await self.counters.drop_unlogged(request_id, budgets, estimate_nanos)
            raise
        return Admitted(
            request_id,
            now,
            estimate,
            tuple(event.tags),
            tuple(budgets),
            position,
            model,
            outcome.remaining_nanos,
        )

    async def admit_unreserved(
        self, request_id: str, tags: Sequence[str], estimate: Decimal, *, model: str | None = None
    ) -> Admitted:
        """Admit without a reservation (Redis is down and the policy says allow).

        The admission is in the log, so counters rebuilt from it count it; the
        caller asks for that rebuild once Redis answers again.
        """
        now = self.now()
        budgets = self.book.budgets_for(tags, now)
        event = ev.RequestAdmitted(
            request_id=request_id,
            at=now,
            estimate=estimate,
            deadline=now + self.reservation_ttl,
            tags=list(dict.fromkeys(tags)),
            budget_tags=[b.tag for b in budgets],
            model=model,
            unreserved=True,
        )
        try:
            [position] = await self.store.append(ev.stream_of_request(request_id), 0, [ev.to_new(event)])
        except ConcurrencyError:
            raise DuplicateRequest(request_id) from None
        return Admitted(request_id, now, estimate, tuple(event.tags), tuple(budgets), position, model)

    async def record_refusal(
        self, request_id: str, tags: Sequence[str], model: str | None, reason: str
    ) -> None:
        """A request refused for lack of a budget check (no tag, no amounts)."""
        now = self.now()
        event = ev.RequestDenied(
            request_id=request_id,
            at=now,
            tag="",
            spent=Decimal(0),
            reserved=Decimal(0),
            estimate=Decimal(0),
            max_budget=Decimal(0),
            tags=list(dict.fromkeys(tags)),
            model=model,
            reason=reason,
        )
        await self.store.append(f"denied:{request_id}", None, [ev.to_new(event)])

    async def _record_denial(
        self, denied: BudgetExceeded, tags: Sequence[str], model: str | None, now: datetime
    ) -> None:
        event = ev.RequestDenied(
            request_id=denied.request_id,
            at=now,
            tag=denied.tag,
            spent=denied.spent,
            reserved=denied.reserved,
            estimate=denied.estimate,
            max_budget=denied.limit,
            reset_at=denied.reset_at,
            tags=list(dict.fromkeys(tags)),
            model=model,
        )
        # Denials of one request id may repeat (a client retrying): no version check.
        await self.store.append(f"denied:{denied.request_id}", None, [ev.to_new(event)])

    async def record_spend(
        self, admitted: Admitted, cost: Decimal, *, wait_settle: bool = True, **details: Any
    ) -> int:
        """Append SpendRecorded (durable before this returns), then settle.

        ``wait_settle=False`` settles in the background (the gateway answers its
        client first; until then the counter still holds the estimate, which
        only errs on the safe side). A settle that fails is left to the sweeper.
        """
        event = ev.SpendRecorded(
            request_id=admitted.request_id,
            admitted_at=admitted.at,
            cost=cost,
            tags=list(admitted.tags),
            budget_tags=admitted.budget_tags,
            model=details.pop("model", admitted.model),
            **details,
        )
        [position] = await self.store.append(ev.stream_of_request(admitted.request_id), 1, [ev.to_new(event)])
        settle = self.counters.settle(
            admitted.request_id,
            admitted.budgets,
            actual_nanos=to_nanos(cost),
            estimate_nanos=to_nanos(admitted.estimate),
            position=position,
            admitted_position=admitted.position,
        )
        if wait_settle:
            await settle
        else:
            task = asyncio.create_task(settle)
            self._background.add(task)
            task.add_done_callback(self._settled)
        return position

    def _settled(self, task: asyncio.Task[bool]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("settle_failed", error=str(task.exception()))

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background settles (graceful shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    async def release(self, admitted: Admitted, reason: str, status: int | None = None) -> int:
        event = ev.RequestReleased(
            request_id=admitted.request_id,
            admitted_at=admitted.at,
            reason=reason,
            status=status,
            tags=list(admitted.tags),
            budget_tags=admitted.budget_tags,
        )
        [position] = await self.store.append(ev.stream_of_request(admitted.request_id), 1, [ev.to_new(event)])
        await self.counters.release(
            admitted.request_id,
            admitted.budgets,
            estimate_nanos=to_nanos(admitted.estimate),
            position=position,
            admitted_position=admitted.position,
        )
        return position

    # ------------------------------------------------------------- sweeping

    async def sweep(self, limit: int = 100) -> SweepReport:
        """Settle every reservation whose deadline passed, from what the log says."""
        report = SweepReport()
        for request_id in await self.counters.expired(self.now(), limit):
            await self._sweep_one(request_id, report)
        return report

    async def _sweep_one(self, request_id: str, report: SweepReport) -> None:
        stream = ev.stream_of_request(request_id)
        recorded = await self.store.read_stream(stream)
        held = await self.counters.reservation(request_id)
        if not recorded:
            if held is not None:
                estimate_nanos, keys = held
                await self.counters.drop_unlogged(request_id, self._budgets_of_keys(keys), estimate_nanos)
            await self.counters.forget(request_id)
            report.dropped += 1
            return
        admitted = ev.decode(recorded[0])
        assert isinstance(admitted, ev.RequestAdmitted)
        budgets = self._budgets_at(admitted)
        if len(recorded) == 1:
            expired = ev.ReservationExpired(
                request_id=request_id,
                admitted_at=admitted.at,
                cost=admitted.estimate,
                tags=admitted.tags,
                budget_tags=admitted.budget_tags,
            )
            try:
                [position] = await self.store.append(stream, 1, [ev.to_new(expired)])
            except ConcurrencyError:
                recorded = await self.store.read_stream(stream)  # the gateway settled just now
            else:
                await self.counters.settle(
                    request_id,
                    budgets,
                    actual_nanos=to_nanos(admitted.estimate),
                    estimate_nanos=to_nanos(admitted.estimate),
                    position=position,
                    admitted_position=recorded[0].position,
                )
                log.warning("reservation_expired", request_id=request_id, charged=str(admitted.estimate))
                report.expired += 1
                return
        terminal = ev.decode(recorded[1])
        cost = getattr(terminal, "cost", Decimal(0))
        await self.counters.settle(
            request_id,
            budgets,
            actual_nanos=to_nanos(cost),
            estimate_nanos=to_nanos(admitted.estimate),
            position=recorded[1].position,
            admitted_position=recorded[0].position,
        )
        report.settled += 1

    def _budgets_at(self, admitted: ev.RequestAdmitted) -> list[Budget]:
        """The budgets of the request's windows, by today's definitions. If a
        definition changed since, the charge lands in the new window's counter
        (rebuilt from the log, so counted once) and the old one simply expires."""
        out = []
        for tag in admitted.budget_tags:
            state = self.book.get(tag)
            if state is not None and state.has_budget:
                out.append(budget_of(state, admitted.at))
        return out

    def _budgets_of_keys(self, keys: list[str]) -> list[Budget]:
        """Budgets whose counter keys are ``keys`` (those whose definition still matches)."""
        out = []
        for key in keys:
            parts = key.split(":", 4)  # ledger:w:<duration>:<start>:<tag>
            if len(parts) != 5:
                continue
            state = self.book.get(parts[4])
            if state is None or not state.has_budget:
                continue
            start = datetime.fromtimestamp(int(parts[3]), UTC)
            budget = budget_of(state, start)
            if budget.key == key:
                out.append(budget)
        return out
