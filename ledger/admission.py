"""Admission: reserve, then settle — the budget side of every request.

1. ``admit`` checks every budget and rate limit of the request in one Redis
   call and reserves the estimate on all of them or none; the admission is appended to the log as
   ``RequestAdmitted`` (version 1 of ``request:<id>``); then it confirms that
   every counter still holds the reservation (a counter lost and rebuilt in
   between would not) — only then may the request go on.
2. ``record_spend`` appends ``SpendRecorded`` (version 2) and only then settles
   the counters at the actual cost. ``release`` does the same with
   ``RequestReleased`` for a request that never cost anything.
3. ``sweep`` finds reservations past their deadline, from the log (every
   admission without a terminal event, whatever happened to Redis) and from
   Redis's index (reservations whose admission never reached the log). Their
   request stream decides: a terminal event is settled from; an admission alone
   is charged at its estimate (``ReservationExpired``; capped at the room left
   when Redis lost whether it was confirmed, see ``_room_for``); nothing at all means the
   reservation is given back. The stream's version check makes the terminal
   event unique even when a late gateway and several sweepers race.

An admission whose commit outcome is unknown (PostgreSQL went away, the caller
was cancelled) is never silently dropped: a task waits for the outcome and
releases it (the request never went upstream), or gives the reservation back if
it never reached the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import structlog

from ledger import events as ev
from ledger.budgets import BudgetBook, budgets_at, limits_of, window_ref
from ledger.counters import Budget, Counters, CountersUnavailable, Denied, Holding, Limit, Limited
from ledger.counters.limits import SETTING
from ledger.counters.log import expired_reservations, window_state
from ledger.counters.scripts import Dup
from ledger.domain.money import from_nanos, to_nanos
from ledger.errors import AppendOutcomeUnknown, ConcurrencyError, LedgerError, StoreError, StoreUnavailable
from ledger.postgres.store import EventStore, NotWritten, Pending

log = structlog.get_logger(__name__)

RedisDownPolicy = Literal["deny", "allow"]


class DuplicateRequest(LedgerError):
    """This request id was admitted before; it is never charged twice."""

    def __init__(self, request_id: str, detail: str = "") -> None:
        super().__init__(f"request id {request_id!r} was already used{detail}")
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
    # True once every counter is known to hold the reservation (confirmed); False when
    # admitted without (Redis down, policy "allow") or not confirmed (yet)
    reserved: bool = True
    nonce: str = ""  # this attempt's reservation name (see RequestAdmitted.reservation)
    key_hash: str | None = None
    holding: Holding | None = None  # its places in rate limits, given back when it ends

    def remaining_after(self, cost: Decimal) -> Decimal | None:
        """The tightest budget's room once this request is charged ``cost``."""
        if self.remaining_nanos is None:
            return None
        left = self.remaining_nanos + to_nanos(self.estimate) - to_nanos(cost)
        return from_nanos(max(0, left))

    @property
    def budget_tags(self) -> list[str]:
        return tags_of(self.budgets)

    @property
    def budget_subjects(self) -> list[str]:
        """Budgeted subjects other than tags (keys, end users, per-model budgets)."""
        return others_of(self.budgets)

    @property
    def subjects(self) -> list[str]:
        return [b.subject for b in self.budgets]

    @property
    def held(self) -> tuple[Budget, ...]:
        """The counters known to hold this request's reservation: there, a missing
        reservation means it was settled already."""
        return self.budgets if self.reserved else ()


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
        """The tag that refused it ("" when a key, an end user or a model budget did)."""
        return self.budget.name if _is_tag(self.budget.subject) else ""

    @property
    def subject(self) -> str:
        return self.budget.subject

    @property
    def reset_at(self) -> datetime | None:
        return self.budget.reset_at


@dataclass(frozen=True, slots=True)
class RateLimited:
    """Refused by a rate limit (rpm, tpm or parallel requests) of some subject."""

    request_id: str
    limit: Limit
    used: int
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Recorded:
    """The terminal event of a request: where, and what it charged."""

    position: int
    cost: Decimal
    superseded: bool = False  # a sweeper recorded the request first (charged its estimate)


