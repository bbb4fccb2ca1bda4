"""The spend views: spend logs, and the rollups per tag, user, day and budget window."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import NamedTuple

import asyncpg
import msgspec

from ledger import events as ev
from ledger.store import RecordedEvent
from ledger.tags import TagState
from projections.allocation import SpendAllocations
from projections.budgets import BudgetWindows
from projections.runtime import Projection

_json = msgspec.json.Encoder()


class _LogRow(NamedTuple):
    """One spend_logs row; field order is the COPY column order."""

    position: int
    request_id: str
    recorded_at: datetime
    admitted_at: datetime | None
    kind: str  # spend | expired | released | denied
    model: str | None = None
    provider: str | None = None
    tags: list[str] = []  # noqa: RUF012 (never mutated: a NamedTuple default)
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


_LOG_COLUMNS = _LogRow._fields


def _split(name: str) -> tuple[str | None, str]:
    schema, _, table = name.rpartition(".")
    return (schema or None), table


class SpendLogs(Projection):
    """One row per finished, swept, released or denied request."""

    name = "spend_logs"
    tables = ("spend_logs",)
    types = frozenset({"SpendRecorded", "ReservationExpired", "RequestReleased", "RequestDenied"})

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        rows = [_log_row(r, ev.decode(r)) for r in events]
        schema, table = _split(tables["spend_logs"])
        await conn.copy_records_to_table(table, records=rows, columns=_LOG_COLUMNS, schema_name=schema)


def _log_row(r: RecordedEvent, e: ev.Event) -> _LogRow:
    if isinstance(e, ev.SpendRecorded):
        return _LogRow(
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
        return _LogRow(
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
        return _LogRow(
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
    return _LogRow(
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
class _Batch:
    definitions: dict[str, TagState] = field(default_factory=dict)
    tags: dict[str, _Sum] = field(default_factory=lambda: defaultdict(_Sum))
    daily: dict[tuple[str, date, str], _Sum] = field(default_factory=lambda: defaultdict(_Sum))
    users: dict[str, _Sum] = field(default_factory=lambda: defaultdict(_Sum))
    user_daily: dict[tuple[str, date], _Sum] = field(default_factory=lambda: defaultdict(_Sum))


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
        b = _Batch()
        for r in events:
            if r.type in ev.TAG_EVENT_TYPES:
                state = self._define(r)
                b.definitions[state.name] = state
                continue
            e = ev.decode(r)
            if isinstance(e, ev.RequestDenied):
                if e.tag:  # refusals for lack of Redis name no tag
                    b.tags[e.tag].denials += 1
                    b.tags[e.tag].seen(r.recorded_at)
                continue
            assert isinstance(e, ev.SpendRecorded | ev.ReservationExpired)
            prompt = getattr(e, "prompt_tokens", 0)
            completion = getattr(e, "completion_tokens", 0)
            model = getattr(e, "model", None) or ""
            day = r.recorded_at.date()
            cost, at = e.cost, r.recorded_at
            for tag in e.tags:
                b.tags[tag].add(cost, at)
                d = b.daily[(tag, day, model)]
                d.spend += cost  # the daily rows need no first/last: cheaper than add()
                d.requests += 1
                d.prompt += prompt
                d.completion += completion
            user = getattr(e, "user_hash", None)
            if user:
                b.users[user].add(cost, at)
                u = b.user_daily[(user, day)]
                u.spend += cost
                u.requests += 1
        await _write(conn, b, tables)


async def _write(conn: asyncpg.Connection, b: _Batch, t: Mapping[str, str]) -> None:
    if b.definitions:
        states = list(b.definitions.values())
        await conn.execute(
            f"""
            insert into {t["tag_info"]}
                (tag, live, description, max_budget, soft_budget, budget_duration, anchor)
            select * from unnest($1::text[], $2::bool[], $3::text[], $4::numeric[], $5::numeric[],
                                 $6::text[], $7::timestamptz[])
            on conflict (tag) do update set live = excluded.live, description = excluded.description,
                max_budget = excluded.max_budget, soft_budget = excluded.soft_budget,
                budget_duration = excluded.budget_duration, anchor = excluded.anchor
            """,
            [s.name for s in states],
            [s.exists for s in states],
            [s.description for s in states],
            [s.max_budget for s in states],
            [s.soft_budget for s in states],
            [s.budget_duration for s in states],
            [s.anchor for s in states],
        )
    if b.tags:
        items = list(b.tags.items())
        await conn.execute(
            f"""
            insert into {t["tag_info"]}
                (tag, total_spend, request_count, denial_count, first_seen, last_seen)
            select * from unnest($1::text[], $2::numeric[], $3::bigint[], $4::bigint[],
                                 $5::timestamptz[], $6::timestamptz[])
            on conflict (tag) do update set
                total_spend = {t["tag_info"]}.total_spend + excluded.total_spend,
                request_count = {t["tag_info"]}.request_count + excluded.request_count,
                denial_count = {t["tag_info"]}.denial_count + excluded.denial_count,
                first_seen = least({t["tag_info"]}.first_seen, excluded.first_seen),
                last_seen = greatest({t["tag_info"]}.last_seen, excluded.last_seen)
            """,
            [k for k, _ in items],
            [v.spend for _, v in items],
            [v.requests for _, v in items],
            [v.denials for _, v in items],
            [v.first for _, v in items],
            [v.last for _, v in items],
        )
    if b.daily:
        items2 = list(b.daily.items())
        tbl = t["tag_daily_spend"]
        await conn.execute(
            f"""
            insert into {tbl} (tag, day, model, spend, requests, prompt_tokens, completion_tokens)
            select * from unnest($1::text[], $2::date[], $3::text[], $4::numeric[], $5::bigint[],
                                 $6::bigint[], $7::bigint[])
            on conflict (tag, day, model) do update set spend = {tbl}.spend + excluded.spend,
                requests = {tbl}.requests + excluded.requests,
                prompt_tokens = {tbl}.prompt_tokens + excluded.prompt_tokens,
                completion_tokens = {tbl}.completion_tokens + excluded.completion_tokens
            """,
            [k[0] for k, _ in items2],
            [k[1] for k, _ in items2],
            [k[2] for k, _ in items2],
            [v.spend for _, v in items2],
            [v.requests for _, v in items2],
            [v.prompt for _, v in items2],
            [v.completion for _, v in items2],
        )
    if b.users:
        items3 = list(b.users.items())
        tbl = t["user_spend"]
        await conn.execute(
            f"""
            insert into {tbl} (user_hash, spend, requests, first_seen, last_seen)
            select * from unnest($1::text[], $2::numeric[], $3::bigint[],
                                 $4::timestamptz[], $5::timestamptz[])
            on conflict (user_hash) do update set spend = {tbl}.spend + excluded.spend,
                requests = {tbl}.requests + excluded.requests,
                first_seen = least({tbl}.first_seen, excluded.first_seen),
                last_seen = greatest({tbl}.last_seen, excluded.last_seen)
            """,
            [k for k, _ in items3],
            [v.spend for _, v in items3],
            [v.requests for _, v in items3],
            [v.first for _, v in items3],
            [v.last for _, v in items3],
        )
    if b.user_daily:
        items4 = list(b.user_daily.items())
        tbl = t["user_daily_spend"]
        await conn.execute(
            f"""
            insert into {tbl} (user_hash, day, spend, requests)
            select * from unnest($1::text[], $2::date[], $3::numeric[], $4::bigint[])
            on conflict (user_hash, day) do update set spend = {tbl}.spend + excluded.spend,
                requests = {tbl}.requests + excluded.requests
            """,
            [k[0] for k, _ in items4],
            [k[1] for k, _ in items4],
            [v.spend for _, v in items4],
            [v.requests for _, v in items4],
        )


PROJECTIONS: dict[str, type[Projection]] = {
    "spend_logs": SpendLogs,
    "spend_rollups": SpendRollups,
    "budget_windows": BudgetWindows,
    "spend_allocations": SpendAllocations,
}


def create(name: str) -> Projection:
    return PROJECTIONS[name]()
