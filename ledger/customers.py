"""End users ("customers" in LiteLLM): a budget, limits and a blocked flag per
``user`` value, kept as events under the keyed hash of that value.

The admin API accepts the raw id and hashes it on arrival with the secret the
gateway uses for the request's ``user`` field, so an end user's definition and
its traffic meet under the same hash, and the raw id is stored nowhere.
Commands load the stream, decide, and append at the version they decided on,
like tags; ``CustomerBook`` is the in-memory copy the request path reads.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from msgspec import UNSET

from ledger import events as ev
from ledger.domain import limits
from ledger.domain.windows import LIFETIME, Window, parse_duration, window_at
from ledger.errors import ConcurrencyError, LedgerError
from ledger.events import RecordedEvent
from ledger.postgres.follow import FollowedCache
from ledger.postgres.store import EventStore

MAX_USER_ID = 4096


class CustomerError(LedgerError):
    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidCustomer(CustomerError):
    status = 422


class CustomerNotFound(CustomerError):
    status = 404


class CustomerExists(CustomerError):
    status = 409


class CustomerConflict(CustomerError):
    status = 409


@dataclass(frozen=True, slots=True)
class CustomerState:
    user_hash: str
    version: int
    exists: bool = False
    alias: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ev.ModelBudget] | None = None
    budget_id: str | None = None
    blocked: bool = False
    created_at: datetime | None = None
    updated_at: datetime | None = None
    anchor: datetime | None = None  # fixed-duration windows count from here

    @property
    def has_budget(self) -> bool:
        return self.exists and self.max_budget is not None

    def window(self, now: datetime) -> Window:
        if not self.budget_duration:
            return LIFETIME
        assert self.anchor is not None
        return window_at(parse_duration(self.budget_duration), self.anchor, now)

    def apply(self, event: ev.CustomerEvent, version: int) -> CustomerState:
        if isinstance(event, ev.CustomerCreated):
            return CustomerState(
                user_hash=self.user_hash,
                version=version,
                exists=True,
                alias=event.alias,
                max_budget=event.max_budget,
                soft_budget=event.soft_budget,
                budget_duration=event.budget_duration,
                tpm_limit=event.tpm_limit,
                rpm_limit=event.rpm_limit,
                max_parallel_requests=event.max_parallel_requests,
                model_max_budget=event.model_max_budget,
                budget_id=event.budget_id,
                blocked=event.blocked,
                created_at=event.at,
                updated_at=event.at,
                anchor=event.at,
            )
        if isinstance(event, ev.CustomerUpdated):
            updates = {
                f: getattr(event.changes, f)
                for f in ev.CustomerFields.__struct_fields__
                if getattr(event.changes, f) is not UNSET
            }
            anchor = self.anchor
            if "budget_duration" in updates and updates["budget_duration"] != self.budget_duration:
                anchor = event.at
            return replace(self, version=version, updated_at=event.at, anchor=anchor, **updates)
        if isinstance(event, ev.CustomerBlocked | ev.CustomerUnblocked):
            blocked = isinstance(event, ev.CustomerBlocked)
            return replace(self, version=version, updated_at=event.at, blocked=blocked)
        return CustomerState(user_hash=self.user_hash, version=version, exists=False, updated_at=event.at)


def replay(user_hash: str, recorded: list[RecordedEvent]) -> CustomerState:
    state = CustomerState(user_hash=user_hash, version=0)
    for r in recorded:
        state = state.apply(ev.decode_customer(r), r.version)
    return state


def validate_user_id(user_id: object, field: str = "user_id") -> str:
    """A raw end-user id as the gateway would see it in ``user``."""
    if not isinstance(user_id, str) or not 1 <= len(user_id) <= MAX_USER_ID:
        raise InvalidCustomer(f"{field} must be a string of 1 to {MAX_USER_ID} characters", field)
    return user_id


_LIMITS = (
    ("tpm_limit", limits.MAX_TPM),
    ("rpm_limit", limits.MAX_RPM),
    ("max_parallel_requests", limits.MAX_PARALLEL),
)


def validate_fields(fields: ev.CustomerFields, current: CustomerState | None) -> ev.CustomerFields:
    changes: dict[str, Any] = {}
    try:
        for name in ("alias", "budget_id"):
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.label(value, name)
        for name in ("max_budget", "soft_budget"):
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.money(value, name)
        if fields.budget_duration is not UNSET:
            changes["budget_duration"] = limits.duration(fields.budget_duration, "budget_duration")
        for name, maximum in _LIMITS:
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.rate_limit(value, name, maximum)
        if fields.model_max_budget is not UNSET:
            changes["model_max_budget"] = limits.model_budgets(fields.model_max_budget, "model_max_budget")
    except limits.FieldError as e:
        raise InvalidCustomer(str(e), e.field) from None
    result = ev.CustomerFields(**changes)

    def after(name: str) -> Any:
        value = getattr(result, name)
        return value if value is not UNSET else (getattr(current, name) if current else None)

    max_budget, soft_budget = after("max_budget"), after("soft_budget")
    if max_budget is not None and soft_budget is not None and soft_budget > max_budget:
        raise InvalidCustomer(
            f"soft_budget ({soft_budget}) must not exceed max_budget ({max_budget})", "soft_budget"
        )
    if after("budget_duration") is not None and max_budget is None:
        raise InvalidCustomer("budget_duration needs a max_budget", "budget_duration")
    return result


def _or_none(value: Any) -> Any:
    return None if value is UNSET else value


class CustomerService:
    """End-user commands over the event store, by user hash."""

    def __init__(self, store: EventStore, *, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.now = clock or (lambda: datetime.now(UTC))

    async def load(self, user_hash: str) -> CustomerState:
        return replay(user_hash, await self.store.read_stream(ev.stream_of_customer(user_hash)))

    async def get(self, user_hash: str) -> CustomerState:
        state = await self.load(user_hash)
        if not state.exists:
            raise CustomerNotFound("no such end user", "user_id")
        return state

    async def create(
        self,
        user_hash: str,
        fields: ev.CustomerFields,
        *,
        blocked: bool = False,
        request_id: str | None = None,
    ) -> CustomerState:
        state = await self.load(user_hash)
        if state.exists:
            raise CustomerExists("this end user already exists", "user_id")
        checked = validate_fields(fields, None)
        event = ev.CustomerCreated(
            user_hash=user_hash,
            at=self.now(),
            alias=_or_none(checked.alias),
            max_budget=_or_none(checked.max_budget),
            soft_budget=_or_none(checked.soft_budget),
            budget_duration=_or_none(checked.budget_duration),
            tpm_limit=_or_none(checked.tpm_limit),
            rpm_limit=_or_none(checked.rpm_limit),
            max_parallel_requests=_or_none(checked.max_parallel_requests),
            model_max_budget=_or_none(checked.model_max_budget),
            budget_id=_or_none(checked.budget_id),
            blocked=blocked,
            request_id=request_id,
        )
        try:
            await self.store.append(ev.stream_of_customer(user_hash), state.version, [ev.to_new(event)])
        except ConcurrencyError:
            raise CustomerExists("this end user already exists", "user_id") from None
        return state.apply(event, state.version + 1)

    async def update(
        self,
        user_hash: str,
        fields: ev.CustomerFields,
        *,
        blocked: bool | None = None,
        request_id: str | None = None,
        attempts: int = 20,
    ) -> CustomerState:
        """Partial update; ``blocked`` becomes a CustomerBlocked/Unblocked event when it changes."""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            state = await self.get(user_hash)
            at = self.now()
            checked = validate_fields(fields, state)
            set_fields = [f for f in ev.CustomerFields.__struct_fields__ if getattr(checked, f) is not UNSET]
            events: list[ev.CustomerEvent] = []
            if set_fields or blocked is None:
                previous = ev.CustomerFields(**{f: getattr(state, f) for f in set_fields})
                events.append(ev.CustomerUpdated(user_hash, at, checked, previous, request_id=request_id))
            if blocked is not None and blocked != state.blocked:
                kind = ev.CustomerBlocked if blocked else ev.CustomerUnblocked
                events.append(kind(user_hash, at, request_id=request_id))
            if not events:
                return state  # only "blocked", already as asked
            try:
                await self.store.append(
                    ev.stream_of_customer(user_hash), state.version, [ev.to_new(e) for e in events]
                )
            except ConcurrencyError:
                continue
            for event in events:
                state = state.apply(event, state.version + 1)
            return state
        raise CustomerConflict("this end user is being changed concurrently; retry", "user_id")

    async def set_blocked(
        self, user_hash: str, blocked: bool, *, create: bool = False, request_id: str | None = None
    ) -> CustomerState:
        """Block or unblock; LiteLLM's /customer/block also creates an unknown end user, blocked."""
        for _ in range(20):
            state = await self.load(user_hash)
            if not state.exists:
                if not create:
                    raise CustomerNotFound("no such end user", "user_ids")
                try:
                    return await self.create(
                        user_hash, ev.CustomerFields(), blocked=blocked, request_id=request_id
                    )
                except CustomerExists:
                    continue
            if state.blocked == blocked:
                return state
            kind = ev.CustomerBlocked if blocked else ev.CustomerUnblocked
            event = kind(user_hash, self.now(), request_id=request_id)
            try:
                await self.store.append(ev.stream_of_customer(user_hash), state.version, [ev.to_new(event)])
            except ConcurrencyError:
                continue
            return state.apply(event, state.version + 1)
        raise CustomerConflict("this end user is being changed concurrently; retry", "user_ids")

    async def delete(self, user_hash: str, *, request_id: str | None = None) -> CustomerState:
        state = await self.get(user_hash)
        event = ev.CustomerDeleted(user_hash, self.now(), request_id=request_id)
        try:
            await self.store.append(ev.stream_of_customer(user_hash), state.version, [ev.to_new(event)])
        except ConcurrencyError:
            raise CustomerConflict(
                "this end user changed while it was being deleted; retry", "user_ids"
            ) from None
        return state.apply(event, state.version + 1)


class CustomerBook(FollowedCache):
    """Every end user's definition, in memory, kept fresh from the log (the
    request path reads budgets, limits and ``blocked`` from here)."""

    types = ev.CUSTOMER_EVENT_TYPES

    def __init__(self, store: EventStore, *, poll_interval_s: float = 1.0) -> None:
        super().__init__(store, poll_interval_s=poll_interval_s)
        self.customers: dict[str, CustomerState] = {}

    def apply(self, recorded: RecordedEvent) -> None:
        event = ev.decode_customer(recorded)
        state = self.customers.get(event.user_hash) or CustomerState(user_hash=event.user_hash, version=0)
        state = state.apply(event, recorded.version)
        if state.exists:
            self.customers[event.user_hash] = state
        else:
            self.customers.pop(event.user_hash, None)

    def get(self, user_hash: str) -> CustomerState | None:
        return self.customers.get(user_hash)

    def blocked(self, user_hash: str) -> bool:
        state = self.customers.get(user_hash)
        return state is not None and state.blocked
