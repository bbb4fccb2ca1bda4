"""The spend views: spend logs, and the rollups per tag, user, day and budget window."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

import asyncpg
import msgspec

from ledger import events as ev
from ledger.events import RecordedEvent
from ledger.tags import TagState
from projections.allocation import SpendAllocations
from projections.budgets import BudgetWindows
from projections.rows import Row, Upsert, copy_rows
from projections.runtime import Projection

_json = msgspec.json.Encoder()


class LogRow(Row, frozen=True):
    """One spend_logs row."""

    position: int
    request_id: str
    recorded_at: datetime
    admitted_at: datetime | None
    kind: str  # spend | expired | released | denied
    model: str | None = None
    provider: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    user_hash: str | None = None
    metadata: str = "{}"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    status: int | None = None
    latency_ms: float | None = None
    streamed: bool = False
    denied_tag: str | None = None
    estimate: Decimal | None = None
    reason: str | None = None
    usage_clamped: bool = False
    key_hash: str | None = None  # the client key's hash (not a secret)


class SpendLogs(Projection):
    """One row per finished, swept, released or denied request."""

    name = "spend_logs"
    tables = ("spend_logs",)
    types = frozenset({"SpendRecorded", "ReservationExpired", "RequestReleased", "RequestDenied"})

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        rows = [_log_row(r, ev.decode(r)) for r in events]
        await copy_rows(conn, tables["spend_logs"], LogRow, rows)


def _log_row(r: RecordedEvent, e: ev.Event) -> LogRow:
    if isinstance(e, ev.SpendRecorded):
        return LogRow(
            r.position,
            e.request_id,
            r.recorded_at,
            e.admitted_at,
            "spend",
            model=e.model,
            provider=e.provider,
            tags=e.tags,
            user_hash=e.user_hash,
            metadata=_json.encode(e.metadata).decode(),
            prompt_tokens=e.prompt_tokens,
            completion_tokens=e.completion_tokens,
            cost=e.cost,
            status=e.status,
            latency_ms=e.latency_ms,
            streamed=e.streamed,
            usage_clamped=e.usage_clamped,
            key_hash=e.key_hash,
        )
    if isinstance(e, ev.ReservationExpired):
        return LogRow(
            r.position,
            e.request_id,
            r.recorded_at,
            e.admitted_at,
            "expired",
            tags=e.tags,
            cost=e.cost,
            key_hash=e.key_hash,
        )
    if isinstance(e, ev.RequestReleased):
        return LogRow(
            r.position,
            e.request_id,
            r.recorded_at,
            e.admitted_at,
            "released",
            tags=e.tags,
            status=e.status,
            reason=e.reason,
            key_hash=e.key_hash,
        )
    assert isinstance(e, ev.RequestDenied)
    return LogRow(
        r.position,
        e.request_id,
        r.recorded_at,
        None,
        "denied",
        model=e.model,
        tags=e.tags,
        user_hash=e.user_hash,
        metadata=_json.encode(e.metadata).decode(),
        status=429 if e.reason != "redis_unavailable" else 503,
        denied_tag=e.tag or None,
        estimate=e.estimate,
        reason=e.reason,
        key_hash=e.key_hash,
    )


class TagDefinition(Row, frozen=True):
    """The defined fields of a tag_info row (its spend columns are TagTotals')."""

    tag: str
    live: bool
    description: str | None
    max_budget: Decimal | None
    soft_budget: Decimal | None
    budget_duration: str | None
    anchor: datetime | None


class TagTotals(Row, frozen=True):
    """The spend columns of a tag_info row."""

    tag: str
    total_spend: Decimal
    request_count: int
    denial_count: int
    first_seen: datetime | None
    last_seen: datetime | None


class TagDay(Row, frozen=True):
    tag: str
    day: date
    model: str  # "" when the event names none
    spend: Decimal
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UserTotals(Row, frozen=True):
    user_hash: str
    spend: Decimal
    requests: int
    first_seen: datetime
    last_seen: datetime


class UserDay(Row, frozen=True):
    user_hash: str
    day: date
    spend: Decimal
    requests: int


# A batch's rows are merged into the stored ones: definitions replace, spend adds up.
_DEFINE_TAGS = Upsert(TagDefinition, key=("tag",))
_ADD_TAGS = Upsert(
    TagTotals,
    key=("tag",),
    add=("total_spend", "request_count", "denial_count"),
    least=("first_seen",),
    greatest=("last_seen",),
)
_ADD_TAG_DAYS = Upsert(
    TagDay,
    key=("tag", "day", "model"),
    add=("spend", "requests", "prompt_tokens", "completion_tokens"),
)
_ADD_USERS = Upsert(
    UserTotals,
    key=("user_hash",),
    add=("spend", "requests"),
    least=("first_seen",),
    greatest=("last_seen",),
)
_ADD_USER_DAYS = Upsert(UserDay, key=("user_hash", "day"), add=("spend", "requests"))


@dataclass(slots=True)
class _Sum:
    spend: Decimal = Decimal(0)
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    first: datetime | None = None
    last: datetime | None = None
    denials: int = 0

    def add(self, cost: Decimal, at: datetime, prompt: int = 0, completion: int = 0) -> None:
        self.spend += cost
        self.requests += 1
        self.prompt += prompt
        self.completion += completion
        self.seen(at)

    def seen(self, at: datetime) -> None:
        self.first = at if self.first is None or at < self.first else self.first
        self.last = at if self.last is None or at > self.last else self.last


@dataclass(slots=True)
class SpendRows:
    """One batch's rollup rows, each keyed by its table's conflict key."""

    tags: dict[str, TagTotals] = field(default_factory=dict)
    daily: dict[tuple[str, date, str], TagDay] = field(default_factory=dict)
    users: dict[str, UserTotals] = field(default_factory=dict)
    user_daily: dict[tuple[str, date], UserDay] = field(default_factory=dict)


Charge = ev.SpendRecorded | ev.ReservationExpired | ev.RequestDenied


def spend_rows(events: Iterable[tuple[datetime, Charge]]) -> SpendRows:
    """Sum (recorded_at, event) pairs into rollup rows, exactly (Decimal); no IO.

    A charge counts for each of its tags and its end user; a denial counts for
    the tag that refused it (refusals for lack of Redis name none).
    """
    tags: dict[str, _Sum] = defaultdict(_Sum)
    daily: dict[tuple[str, date, str], _Sum] = defaultdict(_Sum)
    users: dict[str, _Sum] = defaultdict(_Sum)
    user_daily: dict[tuple[str, date], _Sum] = defaultdict(_Sum)
    for at, e in events:
        if isinstance(e, ev.RequestDenied):
            if e.tag:
                tags[e.tag].denials += 1
                tags[e.tag].seen(at)
            continue
        prompt = getattr(e, "prompt_tokens", 0)
        completion = getattr(e, "completion_tokens", 0)
        model = getattr(e, "model", None) or ""
        day = at.date()
        cost = e.cost
        for tag in e.tags:
            tags[tag].add(cost, at)
            d = daily[(tag, day, model)]
            d.spend += cost  # the daily rows need no first/last: cheaper than add()
            d.requests += 1
            d.prompt += prompt
            d.completion += completion
        user = getattr(e, "user_hash", None)
        if user:
            users[user].add(cost, at)
            u = user_daily[(user, day)]
            u.spend += cost
            u.requests += 1
    return SpendRows(
        tags={k: TagTotals(k, v.spend, v.requests, v.denials, v.first, v.last) for k, v in tags.items()},
        daily={
            k: TagDay(
                *k, spend=v.spend, requests=v.requests, prompt_tokens=v.prompt, completion_tokens=v.completion
            )
            for k, v in daily.items()
        },
        users={
            k: UserTotals(k, v.spend, v.requests, _seen(v.first), _seen(v.last)) for k, v in users.items()
        },
        user_daily={k: UserDay(*k, spend=v.spend, requests=v.requests) for k, v in user_daily.items()},
    )


def _seen(at: datetime | None) -> datetime:
    assert at is not None  # a user's sum exists only once a charge was added to it
    return at


class SpendRollups(Projection):
    """tag_info, tag_daily_spend, user_spend, user_daily_spend."""

    name = "spend_rollups"
    tables = ("tag_info", "tag_daily_spend", "user_spend", "user_daily_spend")
    types = frozenset({*ev.TAG_EVENT_TYPES, "SpendRecorded", "ReservationExpired", "RequestDenied"})

    def __init__(self) -> None:
        self.definitions: dict[str, TagState] = {}

    async def load(self, conn: asyncpg.Connection, position: int) -> None:
        """Tag definitions as of ``position``: windows of charges depend on them."""
        self.definitions = {}
        rows = await conn.fetch(
            "select position, stream, version, type, data::text, recorded_at from events "
            "where type = any($1::text[]) and position <= $2 order by position",
            list(ev.TAG_EVENT_TYPES),
            position,
        )
        for row in rows:
            self._define(RecordedEvent(row[0], row[1], row[2], row[3], row[4], row[5]))

    def _define(self, r: RecordedEvent) -> TagState:
        event = ev.decode_tag(r)
        state = self.definitions.get(event.name) or TagState(name=event.name, version=0)
        state = state.apply(event, r.version)
        self.definitions[event.name] = state
        return state

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        defined: dict[str, TagState] = {}
        charges: list[tuple[datetime, Charge]] = []
        for r in events:
            if r.type in ev.TAG_EVENT_TYPES:
                state = self._define(r)
                defined[state.name] = state
                continue
            e = ev.decode(r)
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired | ev.RequestDenied)
            charges.append((r.recorded_at, e))
        # Definitions and spend write different columns of tag_info: their order does not matter.
        await _DEFINE_TAGS.run(
            conn,
            tables["tag_info"],
            [
                TagDefinition(
                    s.name, s.exists, s.description, s.max_budget, s.soft_budget, s.budget_duration, s.anchor
                )
                for s in defined.values()
            ],
        )
        rows = spend_rows(charges)
        await _ADD_TAGS.run(conn, tables["tag_info"], list(rows.tags.values()))
        await _ADD_TAG_DAYS.run(conn, tables["tag_daily_spend"], list(rows.daily.values()))
        await _ADD_USERS.run(conn, tables["user_spend"], list(rows.users.values()))
        await _ADD_USER_DAYS.run(conn, tables["user_daily_spend"], list(rows.user_daily.values()))


PROJECTIONS: dict[str, type[Projection]] = {
    "spend_logs": SpendLogs,
    "spend_rollups": SpendRollups,
    "budget_windows": BudgetWindows,
    "spend_allocations": SpendAllocations,
}


def create(name: str) -> Projection:
    return PROJECTIONS[name]()
