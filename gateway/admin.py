"""Admin API for tag budgets, with LiteLLM-compatible paths and field names.

POST /tag/new, POST|GET /tag/info, POST /tag/update, POST /tag/delete,
GET /tag/list, GET /tag/{name}/history. Bodies are msgspec Structs that forbid
unknown fields; every client mistake is an OpenAI-style error naming the field.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from gateway.errors import ApiError
from gateway.keys import BUDGET_BOOK, COUNTERS, KEY_BOOK, METRICS, REQUEST_ID, STORE, TAGS
from gateway.metrics import render
from ledger import events as ev
from ledger.alerts import forecast
from ledger.apikeys import ApiKey, KeyNotFound
from ledger.budgets import budget_of
from ledger.money import from_nanos
from ledger.queries import tag_totals_view
from ledger.store import NUL_ESCAPE
from ledger.tags import TagError, TagState, validate_name

routes = web.RouteTableDef()

MAX_ADMIN_BODY = 64 * 1024
T = TypeVar("T")

_encoder = msgspec.json.Encoder(decimal_format="number")


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


class TagUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    description: str | UnsetType | None = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    models: list[str] | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    alert_thresholds: list[Decimal] | UnsetType | None = UNSET


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
    """Read at most MAX_ADMIN_BODY bytes and decode them as ``kind``."""
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        raise ApiError(413, f"request body too large: at most {MAX_ADMIN_BODY} bytes", param="body")
    body = bytearray()
    async for chunk in request.content.iter_chunked(65536):
        body += chunk
        if len(body) > MAX_ADMIN_BODY:
            raise ApiError(413, f"request body too large: at most {MAX_ADMIN_BODY} bytes", param="body")
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


def json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(data), status=status, content_type="application/json")


# ------------------------------------------------------------------ views


async def tag_infos(request: web.Request, states: list[TagState]) -> list[TagInfo]:
    counters = request.app[COUNTERS]
    totals = await tag_totals_view(request.app[STORE].pool, [s.name for s in states])
    now = request.app[TAGS].now()
    out = []
    for s in states:
        spend = reserved = Decimal(0)
        remaining: Decimal | None = None
        window_start = reset_at = None
        if s.has_budget:
            budget = budget_of(s, now)
            counter = await counters.read(budget)
            spend, reserved = from_nanos(counter.spent_nanos), from_nanos(counter.reserved_nanos)
            assert s.max_budget is not None
            remaining = max(Decimal(0), s.max_budget - spend - reserved)
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
    return json(info, status=201)


@routes.post("/tag/update")
async def tag_update(request: web.Request) -> web.Response:
    body = await decode_body(request, TagUpdate)
    state = await request.app[TAGS].update(body.name, _fields(body), request_id=request[REQUEST_ID])
    await _fresh(request)
    [info] = await tag_infos(request, [state])
    return json(info)


@routes.post("/tag/delete")
async def tag_delete(request: web.Request) -> web.Response:
    body = await decode_body(request, TagName)
    await request.app[TAGS].delete(body.name, request_id=request[REQUEST_ID])
    await _fresh(request)
    return json(TagDeleted(message=f"tag {body.name!r} deleted", name=body.name))


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
    states = await request.app[TAGS].get_many(names)
    infos = await tag_infos(request, states)
    return json({i.name: i for i in infos})


@routes.get("/tag/list")
async def tag_list(request: web.Request) -> web.Response:
    book = request.app[BUDGET_BOOK]
    await book.refresh()
    states = sorted((s for s in book.tags.values() if s.exists), key=lambda s: s.name)
    return json(await tag_infos(request, states))


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
    return json(items)


# ------------------------------------------------------------------ API keys


class KeyGenerate(msgspec.Struct, forbid_unknown_fields=True):
    key_alias: str | None = None
    tags: list[str] = []
    allowed_models: list[str] | None = None
    metadata: dict[str, Any] = {}


class KeyRef(msgspec.Struct, forbid_unknown_fields=True):
    key: str  # the secret, or its key_hash as /key/list shows it


class KeyView(msgspec.Struct):
    key_hash: str
    key_prefix: str
    key_alias: str | None
    tags: list[str]
    allowed_models: list[str] | None
    metadata: dict[str, Any]
    created_at: datetime


class KeyCreated(KeyView):
    key: str  # shown once, never again


class KeyDeletedView(msgspec.Struct):
    message: str
    key_hash: str


def _key_view(k: ApiKey) -> dict[str, Any]:
    return {
        "key_hash": k.key_hash,
        "key_prefix": k.key_prefix,
        "key_alias": k.key_alias,
        "tags": list(k.tags),
        "allowed_models": list(k.allowed_models) if k.allowed_models is not None else None,
        "metadata": k.metadata,
        "created_at": k.created_at,
    }


@routes.post("/key/generate")
async def key_generate(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyGenerate)
    if body.key_alias is not None and not 1 <= len(body.key_alias) <= 256:
        raise ApiError(422, "key_alias must be 1 to 256 characters", param="key_alias")
    for tag in body.tags:
        try:
            validate_name(tag, "tags")
        except TagError as e:
            raise ApiError(422, str(e), param="tags") from None
    if len(body.tags) > 64:
        raise ApiError(422, "tags may list at most 64 tags", param="tags")
    if len(msgspec.json.encode(body.metadata)) > 8192:
        raise ApiError(422, "metadata must encode to at most 8192 bytes", param="metadata")
    secret, key = await request.app[KEY_BOOK].generate(
        key_alias=body.key_alias,
        tags=body.tags,
        allowed_models=body.allowed_models,
        metadata=body.metadata,
        request_id=request[REQUEST_ID],
    )
    return json(KeyCreated(key=secret, **_key_view(key)), status=201)


@routes.post("/key/info")
async def key_info(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyRef)
    book = request.app[KEY_BOOK]
    key = book.find(body.key)
    if key is None:
        await book.refresh()
        key = book.find(body.key)
    if key is None:
        raise ApiError(404, "no such key", type="not_found_error", param="key")
    return json(KeyView(**_key_view(key)))


@routes.post("/key/delete")
async def key_delete(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyRef)
    try:
        key = await request.app[KEY_BOOK].delete(body.key, request_id=request[REQUEST_ID])
    except KeyNotFound as e:
        raise ApiError(404, str(e), type="not_found_error", param="key") from None
    return json(KeyDeletedView(message="key deleted", key_hash=key.key_hash))


@routes.get("/key/list")
async def key_list(request: web.Request) -> web.Response:
    book = request.app[KEY_BOOK]
    await book.refresh()
    keys = sorted(book.keys.values(), key=lambda k: k.created_at)
    return json([KeyView(**_key_view(k)) for k in keys])


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return render(request.app[METRICS])
