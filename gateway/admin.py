"""Admin API for tag budgets, on LiteLLM's paths with LiteLLM's request fields
and response shapes, budget-ledger's richer fields alongside.

POST /tag/new, POST|GET /tag/info, POST /tag/update, POST /tag/delete,
GET /tag/list, GET /tag/{name}/history. Bodies are msgspec Structs that forbid
unknown fields; every client mistake is an OpenAI-style error naming the field.
The helpers here (body decoding, LiteLLM fields budget-ledger does not have,
per-model budgets, LiteLLM's budget table) serve the key and customer APIs too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from gateway.appkeys import BUDGET_BOOK, COUNTERS, METRICS, REQUEST_ID, SETTINGS, STORE, TAGS
from gateway.errors import ApiError
from gateway.metrics import render
from ledger import events as ev
from ledger.alerts import forecast
from ledger.domain.money import from_nanos
from ledger.postgres.queries import seen_tags, tag_totals_view
from ledger.postgres.store import NUL_ESCAPE
from ledger.tags import TagState

routes = web.RouteTableDef()

T = TypeVar("T")

_encoder = msgspec.json.Encoder(decimal_format="number")


# ------------------------------------------------------------------ shared shapes


class ModelBudgetIn(msgspec.Struct, forbid_unknown_fields=True):
    """One entry of LiteLLM's ``model_max_budget`` (a bare number is its max_budget)."""

    max_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None


ModelBudgets = dict[str, ModelBudgetIn | Decimal]


def model_budgets(value: ModelBudgets | None) -> dict[str, ev.ModelBudget] | None:
    if value is None:
        return None
    return {
        model: ev.ModelBudget(max_budget=b)
        if isinstance(b, Decimal)
        else ev.ModelBudget(b.max_budget, b.budget_duration, b.tpm_limit, b.rpm_limit)
        for model, b in value.items()
    }


class BudgetTable(msgspec.Struct):
    """LiteLLM's ``litellm_budget_table``: the budget and limits of a tag, key or end user."""

    budget_id: str | None
    max_budget: Decimal | None
    soft_budget: Decimal | None
    max_parallel_requests: int | None
    tpm_limit: int | None
    rpm_limit: int | None
    model_max_budget: dict[str, ev.ModelBudget] | None
    budget_duration: str | None
    budget_reset_at: datetime | None
    created_at: datetime | None = None
    updated_at: datetime | None = None


def budget_table(owner: Any, reset_at: datetime | None) -> BudgetTable | UnsetType:
    """The budget table of anything with LiteLLM's budget fields; absent (as in
    LiteLLM) when none of them is set."""
    fields = (
        "budget_id",
        "max_budget",
        "soft_budget",
        "max_parallel_requests",
        "tpm_limit",
        "rpm_limit",
        "model_max_budget",
        "budget_duration",
    )
    if all(getattr(owner, f) is None for f in fields):
        return UNSET
    return BudgetTable(
        **{f: getattr(owner, f) for f in fields},
        budget_reset_at=reset_at,
        created_at=getattr(owner, "created_at", None),
        updated_at=getattr(owner, "updated_at", None),
    )


def refuse_unsupported(body: msgspec.Struct, names: Iterable[str], neutral: Iterable[Any] = ()) -> None:
    """LiteLLM settings budget-ledger does not have are accepted only with a value
    that asks for nothing (null, {}, [], false), so a script that sends its
    defaults runs, and one that relies on such a setting learns it is not there."""
    allowed = list(neutral)
    for name in names:
        value = getattr(body, name)
        if value is None or value is UNSET or value is False or value in ({}, []) or value in allowed:
            continue
        raise ApiError(
            422,
            f"{name} is a LiteLLM setting that budget-ledger does not support; omit it or send null",
            param=name,
            code="unsupported_field",
        )


# ------------------------------------------------------------------ bodies


