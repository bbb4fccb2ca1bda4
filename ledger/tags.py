"""The tag aggregate: a tag's budget definition, loaded by replaying its stream.

Commands validate their input, turn it into events, and save them with the
stream version they were decided on (optimistic concurrency): a concurrent
change makes the save fail instead of being lost. ``TagService.update`` retries
such a conflict on the fresh state a few times before giving up with a 409.
"""

from __future__ import annotations

import asyncio
import random
import unicodedata
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from msgspec import UNSET

from ledger import events as ev
from ledger.domain import limits
from ledger.domain.money import MoneyError, parse_usd
from ledger.domain.windows import LIFETIME, Duration, DurationError, Window, parse_duration, window_at
from ledger.errors import ConcurrencyError, LedgerError
from ledger.events import RecordedEvent
from ledger.postgres.store import EventStore

MAX_NAME = 128
DEFAULT_THRESHOLDS = (Decimal("0.5"), Decimal("0.8"), Decimal("1.0"))
MAX_DESCRIPTION = 2000
MAX_MODELS = 200
MAX_METADATA_BYTES = 8 * 1024


class TagError(LedgerError):
    """Base class of tag command errors; ``field`` names the offending input."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidTag(TagError):
    status = 422


class TagNotFound(TagError):
    status = 404

    def __init__(self, names: list[str]) -> None:
        listed = ", ".join(repr(n) for n in names)
        super().__init__(f"tag{'s' if len(names) > 1 else ''} not found: {listed}", "names")
        self.names = names


class TagExists(TagError):
    status = 409

    def __init__(self, name: str) -> None:
        super().__init__(f"tag {name!r} already exists", "name")


class TagConflict(TagError):
    status = 409


# ------------------------------------------------------------------ validation

_LIMITS = (
    ("tpm_limit", limits.MAX_TPM),
    ("rpm_limit", limits.MAX_RPM),
    ("max_parallel_requests", limits.MAX_PARALLEL),
)


def validate_spend(value: object) -> Decimal:
    """LiteLLM's ``spend`` on /tag/update: what the tag's spend is set to."""
    try:
        return parse_usd(value, "spend")
    except MoneyError as e:
        raise InvalidTag(str(e), "spend") from None


def validate_name(name: object, field_name: str = "name") -> str:
    if not isinstance(name, str):
        raise InvalidTag(f"{field_name} must be a string", field_name)
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidTag(f"{field_name} must be 1 to {MAX_NAME} characters long", field_name)
    if name != name.strip():
        raise InvalidTag(f"{field_name} must not start or end with whitespace", field_name)
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidTag(
                f"{field_name} must be printable: {ch!r} (U+{ord(ch):04X}) is not allowed",
                field_name,
            )
    return name


def _validate_fields(fields: ev.TagFields, current: TagState | None) -> ev.TagFields:
    """Check every field that is set; cross-check with the state it will produce."""
    changes: dict[str, Any] = {}
    if fields.description is not UNSET:
        if fields.description is not None and len(fields.description) > MAX_DESCRIPTION:
            raise InvalidTag(f"description must be at most {MAX_DESCRIPTION} characters", "description")
        changes["description"] = fields.description
    for money_field in ("max_budget", "soft_budget"):
        value = getattr(fields, money_field)
        if value is not UNSET and value is not None:
            try:
                changes[money_field] = parse_usd(value, money_field)
            except MoneyError as e:
                raise InvalidTag(str(e), money_field) from None
        elif value is None:
            changes[money_field] = None
    if fields.budget_duration is not UNSET:
        if fields.budget_duration is not None:
            try:
                parse_duration(fields.budget_duration)
            except DurationError as e:
                raise InvalidTag(str(e), "budget_duration") from None
        changes["budget_duration"] = fields.budget_duration
    if fields.models is not UNSET:
        if fields.models is not None:
            if len(fields.models) > MAX_MODELS:
                raise InvalidTag(f"models must list at most {MAX_MODELS} models", "models")
            for m in fields.models:
                if not m or len(m) > 256 or m != m.strip():
                    raise InvalidTag(f"models contains an invalid model name {m!r}", "models")
            changes["models"] = sorted(set(fields.models))
        else:
            changes["models"] = None
    if fields.alert_thresholds is not UNSET:
        if fields.alert_thresholds is not None:
            values = []
            for t in fields.alert_thresholds:
                if not isinstance(t, Decimal) or not t.is_finite() or not Decimal(0) < t <= Decimal(10):
                    raise InvalidTag(
                        "alert_thresholds must be fractions of max_budget in (0, 10]", "alert_thresholds"
                    )
                values.append(t)
            if len(values) > 10:
                raise InvalidTag("alert_thresholds may list at most 10 thresholds", "alert_thresholds")
            changes["alert_thresholds"] = sorted(set(values))
        else:
            changes["alert_thresholds"] = None
    if fields.metadata is not UNSET:
        if len(msgspec.json.encode(fields.metadata)) > MAX_METADATA_BYTES:
            raise InvalidTag(f"metadata must encode to at most {MAX_METADATA_BYTES} bytes", "metadata")
        changes["metadata"] = fields.metadata
    try:
        for name, maximum in _LIMITS:
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.rate_limit(value, name, maximum)
        if fields.model_max_budget is not UNSET:
            changes["model_max_budget"] = limits.model_budgets(fields.model_max_budget, "model_max_budget")
        if fields.budget_id is not UNSET:
            changes["budget_id"] = limits.label(fields.budget_id, "budget_id")
    except limits.FieldError as e:
        raise InvalidTag(str(e), e.field) from None
    result = ev.TagFields(**changes)
    after_max = (
        result.max_budget if result.max_budget is not UNSET else (current.max_budget if current else None)
    )
    after_soft = (
        result.soft_budget if result.soft_budget is not UNSET else (current.soft_budget if current else None)
    )
    after_duration = (
        result.budget_duration
        if result.budget_duration is not UNSET
        else (current.budget_duration if current else None)
    )
    if after_soft is not None and after_max is not None and after_soft > after_max:
        raise InvalidTag(
            f"soft_budget ({after_soft}) must not exceed max_budget ({after_max})", "soft_budget"
        )
    if after_duration is not None and after_max is None:
        raise InvalidTag("budget_duration needs a max_budget", "budget_duration")
    return result


# ------------------------------------------------------------------ the aggregate


@dataclass(frozen=True, slots=True)
class TagState:
    name: str
    version: int  # stream version this state reflects
    exists: bool = False
    description: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    models: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    alert_thresholds: list[Decimal] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Windows of fixed durations are counted from here: creation or last duration change.
    anchor: datetime | None = None
    # LiteLLM's limits, recorded with the definition; the request path enforces them.
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ev.ModelBudget] | None = None
    budget_id: str | None = None
    # The last TagSpendReset: from this moment, spend in its window restarts at spend_reset_to.
    spend_reset_at: datetime | None = None
    spend_reset_to: Decimal | None = None

    @property
    def duration(self) -> Duration | None:
        return parse_duration(self.budget_duration) if self.budget_duration else None

    @property
    def thresholds(self) -> list[Decimal]:
        return self.alert_thresholds if self.alert_thresholds is not None else list(DEFAULT_THRESHOLDS)

    @property
    def has_budget(self) -> bool:
        return self.exists and self.max_budget is not None

    def window(self, now: datetime) -> Window:
        """The budget window containing ``now`` (one lifetime window without a duration)."""
        duration = self.duration
        if duration is None:
            return LIFETIME
        assert self.anchor is not None
        return window_at(duration, self.anchor, now)

    def apply(self, event: ev.TagEvent, version: int) -> TagState:
        if isinstance(event, ev.TagCreated):
            # A deleted tag can be created again: a new lifecycle, same stream.
            return TagState(
                name=self.name,
                version=version,
                exists=True,
                description=event.description,
                max_budget=event.max_budget,
                soft_budget=event.soft_budget,
                budget_duration=event.budget_duration,
                models=event.models,
                metadata=dict(event.metadata),
                alert_thresholds=event.alert_thresholds,
                created_at=event.at,
                updated_at=event.at,
                anchor=event.at,
                tpm_limit=event.tpm_limit,
                rpm_limit=event.rpm_limit,
                max_parallel_requests=event.max_parallel_requests,
                model_max_budget=event.model_max_budget,
                budget_id=event.budget_id,
            )
        if isinstance(event, ev.TagSpendReset):
            return replace(self, version=version, spend_reset_at=event.at, spend_reset_to=event.spend)
        if isinstance(event, ev.TagUpdated):
            updates = {
                f: getattr(event.changes, f)
                for f in ev.TagFields.__struct_fields__
                if getattr(event.changes, f) is not UNSET
            }
            anchor = self.anchor
            if "budget_duration" in updates and updates["budget_duration"] != self.budget_duration:
                anchor = event.at
            return replace(self, version=version, updated_at=event.at, anchor=anchor, **updates)
        return TagState(name=self.name, version=version, exists=False, updated_at=event.at)


def replay(name: str, recorded: list[RecordedEvent]) -> TagState:
    state = TagState(name=name, version=0)
    for r in recorded:
        state = state.apply(ev.decode_tag(r), r.version)
    return state


# ------------------------------------------------------------------ commands


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    version: int
    type: str
    recorded_at: datetime
    event: ev.TagEvent


class TagService:
    """Tag commands and reads over the event store."""

    def __init__(self, store: EventStore, *, clock: Any = None) -> None:
        self.store = store
        self.now: Any = clock or (lambda: datetime.now(UTC))

    async def load(self, name: str) -> TagState:
        return replay(name, await self.store.read_stream(ev.stream_of_tag(name)))

    async def create(self, name: str, fields: ev.TagFields, *, request_id: str | None = None) -> TagState:
        validate_name(name)
        state = await self.load(name)
        if state.exists:
            raise TagExists(name)
        checked = _validate_fields(fields, None)
        event = ev.TagCreated(
            name=name,
            at=self.now(),
            description=_or_none(checked.description),
            max_budget=_or_none(checked.max_budget),
            soft_budget=_or_none(checked.soft_budget),
            budget_duration=_or_none(checked.budget_duration),
            models=_or_none(checked.models),
            metadata=checked.metadata if checked.metadata is not UNSET else {},
            alert_thresholds=_or_none(checked.alert_thresholds),
            tpm_limit=_or_none(checked.tpm_limit),
            rpm_limit=_or_none(checked.rpm_limit),
            max_parallel_requests=_or_none(checked.max_parallel_requests),
            model_max_budget=_or_none(checked.model_max_budget),
            budget_id=_or_none(checked.budget_id),
            request_id=request_id,
        )
        try:
            await self.store.append(ev.stream_of_tag(name), state.version, [ev.to_new(event)])
        except ConcurrencyError:
            raise TagExists(name) from None  # someone created it a moment ago
        return state.apply(event, state.version + 1)

    async def update(
        self,
        name: str,
        fields: ev.TagFields,
        *,
        spend: Decimal | None = None,
        request_id: str | None = None,
        attempts: int = 20,
    ) -> TagState:
        """Partial update. A lost version race is retried on fresh state (with a
        little jitter so racers spread out), never lost; 409 only after ``attempts``.

        ``spend`` (LiteLLM's field) also records a TagSpendReset, in the same
        append as the change: both happen or neither."""
        validate_name(name)
        reset_to = validate_spend(spend) if spend is not None else None
        only_reset = reset_to is not None and fields == ev.TagFields()
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
            state = await self.load(name)
            if not state.exists:
                raise TagNotFound([name])
            at = self.now()
            events: list[ev.TagEvent] = []
            if not only_reset:
                checked = _validate_fields(fields, state)
                set_fields = [f for f in ev.TagFields.__struct_fields__ if getattr(checked, f) is not UNSET]
                previous = ev.TagFields(**{f: getattr(state, f) for f in set_fields})
                events.append(
                    ev.TagUpdated(name=name, at=at, changes=checked, previous=previous, request_id=request_id)
                )
            if reset_to is not None:
                events.append(ev.TagSpendReset(name=name, at=at, spend=reset_to, request_id=request_id))
            try:
                await self.store.append(ev.stream_of_tag(name), state.version, [ev.to_new(e) for e in events])
            except ConcurrencyError:
                continue
            for event in events:
                state = state.apply(event, state.version + 1)  # apply() stamps the new version
            return state
        raise TagConflict(f"tag {name!r} is being changed concurrently; retry", "name")

    async def delete(self, name: str, *, request_id: str | None = None) -> TagState:
        validate_name(name)
        state = await self.load(name)
        if not state.exists:
            raise TagNotFound([name])
        event = ev.TagDeleted(name=name, at=self.now(), request_id=request_id)
        try:
            await self.store.append(ev.stream_of_tag(name), state.version, [ev.to_new(event)])
        except ConcurrencyError:
            raise TagConflict(f"tag {name!r} changed while it was being deleted; retry", "name") from None
        return state.apply(event, state.version + 1)

    async def get_many(self, names: list[str]) -> list[TagState]:
        """Live tags in the order asked; TagNotFound lists every unknown name."""
        for n in names:
            validate_name(n, "names")
        states = [await self.load(n) for n in dict.fromkeys(names)]
        missing = [s.name for s in states if not s.exists]
        if missing:
            raise TagNotFound(missing)
        return states

    async def history(self, name: str) -> list[HistoryEntry]:
        validate_name(name)
        recorded = await self.store.read_stream(ev.stream_of_tag(name))
        if not recorded:
            raise TagNotFound([name])
        return [HistoryEntry(r.version, r.type, r.recorded_at, ev.decode_tag(r)) for r in recorded]


def _or_none(value: Any) -> Any:
    return None if value is UNSET else value
