"""Event types: the source of truth. Meanings never change; new fields get defaults.

Streams:
* ``tag:<name>``        TagCreated, TagUpdated, TagDeleted, TagSpendReset
* ``request:<id>``      RequestAdmitted (version 1), then exactly one terminal
                        event at version 2: SpendRecorded, RequestReleased or
                        ReservationExpired (the stream's version check makes
                        "exactly one" a database guarantee, not a hope)
* ``customer:<hash>``   CustomerCreated, CustomerUpdated, CustomerBlocked,
                        CustomerUnblocked, CustomerDeleted (end users)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

# --------------------------------------------------------------------- tags


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append. ``data`` is its JSON payload, already encoded."""

    type: str
    data: bytes


class RecordedEvent(msgspec.Struct, frozen=True):
    """An event as stored. ``data`` is its JSON text; decode it with a typed Decoder."""

    position: int
    stream: str
    version: int
    type: str
    data: str
    recorded_at: datetime


class ModelBudget(msgspec.Struct, frozen=True, omit_defaults=True):
    """A budget and limits for one model (an entry of LiteLLM's ``model_max_budget``)."""

    max_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None


class TagFields(msgspec.Struct, frozen=True, omit_defaults=True):
    """The editable fields of a tag; UNSET means "not part of this change"."""

    description: str | UnsetType | None = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    models: list[str] | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    alert_thresholds: list[Decimal] | UnsetType | None = UNSET  # fractions of max_budget
    # LiteLLM's limits (tokens and requests per minute, requests in flight) and
    # per-model budgets: recorded here, enforced on the request path.
    tpm_limit: int | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    model_max_budget: dict[str, ModelBudget] | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET  # LiteLLM's budget table id: a label here


class TagCreated(msgspec.Struct, frozen=True, tag=True):
    name: str
    at: datetime
    description: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    models: list[str] | None = None
    metadata: dict[str, Any] = {}
    actor: str = "admin"
    request_id: str | None = None
    alert_thresholds: list[Decimal] | None = None  # None: the default 0.5, 0.8, 1.0
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ModelBudget] | None = None
    budget_id: str | None = None


class TagUpdated(msgspec.Struct, frozen=True, tag=True):
    name: str
    at: datetime
    changes: TagFields  # new values of the changed fields
    previous: TagFields  # their values before the change
    actor: str = "admin"
    request_id: str | None = None


class TagDeleted(msgspec.Struct, frozen=True, tag=True):
    name: str
    at: datetime
    actor: str = "admin"
    request_id: str | None = None


class TagSpendReset(msgspec.Struct, frozen=True, tag=True):
    """LiteLLM's ``spend`` on /tag/update: the tag's spend is set to ``spend`` at ``at``.

    Meaning: in the budget window that contains ``at``, charges admitted before
    ``at`` no longer count against the budget and ``spend`` counts in their
    place; charges admitted from ``at`` on count as usual; other windows are
    untouched. The definition of the tag does not change."""

    name: str
    at: datetime
    spend: Decimal = Decimal(0)
    actor: str = "admin"
    request_id: str | None = None


TagEvent = TagCreated | TagUpdated | TagDeleted | TagSpendReset
TAG_EVENT_TYPES = ("TagCreated", "TagUpdated", "TagDeleted", "TagSpendReset")


# ----------------------------------------------------------------- requests


class BudgetWindow(msgspec.Struct, frozen=True):
    """A budget window a request reserved on: its subject (``tag:<name>``), the
    definition's budget epoch, and the window's bounds."""

    subject: str
    epoch: int
    start: datetime
    end: datetime


class RequestAdmitted(msgspec.Struct, frozen=True, tag=True):
    """A request passed its budgets: ``estimate`` is reserved on ``budget_tags``."""

    request_id: str
    at: datetime  # admission time: decides which window the request counts in
    estimate: Decimal
    deadline: datetime  # after this, an unsettled reservation is swept
    tags: list[str] = []
    budget_tags: list[str] = []
    model: str | None = None
    # admitted while Redis was down (LEDGER_ON_REDIS_DOWN=allow): nothing reserved
    unreserved: bool = False
    # the windows the estimate was reserved on (empty for older events and unreserved ones)
    windows: list[BudgetWindow] = []
    # budgeted subjects other than tags (API keys, end users), e.g. "key:<hash>"
    budget_subjects: list[str] = []
    # names this admission attempt's reservation in the counters (a request id may be
    # tried again; only the attempt that holds a reservation may settle it)
    reservation: str = ""
    key_hash: str | None = None  # the client key's hash (None: the admin key)