class TagNew(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    models: list[str] | None = None
    metadata: dict[str, Any] = {}
    alert_thresholds: list[Decimal] | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: ModelBudgets | None = None
    budget_id: str | None = None
    # LiteLLM computes model_info itself (model id -> name); accepted and ignored
    model_info: dict[str, str] | None = None


class TagUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    description: str | UnsetType | None = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    models: list[str] | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    alert_thresholds: list[Decimal] | UnsetType | None = UNSET
    tpm_limit: int | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    model_max_budget: ModelBudgets | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET
    model_info: dict[str, str] | None = None
    # LiteLLM: set the tag's spend (0 clears it); null leaves it alone
    spend: Decimal | None = None


class TagName(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class TagNames(msgspec.Struct, forbid_unknown_fields=True):
    names: list[str]


class TagInfo(msgspec.Struct):
    name: str
    description: str | None
    max_budget: Decimal | None
    soft_budget: Decimal | None
    budget_duration: str | None
    models: list[str] | None
    metadata: dict[str, Any]
    spend: Decimal  # in the current window (0 without a budget)
    reserved: Decimal  # estimates of requests in flight in the current window
    remaining: Decimal | None  # max_budget - spend - reserved, never below 0
    window_start: datetime | None
    reset_at: datetime | None
    total_spend: Decimal
    request_count: int
    created_at: datetime | None
    updated_at: datetime | None
    alert_thresholds: list[Decimal] = []
    # at the window's burn rate so far, when the budget runs out (None: not this window)
    forecast_exhausted_at: datetime | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ev.ModelBudget] | None = None
    budget_id: str | None = None
    spend_reset_at: datetime | None = None  # the last /tag/update with "spend"
    defined: bool = True  # False: a tag only seen in traffic, with no definition
    # the budget template this tag's budget comes from (e.g. "customer:*"), if any
    budget_source: str | None = None
    # LiteLLM's fields
    model_info: dict[str, str] = {}
    created_by: str | None = None
    litellm_budget_table: BudgetTable | UnsetType = UNSET


class TagChanged(msgspec.Struct):
    """LiteLLM's answer to /tag/new and /tag/update."""

    message: str
    tag: TagInfo


class TagDeleted(msgspec.Struct):
    message: str
    name: str


class FieldChange(msgspec.Struct):
    old: Any
    new: Any


class HistoryItem(msgspec.Struct):
    version: int
    type: str
    at: datetime
    recorded_at: datetime
    actor: str
    request_id: str | None
    changes: dict[str, FieldChange]


_PATH_RE = re.compile(r"`\$\.?([^`]*)`")
_FIELD_RE = re.compile(r"field `([^`]+)`")


async def decode_body(request: web.Request, kind: type[T]) -> T:
    """Read at most LEDGER_MAX_ADMIN_BODY_BYTES and decode them as ``kind``."""
    limit = request.app[SETTINGS].max_admin_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body too large: at most {limit} bytes", param="body")
    body = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body too large: at most {limit} bytes", param="body")
    if not body.strip():
        raise ApiError(400, "request body is empty: send a JSON object", param="body")
    if NUL_ESCAPE.search(body):
        raise ApiError(
            400, "request body contains a NUL character (\\u0000), which cannot be stored", param="body"
        )
    try:
        return msgspec.json.decode(bytes(body), type=kind)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _PATH_RE.search(text) or _FIELD_RE.search(text)
        param = m[1] if m and m[1] else None
        raise ApiError(400, f"invalid request body: {text}", param=param) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", param="body") from None
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 JSON: {e.reason}", param="body") from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_encoder.encode(data), status=status, content_type="application/json", headers=headers
    )


# ------------------------------------------------------------------ views