@dataclass(slots=True)
class SweepReport:
    expired: int = 0  # charged at their estimate
    settled: int = 0  # a terminal event existed; counters caught up
    dropped: int = 0  # never reached the log: reservation given back
    released: int = 0  # recorded but never confirmed (so never sent upstream): released
    failed: int = 0  # raised; retried next pass


class AdmissionHooks:
    """Test seams, awaited at the named points of ``admit`` (defaults do nothing)."""

    async def after_reserve(self, request_id: str) -> None:
        """Reserved in Redis; RequestAdmitted not appended yet."""

    async def after_append(self, request_id: str) -> None:
        """RequestAdmitted committed; not confirmed yet."""


class Admission:
    def __init__(
        self,
        store: EventStore,
        counters: Counters,
        book: BudgetBook,
        *,
        reservation_ttl: timedelta = timedelta(minutes=15),
        clock: Callable[[], datetime] | None = None,
        on_redis_down: RedisDownPolicy = "deny",
        hooks: AdmissionHooks | None = None,
    ) -> None:
        self.store = store
        self.counters = counters
        self.book = book
        self.reservation_ttl = reservation_ttl
        self.now = clock or (lambda: datetime.now(UTC))
        self.on_redis_down = on_redis_down
        self.hooks = hooks or AdmissionHooks()
        self._background: set[asyncio.Task[Any]] = set()
        # Admitted without a reservation (Redis down, policy allow): to confirm or
        # settle once Redis answers again (see reconcile).
        self.unreconciled: dict[str, Admitted] = {}
        self._settling: set[str] = set()  # request ids whose settle is being retried

    # ------------------------------------------------------------- admit

    async def admit(
        self,
        request_id: str,
        tags: Sequence[str],
        estimate: Decimal,
        *,
        model: str | None = None,
        user_hash: str | None = None,
        metadata: dict[str, Any] | None = None,
        key_hash: str | None = None,
        tokens: int = 0,
        model_aliases: Sequence[str] = (),
    ) -> Admitted | BudgetExceeded | RateLimited:
        """Reserve, record, confirm. ``tokens``: the prompt's bound (counted against
        tpm limits). Raises DuplicateRequest, CountersUnavailable (Redis down under
        the deny policy), StoreUnavailable.

        Every way out before the request may go upstream gives back what was
        reserved: this attempt's nonce names its reservation, so another attempt
        under the same request id is never touched."""
        now = self.now()
        tags = list(dict.fromkeys(tags))
        specs = self.book.specs_for(
            tags, key_hash=key_hash, user_hash=user_hash, model=model, aliases=model_aliases
        )
        budgets = budgets_at(specs, now)
        limits = limits_of(specs)
        estimate_nanos = to_nanos(estimate)
        deadline = now + self.reservation_ttl
        nonce = secrets.token_hex(8)
        keys = [b.key for b in budgets]
        remaining: int | None = None
        reserving = bool(budgets)
        # What a reserve takes of the rate limits, known before it runs: an attempt
        # that never learns its reply still gives back its parallel slots.
        maybe = Counters.holding(request_id, nonce, limits, now, tokens) if limits else None
        holding: Holding | None = None
        if budgets or limits:
            try:
                outcome = await self.counters.reserve(
                    request_id,
                    budgets,
                    estimate_nanos,
                    deadline,
                    nonce,
                    limits=limits,
                    now=now,
                    tokens=tokens,
                )
            except CountersUnavailable:
                # The script may have run after the client gave up on it.
                self._spawn(self._give_back(request_id, keys, nonce, maybe))
                if self.on_redis_down != "allow":
                    await self.record_refusal(request_id, tags, model, "redis_unavailable")
                    raise
                outcome = None
                reserving = False
            except asyncio.CancelledError:
                self._spawn(self._give_back(request_id, keys, nonce, maybe))
                raise
            if isinstance(outcome, Denied):
                denied = self._exceeded(request_id, outcome, estimate)
                await self._record_denial(denied, tags, model, now, user_hash, metadata, key_hash)
                return denied
            if isinstance(outcome, Limited):
                limited = RateLimited(request_id, outcome.limit, outcome.used, outcome.retry_after_s)
                await self._record_limited(limited, tags, model, now, user_hash, metadata, key_hash)
                return limited
            if outcome is not None:
                if outcome.duplicate:
                    raise DuplicateRequest(request_id, " and is still in flight")
                remaining = outcome.remaining_nanos
                holding = outcome.holding
        event = ev.RequestAdmitted(
            request_id=request_id,
            at=now,
            estimate=estimate,
            deadline=deadline,
            tags=tags,
            budget_tags=tags_of(budgets),
            model=model,
            unreserved=bool(budgets) and not reserving,
            windows=[window_ref(b) for b in budgets] if reserving else [],
            budget_subjects=others_of(budgets),
            reservation=nonce if reserving else "",
            key_hash=key_hash,
        )
        # Not `reserved` until confirmed: only then is every counter known to hold it.
        admitted = Admitted(
            request_id,
            now,
            estimate,
            tuple(tags),
            tuple(budgets),
            0,
            model,
            remaining,
            False,
            nonce,
            key_hash,
            holding,
        )
        stream = ev.stream_of_request(request_id)
        given_back = keys if reserving else []
        try:
            if reserving:
                await self.hooks.after_reserve(request_id)
            pending = await self.store.submit(stream, 0, [ev.to_new(event)])
        except BaseException:
            # Never queued (store closed, queue full, cancelled): nothing can commit it.
            self._spawn(self._give_back(request_id, given_back, nonce, holding))
            raise
        try:
            [position] = await pending.wait()
        except ConcurrencyError:
            # The log has this id already (Redis had forgotten it): give the reservation back.
            await self._give_back(request_id, given_back, nonce, holding)
            raise DuplicateRequest(request_id, await self._fate(stream)) from None
        except BaseException:
            # Outcome unknown (or cancelled): never silently dropped.
            self._spawn(self._resolve(admitted, pending, reserving))
            raise
        admitted = replace(admitted, position=position)
        try:
            await self.hooks.after_append(request_id)
            if not reserving:
                if budgets:
                    self.unreconciled[request_id] = admitted
                return admitted
            lost = await self.counters.confirm(request_id, budgets, estimate_nanos, position, now, nonce)
        except CountersUnavailable:
            if self.on_redis_down == "allow":
                # Admitted, but not known to be held: settled as never held.
                self.unreconciled[request_id] = admitted
                return admitted
            self._spawn(self._release_quietly(admitted, "admission_unconfirmed"))
            raise
        except BaseException:
            # Recorded, but it will not go upstream: release it rather than let the
            # sweeper charge its estimate.
            self._spawn(self._release_quietly(admitted, "admission_unconfirmed"))
            raise
        if isinstance(lost, Dup):
            self._spawn(self._release_quietly(admitted, "duplicate_request"))
            raise DuplicateRequest(request_id, " and is still in flight")
        if lost is not None:
            # A counter was lost and rebuilt without this reservation, and others took
            # the room meanwhile: refuse now, before anything goes upstream.
            denied = self._exceeded(request_id, lost, estimate)
            self._spawn(self._release_quietly(admitted, "budget_recheck"))
            await self._record_denial(
                denied, tags, model, now, user_hash, metadata, key_hash, reason="budget_recheck"
            )
            return denied
        return replace(admitted, reserved=True)

    def _exceeded(self, request_id: str, denied: Denied, estimate: Decimal) -> BudgetExceeded:
        return BudgetExceeded(
            request_id,
            denied.budget,
            from_nanos(denied.spent_nanos),
            from_nanos(denied.reserved_nanos),
            estimate,
        )

    async def _fate(self, stream: str) -> str:
        """How an earlier use of a request id ended, for the 409's message."""
        with contextlib.suppress(Exception):
            recorded = await self.store.read_stream(stream)
            if len(recorded) > 1 and recorded[1].type == "RequestReleased":
                return " (that attempt was released without a charge)"
            if len(recorded) > 1:
                return " (that attempt was charged)"
        return ""

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
        self,
        denied: BudgetExceeded,
        tags: Sequence[str],
        model: str | None,
        now: datetime,
        user_hash: str | None,
        metadata: dict[str, Any] | None,
        key_hash: str | None = None,
        reason: str = "budget",
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
            reason=reason,
            user_hash=user_hash,
            metadata=metadata or {},
            key_hash=key_hash,
            subject=denied.subject,
        )
        # Denials of one request id may repeat (a client retrying): no version check.
        await self.store.append(f"denied:{denied.request_id}", None, [ev.to_new(event)])

    async def _record_limited(
        self,
        limited: RateLimited,
        tags: Sequence[str],
        model: str | None,
        now: datetime,
        user_hash: str | None,
        metadata: dict[str, Any] | None,
        key_hash: str | None,
    ) -> None:
        subject = limited.limit.subject
        event = ev.RequestDenied(
            request_id=limited.request_id,
            at=now,
            tag=subject.removeprefix("tag:") if _is_tag(subject) else "",
            spent=Decimal(0),
            reserved=Decimal(0),
            estimate=Decimal(0),
            max_budget=Decimal(0),
            tags=list(dict.fromkeys(tags)),
            model=model,
            reason=SETTING[limited.limit.kind],
            user_hash=user_hash,
            metadata=metadata or {},
            key_hash=key_hash,
            subject=subject,
        )
        await self.store.append(f"denied:{limited.request_id}", None, [ev.to_new(event)])

    # ------------------------------------------------------------- settle

    def charged_budgets(self, admitted_at: datetime, subjects: Sequence[str]) -> list[Budget]:
        """The counters a charge counts in now: the windows, under today's
        definitions, that contain the admission time (windows are about time)."""
        return self.book.budgets_of_subjects(subjects, admitted_at)

    async def record_spend(
        self, admitted: Admitted, cost: Decimal, *, wait_settle: bool = True, **details: Any
    ) -> Recorded:
        """Append SpendRecorded (durable before this returns), then settle.

        ``wait_settle=False`` settles in the background (the gateway answers its
        client first; until then the counter still holds the estimate, which
        only errs on the safe side). A settle that fails is retried, then left
        to the sweeper.
        """
        event = ev.SpendRecorded(
            request_id=admitted.request_id,
            admitted_at=admitted.at,
            cost=cost,
            tags=list(admitted.tags),
            budget_tags=admitted.budget_tags,
            budget_subjects=admitted.budget_subjects,
            model=details.pop("model", admitted.model),
            key_hash=admitted.key_hash,
            **details,
        )
        return await self._terminate(admitted, event, cost, wait_settle=wait_settle)

    async def release(
        self,
        admitted: Admitted,
        reason: str,
        status: int | None = None,
        *,
        wait_settle: bool = True,
        mark: bool = False,
    ) -> Recorded:
        """Append RequestReleased, then give the reservation back. ``mark``: the
        sweeper's release, which leaves a marker so that a confirm from a gateway
        that stalled past the deadline adds nothing back."""
        event = ev.RequestReleased(
            request_id=admitted.request_id,
            admitted_at=admitted.at,
            reason=reason,
            status=status,
            tags=list(admitted.tags),
            budget_tags=admitted.budget_tags,
            budget_subjects=admitted.budget_subjects,
            key_hash=admitted.key_hash,
        )
        return await self._terminate(admitted, event, Decimal(0), wait_settle=wait_settle, mark=mark)

    async def _terminate(
        self,
        admitted: Admitted,
        event: ev.SpendRecorded | ev.RequestReleased,
        cost: Decimal,
        *,
        wait_settle: bool,
        mark: bool = False,
    ) -> Recorded:
        stream = ev.stream_of_request(admitted.request_id)
        try:
            [position] = await self.store.append(stream, 1, [ev.to_new(event)])
        except ConcurrencyError:
            # The sweeper recorded it first (the reservation's deadline passed):
            # its terminal event stands and was settled by the sweeper.
            self._free_slots(admitted, None)
            recorded = await self.store.read_stream(stream)
            terminal = ev.decode(recorded[1])
            charged = getattr(terminal, "cost", Decimal(0))
            log.warning("terminal_superseded", request_id=admitted.request_id, by=recorded[1].type)
            return Recorded(recorded[1].position, charged, superseded=True)
        except BaseException:
            # A slot is about concurrency, not money: whatever happened to the
            # record, this request no longer runs (its prompt's bound stays counted).
            self._free_slots(admitted, None)
            raise
        if isinstance(event, ev.RequestReleased):
            self._free_slots(admitted, 0)
        elif event.usage_source == "estimate":
            self._free_slots(admitted, None)  # no usage known: the prompt's bound stays counted
        else:
            self._free_slots(admitted, event.prompt_tokens + event.completion_tokens)
        if wait_settle:
            await self._settle(admitted, to_nanos(cost), position, mark=mark)
            self.unreconciled.pop(admitted.request_id, None)
        else:
            self._spawn(self._settle_retrying(admitted, to_nanos(cost), position))
        return Recorded(position, cost)

    def _free_slots(self, admitted: Admitted, used_tokens: int | None) -> None:
        if admitted.holding is not None:
            self._spawn(self._unlimit(admitted.holding, used_tokens))

    async def _unlimit(self, holding: Holding, used_tokens: int | None) -> None:
        """Free the parallel slots and count the tokens (``None``: keep the prompt's
        bound counted). Retried while Redis is away; past that a slot frees itself
        at the deadline, and a lost token count only errs towards admitting."""
        delay = 0.1
        for attempt in range(5):
            try:
                await self.counters.unlimit(holding, self.now(), used_tokens)
                return
            except Exception as e:
                log.warning(
                    "unlimit_failed", member=holding.member, attempt=attempt, error=f"{type(e).__name__}: {e}"
                )
                await asyncio.sleep(delay)
                delay *= 3

    async def _settle(
        self, admitted: Admitted, actual_nanos: int, position: int, *, mark: bool = False
    ) -> int:
        return await self.counters.settle(
            admitted.request_id,
            [*self.charged_budgets(admitted.at, admitted.subjects), *admitted.budgets],
            actual_nanos=actual_nanos,
            position=position,
            admitted_position=admitted.position,
            admitted_at=admitted.at,
            held=admitted.held,
            nonce=admitted.nonce,
            mark=mark,
        )

    async def _settle_retrying(self, admitted: Admitted, actual_nanos: int, position: int) -> None:
        delay = 0.1
        self._settling.add(admitted.request_id)
        try:
            for _ in range(6):
                try:
                    await self._settle(admitted, actual_nanos, position)
                    self.unreconciled.pop(admitted.request_id, None)
                    return
                except (CountersUnavailable, StoreUnavailable) as e:
                    log.warning("settle_failed", request_id=admitted.request_id, error=str(e))
                    await asyncio.sleep(delay)
                    delay *= 4
        finally:
            self._settling.discard(admitted.request_id)
        # Still down: the sweeper settles it from the log once its deadline passes
        # (or the reconcile, if it was admitted while Redis was down).

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_settle_failed", error=str(task.exception()))

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background settles and resolutions (graceful shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    # ------------------------------------------------------------- unknown outcomes

    async def _resolve(self, admitted: Admitted, pending: Pending, reserving: bool) -> None:
        """An admission whose caller never learnt whether it committed: the request
        did not go upstream, so release it (or give back a reservation that never
        reached the log). Retried until the deadline; then the sweeper's."""
        stream = ev.stream_of_request(admitted.request_id)
        keys = [b.key for b in admitted.budgets] if reserving else []
        try:
            [position] = await pending.outcome()
        except AppendOutcomeUnknown:
            position = 0  # ask the log below
        except (NotWritten, ConcurrencyError, StoreError):
            # Never committed (refused, rolled back, or never written).
            await self._give_back(admitted.request_id, keys, admitted.nonce, admitted.holding)
            return
        if position:
            await self._release_quietly(replace(admitted, position=position), "admission_unconfirmed")
            return
        delay = 0.5
        while self.now() < admitted.at + self.reservation_ttl:
            await asyncio.sleep(delay)  # let a commit that was in flight finish either way
            delay = min(delay * 2, 10.0)
            try:
                recorded = await self.store.read_stream(stream)
            except StoreUnavailable:
                continue
            mine = [r for r in recorded[:1] if ev.decode(r).reservation == admitted.nonce]  # type: ignore[union-attr]
            if not mine:
                await self._give_back(admitted.request_id, keys, admitted.nonce, admitted.holding)
                return
            await self._release_quietly(replace(admitted, position=mine[0].position), "admission_unconfirmed")
            return

    async def _give_back(
        self, request_id: str, keys: list[str], nonce: str, holding: Holding | None = None
    ) -> None:
        """Release this attempt's reservation where it never reached the log, and its
        parallel slots (best effort: the sweeper releases the reservation after the
        deadline otherwise, and a slot frees itself then)."""
        try:
            if keys:
                await self.counters.release_orphan(request_id, keys, nonce)
            if holding is not None:
                await self.counters.unlimit(holding, self.now(), None)
        except Exception as e:
            log.info("give_back_failed", request_id=request_id, error=f"{type(e).__name__}: {e}")

    async def _release_quietly(self, admitted: Admitted, reason: str) -> None:
        delay = 0.5
        while self.now() < admitted.at + self.reservation_ttl:
            try:
                await self.release(admitted, reason)
                return
            except (StoreUnavailable, CountersUnavailable) as e:
                log.info("release_waiting", request_id=admitted.request_id, error=str(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # ------------------------------------------------------------- Redis came back

    async def reconcile(self) -> int:
        """Bring the counters up to date with requests admitted while Redis was
        down: an open one gets its reservation (confirm), a finished one its
        charge (settle). Returns how many are still waiting."""
        for request_id, admitted in list(self.unreconciled.items()):
            if request_id in self._settling:
                continue  # its own settle is being retried: it reconciles itself
            stream = ev.stream_of_request(request_id)
            recorded = await self.store.read_stream(stream)
            if len(recorded) > 1:
                terminal = ev.decode(recorded[1])
                cost = getattr(terminal, "cost", Decimal(0))
                await self.counters.settle(
                    request_id,
                    [*self.charged_budgets(admitted.at, admitted.subjects), *admitted.budgets],
                    actual_nanos=to_nanos(cost),
                    position=recorded[1].position,
                    admitted_position=admitted.position,
                    admitted_at=admitted.at,
                    held=(),
                    nonce=admitted.nonce,
                )
            else:
                budgets = self.charged_budgets(admitted.at, admitted.subjects)
                # Admitted already: the room is taken even if it overflows (the
                # request is on its way), so no limit applies here.
                unlimited = [_unlimited(b) for b in budgets]
                await self.counters.confirm(
                    request_id,
                    unlimited,
                    to_nanos(admitted.estimate),
                    admitted.position,
                    admitted.at,
                    admitted.nonce,
                )
            self.unreconciled.pop(request_id, None)
        return len(self.unreconciled)

    # ------------------------------------------------------------- sweeping

    async def sweep(self, limit: int = 200) -> SweepReport:
        """Settle every reservation whose deadline passed, from what the log says."""
        report = SweepReport()
        now = self.now()
        due = await expired_reservations(self.store.pool, now, limit)
        indexed: dict[str, tuple[str, ...]] = {}  # request id -> where Redis's index lists it
        with contextlib.suppress(CountersUnavailable):
            indexed = await self.counters.expired(now, limit)
        for request_id in dict.fromkeys([*due, *indexed]):
            try:
                await self._sweep_one(request_id, report, indexed.get(request_id, ()))
            except Exception as e:  # one bad item must not stop the pass
                report.failed += 1
                log.warning("sweep_item_failed", request_id=request_id, error=f"{type(e).__name__}: {e}")
        return report

    async def _sweep_one(
        self, request_id: str, report: SweepReport, indexed_in: tuple[str, ...] = ()
    ) -> None:
        stream = ev.stream_of_request(request_id)
        recorded = await self.store.read_stream(stream)
        # No version 1: its month was archived (`ledger archive` takes only requests
        # that ended), so whatever Redis's index still lists for it is an orphan.
        logged = ev.decode(recorded[0]) if recorded and recorded[0].version == 1 else None
        assert logged is None or isinstance(logged, ev.RequestAdmitted)
        held_subjects = [b.subject for b in self.book.budgets_of_windows(logged.windows)] if logged else []
        orphans = [
            (nonce, keys)
            for nonce, keys in await self.counters.reserved_keys(request_id, [*held_subjects, *indexed_in])
            if logged is None or logged.reservation != nonce
        ]
        if orphans:
            # Reserved in Redis by an attempt that never reached the log, deadline
            # passed: it never will. (Another attempt under this id may have.)
            for nonce, keys in orphans:
                await self.counters.release_orphan(request_id, keys, nonce)
            report.dropped += 1
            if logged is None or len(recorded) > 1:
                return
        if logged is None:
            return
        # Whatever held the reservation, this settle assumes nothing was settled
        # before unless Redis's index says so (held=() and swept): no terminal event
        # means no settle ran; a terminal event found through the index means its
        # settle never completed.
        # current: the windows in force at admission time (their limits apply);
        # held: the windows the admission reserved on (possibly older definitions)
        current = self.charged_budgets(logged.at, ev.subjects_of(logged))
        held = self.book.budgets_of_windows(logged.windows)
        charged = [*current, *held]
        confirmation: Literal["no", "held", "unknown"] = "held"
        if len(recorded) == 1 and logged.windows:
            confirmation = await self.counters.confirmed(
                request_id, logged.reservation, recorded[0].position, charged
            )
            if confirmation == "no":
                # Its gateway died between recording the admission and confirming it:
                # the request never went upstream. Released, not charged.
                admitted = _admitted_of(logged, recorded[0].position, held)
                # marked: its gateway may only be stalled, and must not put the
                # reservation back with a late confirm
                await self.release(admitted, "admission_unconfirmed", mark=True)
                report.released += 1
                return
        if len(recorded) == 1:
            cost = logged.estimate
            if confirmation == "unknown":
                cost = await self._room_for(request_id, logged.at, current, logged.estimate)
            expired = ev.ReservationExpired(
                request_id=request_id,
                admitted_at=logged.at,
                cost=cost,
                estimate=logged.estimate if cost != logged.estimate else None,
                tags=logged.tags,
                budget_tags=logged.budget_tags,
                budget_subjects=logged.budget_subjects,
                key_hash=logged.key_hash,
            )
            try:
                [position] = await self.store.append(stream, 1, [ev.to_new(expired)])
            except ConcurrencyError:
                recorded = await self.store.read_stream(stream)  # the gateway recorded it just now
            else:
                await self.counters.settle(
                    request_id,
                    charged,
                    actual_nanos=to_nanos(cost),
                    position=position,
                    admitted_position=recorded[0].position,
                    admitted_at=logged.at,
                    nonce=logged.reservation,
                    mark=True,
                )
                log.warning(
                    "reservation_expired",
                    request_id=request_id,
                    charged=str(cost),
                    estimate=str(logged.estimate),
                    confirmation=confirmation,
                )
                report.expired += 1
                return
        terminal = ev.decode(recorded[1])
        cost = getattr(terminal, "cost", Decimal(0))
        await self.counters.settle(
            request_id,
            charged,
            actual_nanos=to_nanos(cost),
            position=recorded[1].position,
            admitted_position=recorded[0].position,
            admitted_at=logged.at,
            nonce=logged.reservation,
            swept=True,
            mark=True,
        )
        report.settled += 1

    async def _room_for(
        self, request_id: str, admitted_at: datetime, budgets: Sequence[Budget], estimate: Decimal
    ) -> Decimal:
        """The most an expired admission may be charged when Redis lost whether it was
        confirmed: its estimate, capped at the room its windows have left beside
        everything else the log holds (charges and other open reservations). Had it
        been confirmed, every later admission counted it and the room is there (the
        full estimate is charged); had it not, it never went upstream, and others may
        have been admitted into its room — charging it in full would overshoot."""
        wanted = room = to_nanos(estimate)
        for budget in budgets:
            if admitted_at < budget.counts_from:
                continue  # a spend reset since: this window does not count the charge
            state = await window_state(self.store.pool, budget)
            others = sum(n for rid, (n, _) in state.open.items() if rid != request_id)
            room = min(room, max(0, budget.limit_nanos - state.spent_nanos - others))
        return estimate if room >= wanted else from_nanos(room)


def _admitted_of(event: ev.RequestAdmitted, position: int, budgets: Sequence[Budget]) -> Admitted:
    """An Admitted rebuilt from its event (for the sweeper to release it)."""
    return Admitted(
        event.request_id,
        event.at,
        event.estimate,
        tuple(event.tags),
        tuple(budgets),
        position,
        event.model,
        None,
        False,
        event.reservation,
        event.key_hash,
    )


def _is_tag(subject: str) -> bool:
    return subject.startswith("tag:") and "|model:" not in subject


def tags_of(budgets: Sequence[Budget]) -> list[str]:
    return [b.name for b in budgets if _is_tag(b.subject)]


def others_of(budgets: Sequence[Budget]) -> list[str]:
    return [b.subject for b in budgets if not _is_tag(b.subject)]


def _unlimited(budget: Budget) -> Budget:
    return replace(budget, limit_nanos=2**62)