class SpendRecorded(msgspec.Struct, frozen=True, tag=True):
    """What a request actually cost. Self-contained so views need no join."""

    request_id: str
    admitted_at: datetime
    cost: Decimal
    tags: list[str] = []
    budget_tags: list[str] = []
    model: str | None = None
    provider: str | None = None
    user_hash: str | None = None
    metadata: dict[str, Any] = {}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    status: int = 200
    streamed: bool = False
    unpriced: bool = False  # no known price: cost recorded as 0
    # "upstream" (its usage); "partial" (the client left mid-stream: what was
    # produced, counted); "counted_tokenizer" / "counted_bytes" (a stream that
    # ended without usage: what it produced, counted with the model's tokenizer,
    # or one token per byte, an upper bound); "estimate" (nothing reported: the
    # reserved upper bound)
    usage_source: str = "upstream"
    budget_subjects: list[str] = []
    # the upstream reported usage beyond what the request could use (over the
    # bound that was reserved, or the storable range): the tokens above were
    # clamped to the bound, and the upstream's own figures are kept here
    usage_clamped: bool = False
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None
    key_hash: str | None = None


class RequestReleased(msgspec.Struct, frozen=True, tag=True):
    """An admitted request that never ran (or failed before costing anything)."""

    request_id: str
    admitted_at: datetime
    reason: str
    tags: list[str] = []
    budget_tags: list[str] = []
    status: int | None = None  # the upstream's status, when it answered
    budget_subjects: list[str] = []
    key_hash: str | None = None


class ReservationExpired(msgspec.Struct, frozen=True, tag=True):
    """An admitted request whose gateway never settled it: charged at its estimate
    (or less: see ``estimate``)."""

    request_id: str
    admitted_at: datetime
    cost: Decimal  # the estimate, charged because the outcome is unknown
    tags: list[str] = []
    budget_tags: list[str] = []
    budget_subjects: list[str] = []
    key_hash: str | None = None
    # Set when ``cost`` is less than the estimate: Redis lost whether the admission
    # was confirmed, and its windows had only ``cost`` of room left (admission.py).
    estimate: Decimal | None = None


class RequestDenied(msgspec.Struct, frozen=True, tag=True):
    """A request refused by a budget. Stream ``denied:<request id>``: a client may
    retry a denied id, so denials are not part of the request stream."""

    request_id: str
    at: datetime
    tag: str
    spent: Decimal
    reserved: Decimal
    estimate: Decimal
    max_budget: Decimal
    reset_at: datetime | None = None
    tags: list[str] = []
    model: str | None = None
    # "budget"; "redis_unavailable": refused because budgets could not be checked;
    # "budget_recheck": admitted, then refused when a lost counter could not take it back;
    # "rpm_limit", "tpm_limit", "max_parallel_requests": refused by that rate limit
    reason: str = "budget"
    user_hash: str | None = None
    metadata: dict[str, Any] = {}
    key_hash: str | None = None
    subject: str | None = None  # what refused it: "tag:<name>", "key:<hash>", "user:<hash>", ...


RequestEvent = RequestAdmitted | SpendRecorded | RequestReleased | ReservationExpired | RequestDenied
# Terminal events that charge money, and those that do not.
CHARGING_TYPES = ("SpendRecorded", "ReservationExpired")
TERMINAL_TYPES = ("SpendRecorded", "ReservationExpired", "RequestReleased")

# ------------------------------------------------------------------- alerts


class BudgetThresholdCrossed(msgspec.Struct, frozen=True, tag=True):
    """A window's spend reached ``threshold`` x max_budget (or the soft budget).

    Stream ``alert:<tag>:<window start>:<threshold|soft>``, version 1: exactly once
    per tag, window and threshold, however many processes or replays try."""

    tag: str
    window_start: datetime
    reset_at: datetime | None
    threshold: Decimal | None  # None for the soft budget
    kind: str  # "threshold" or "soft_budget"
    spend: Decimal
    max_budget: Decimal
    soft_budget: Decimal | None = None
    at: datetime | None = None


class BudgetForecastExceeded(msgspec.Struct, frozen=True, tag=True):
    """At the window's burn rate the budget runs out before it resets.

    Stream ``forecast:<tag>:<window start>``, version 1: once per window."""

    tag: str
    window_start: datetime
    reset_at: datetime
    predicted_at: datetime
    spend: Decimal
    max_budget: Decimal
    at: datetime | None = None


class AlertDelivered(msgspec.Struct, frozen=True, tag=True):
    alert_position: int
    webhook: str
    attempt: int
    status: int


class AlertDeliveryFailed(msgspec.Struct, frozen=True, tag=True):
    alert_position: int
    webhook: str
    attempt: int
    error: str
    final: bool = False  # no more attempts