async def tag_infos(request: web.Request, states: list[TagState]) -> list[TagInfo]:
    counters = request.app[COUNTERS]
    definitions = request.app[BUDGET_BOOK].definitions
    totals = await tag_totals_view(request.app[STORE].pool, [s.name for s in states])
    now = request.app[TAGS].now()
    out = []
    for s in states:
        spend = reserved = Decimal(0)
        remaining: Decimal | None = None
        window_start = reset_at = None
        # What is in force: the tag's own budget, or its template's (budget_source).
        spec = definitions.tag(s.name)
        source = spec.source if spec is not None else None
        if source is not None:
            template = definitions.tags[source]
            s = replace(
                s,
                max_budget=template.max_budget,
                soft_budget=template.soft_budget,
                budget_duration=template.budget_duration,
                alert_thresholds=template.alert_thresholds,
                anchor=template.anchor,
            )
        budget = spec.budget(now) if spec is not None else None
        if budget is not None:
            counter = await counters.read(budget)
            spend = from_nanos(counter.spent_nanos)
            reserved = from_nanos(counter.reserved_nanos)
            remaining = max(Decimal(0), from_nanos(budget.limit_nanos) - spend - reserved)
            reset_at = budget.reset_at
            window_start = budget.window.start if reset_at is not None else s.anchor
        t = totals.get(s.name)
        out.append(
            TagInfo(
                name=s.name,
                description=s.description,
                max_budget=s.max_budget,
                soft_budget=s.soft_budget,
                budget_duration=s.budget_duration,
                models=s.models,
                metadata=s.metadata,
                spend=spend,
                reserved=reserved,
                remaining=remaining,
                window_start=window_start,
                reset_at=reset_at,
                total_spend=t.total_spend if t else Decimal(0),
                request_count=t.request_count if t else 0,
                created_at=s.created_at,
                updated_at=s.updated_at,
                alert_thresholds=s.thresholds if s.has_budget else [],
                forecast_exhausted_at=forecast(spend, s.max_budget, window_start, reset_at, now),
                tpm_limit=s.tpm_limit,
                rpm_limit=s.rpm_limit,
                max_parallel_requests=s.max_parallel_requests,
                model_max_budget=s.model_max_budget,
                budget_id=s.budget_id,
                spend_reset_at=s.spend_reset_at,
                created_by="admin",
                litellm_budget_table=budget_table(s, reset_at),
                budget_source=source,
            )
        )
    return out


def _fields(body: TagNew | TagUpdate) -> ev.TagFields:
    return ev.TagFields(
        description=body.description,
        max_budget=body.max_budget,
        soft_budget=body.soft_budget,
        budget_duration=body.budget_duration,
        models=body.models,
        metadata=body.metadata,
        alert_thresholds=body.alert_thresholds,
        tpm_limit=body.tpm_limit,
        rpm_limit=body.rpm_limit,
        max_parallel_requests=body.max_parallel_requests,
        model_max_budget=body.model_max_budget
        if body.model_max_budget is UNSET
        else model_budgets(body.model_max_budget),
        budget_id=body.budget_id,
    )


async def _fresh(request: web.Request) -> None:
    """Make this process's budget cache see the change it just made."""
    await request.app[BUDGET_BOOK].refresh()


# ------------------------------------------------------------------ routes


@routes.post("/tag/new")
async def tag_new(request: web.Request) -> web.Response:
    body = await decode_body(request, TagNew)
    state = await request.app[TAGS].create(body.name, _fields(body), request_id=request[REQUEST_ID])
    await _fresh(request)
    [info] = await tag_infos(request, [state])
    return json_response(TagChanged(message=f"tag {body.name!r} created", tag=info))


@routes.post("/tag/update")
async def tag_update(request: web.Request) -> web.Response:
    body = await decode_body(request, TagUpdate)
    state = await request.app[TAGS].update(
        body.name, _fields(body), spend=body.spend, request_id=request[REQUEST_ID]
    )
    await _fresh(request)
    [info] = await tag_infos(request, [state])
    return json_response(TagChanged(message=f"tag {body.name!r} updated", tag=info))


@routes.post("/tag/delete")
async def tag_delete(request: web.Request) -> web.Response:
    body = await decode_body(request, TagName)
    await request.app[TAGS].delete(body.name, request_id=request[REQUEST_ID])
    await _fresh(request)
    return json_response(TagDeleted(message=f"tag {body.name!r} deleted", name=body.name))


@routes.post("/tag/info")
async def tag_info_post(request: web.Request) -> web.Response:
    body = await decode_body(request, TagNames)
    return await _info(request, body.names)


@routes.get("/tag/info")
async def tag_info_get(request: web.Request) -> web.Response:
    names = [n.strip() for raw in request.query.getall("names", []) for n in raw.split(",")]
    names = [n for n in names if n]
    return await _info(request, names)


async def _info(request: web.Request, names: list[str]) -> web.Response:
    if not names:
        raise ApiError(400, "names must list at least one tag name", param="names")
    if len(names) > 1000:
        raise ApiError(400, "names may list at most 1000 tags", param="names")
    definitions = request.app[BUDGET_BOOK].definitions
    known = [n for n in names if definitions.template_of(n) is not None and n not in definitions.tags]
    # a tag a template gives a budget exists as far as budgets go, defined or not
    states = await request.app[TAGS].get_many([n for n in names if n not in known])
    states += [TagState(name=n, version=0, exists=True) for n in known]
    infos = await tag_infos(request, states)
    return json_response({i.name: i for i in infos})


def _day(request: web.Request, name: str) -> date | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw) if len(raw) == 10 else None
    except ValueError:
        return None


_LIST_PARAMS = frozenset({"start_date", "end_date"})


@routes.get("/tag/list")
async def tag_list(request: web.Request) -> web.Response:
    """Defined tags, then (as LiteLLM does) tags only seen in traffic; with
    start_date and end_date, only seen tags with charges on those days."""
    for name, value in request.query.items():
        if name not in _LIST_PARAMS:
            raise ApiError(400, f"unknown query parameter {name!r}; known: end_date, start_date", param=name)
        if _day(request, name) is None:
            raise ApiError(400, f"{name} must be a date (YYYY-MM-DD), got {value[:40]!r}", param=name)
    first, last = _day(request, "start_date"), _day(request, "end_date")
    if (first is None) != (last is None):
        raise ApiError(
            400, "start_date and end_date go together", param="start_date" if first is None else "end_date"
        )
    if first is not None and last is not None and first > last:
        raise ApiError(400, "start_date must be on or before end_date", param="end_date")
    book = request.app[BUDGET_BOOK]
    await book.refresh()
    states = sorted((s for s in book.tags.values() if s.exists), key=lambda s: s.name)
    out = await tag_infos(request, states)
    live = {s.name for s in states}
    for r in await seen_tags(request.app[STORE].pool, first, last):
        if r["tag"] in live:
            continue
        out.append(
            TagInfo(
                name=r["tag"],
                description="a tag seen in traffic with no definition: no budget, no model list",
                max_budget=None,
                soft_budget=None,
                budget_duration=None,
                models=None,
                metadata={},
                spend=Decimal(0),
                reserved=Decimal(0),
                remaining=None,
                window_start=None,
                reset_at=None,
                total_spend=Decimal(r["total_spend"]),
                request_count=int(r["request_count"]),
                created_at=r["first_seen"],
                updated_at=r["last_seen"],
                defined=False,
            )
        )
    return json_response(out)


@routes.get("/tag/{name}/history")
async def tag_history(request: web.Request) -> web.Response:
    entries = await request.app[TAGS].history(request.match_info["name"])
    items = []
    for e in entries:
        event = e.event
        changes: dict[str, FieldChange] = {}
        if isinstance(event, ev.TagCreated):
            for f in ev.TagFields.__struct_fields__:
                value = getattr(event, f)
                if value not in (None, {}):
                    changes[f] = FieldChange(None, value)
        elif isinstance(event, ev.TagUpdated):
            for f in ev.TagFields.__struct_fields__:
                new = getattr(event.changes, f)
                if new is not UNSET:
                    old = getattr(event.previous, f)
                    changes[f] = FieldChange(None if old is UNSET else old, new)
        elif isinstance(event, ev.TagSpendReset):
            changes["spend"] = FieldChange(None, event.spend)
        items.append(
            HistoryItem(
                version=e.version,
                type=e.type,
                at=event.at,
                recorded_at=e.recorded_at,
                actor=event.actor,
                request_id=event.request_id,
                changes=changes,
            )
        )
    return json_response(items)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return render(request.app[METRICS])