AlertEvent = BudgetThresholdCrossed | BudgetForecastExceeded
ALERT_TYPES = ("BudgetThresholdCrossed", "BudgetForecastExceeded")
DeliveryEvent = AlertDelivered | AlertDeliveryFailed

Event = TagEvent | RequestEvent | AlertEvent | DeliveryEvent

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)
_tag_decoder: msgspec.json.Decoder[TagEvent] = msgspec.json.Decoder(TagEvent)


def to_new(event: msgspec.Struct) -> NewEvent:
    """Encode an event for the store. The type lives in its own column, so the
    JSON payload carries the fields only."""
    raw = msgspec.to_builtins(event)
    kind = raw.pop("type")
    return NewEvent(kind, _encoder.encode(raw))


# Set by shared_decoding(): log position -> the event decoded there.
_shared: ContextVar[dict[int, Event] | None] = ContextVar("shared_decoding", default=None)


@contextmanager
def shared_decoding() -> Iterator[None]:
    """Within this block (and the tasks it starts), decode() decodes each log
    position once: a replay hands one batch to several projections, which would
    otherwise each decode the same events. Events are immutable and a position
    always holds the same event, so sharing the decoded value is safe."""
    token = _shared.set({})
    try:
        yield
    finally:
        _shared.reset(token)


def decode(recorded: RecordedEvent) -> Event:
    shared = _shared.get()
    if shared is None:
        return _decoder.decode(tagged(recorded))
    event = shared.get(recorded.position)
    if event is None:
        event = shared[recorded.position] = _decoder.decode(tagged(recorded))
    return event


def decode_tag(recorded: RecordedEvent) -> TagEvent:
    return _tag_decoder.decode(tagged(recorded))


def tagged(recorded: RecordedEvent) -> str:
    """The payload with its type tag re-inserted, so msgspec can pick the Struct."""
    body = recorded.data[1:].lstrip()
    sep = "" if body.startswith("}") else ","
    return f'{{"type":"{recorded.type}"{sep}{body}'


def stream_of_tag(name: str) -> str:
    return f"tag:{name}"


def stream_of_request(request_id: str) -> str:
    return f"request:{request_id}"


def subjects_of(event: RequestAdmitted | SpendRecorded | ReservationExpired | RequestReleased) -> list[str]:
    """Every budgeted subject of a request event: its budgeted tags, then the rest."""
    return [f"tag:{t}" for t in event.budget_tags] + list(event.budget_subjects)


# ================================================================ end users
# Added for LiteLLM's /customer/* API (end-user budgets). Stream
# ``customer:<user hash>``: the raw end-user id is never stored; the admin API
# hashes it on arrival with the secret the gateway uses for the ``user`` field.


class CustomerFields(msgspec.Struct, frozen=True, omit_defaults=True):
    """The editable fields of an end user; UNSET means "not part of this change"."""

    alias: str | UnsetType | None = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    tpm_limit: int | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    model_max_budget: dict[str, ModelBudget] | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET


class CustomerCreated(msgspec.Struct, frozen=True, tag=True):
    user_hash: str
    at: datetime
    alias: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ModelBudget] | None = None
    budget_id: str | None = None
    blocked: bool = False  # a blocked end user's requests are refused
    actor: str = "admin"
    request_id: str | None = None


class CustomerUpdated(msgspec.Struct, frozen=True, tag=True):
    user_hash: str
    at: datetime
    changes: CustomerFields  # new values of the changed fields
    previous: CustomerFields  # their values before the change
    actor: str = "admin"
    request_id: str | None = None


class CustomerBlocked(msgspec.Struct, frozen=True, tag=True):
    user_hash: str
    at: datetime
    actor: str = "admin"
    request_id: str | None = None


class CustomerUnblocked(msgspec.Struct, frozen=True, tag=True):
    user_hash: str
    at: datetime
    actor: str = "admin"
    request_id: str | None = None


class CustomerDeleted(msgspec.Struct, frozen=True, tag=True):
    user_hash: str
    at: datetime
    actor: str = "admin"
    request_id: str | None = None


CustomerEvent = CustomerCreated | CustomerUpdated | CustomerBlocked | CustomerUnblocked | CustomerDeleted
CUSTOMER_EVENT_TYPES = (
    "CustomerCreated",
    "CustomerUpdated",
    "CustomerBlocked",
    "CustomerUnblocked",
    "CustomerDeleted",
)
_customer_decoder: msgspec.json.Decoder[CustomerEvent] = msgspec.json.Decoder(CustomerEvent)


def decode_customer(recorded: RecordedEvent) -> CustomerEvent:
    return _customer_decoder.decode(tagged(recorded))


def stream_of_customer(user_hash: str) -> str:
    return f"customer:{user_hash}"
