"""Admin API for client keys, on LiteLLM's paths and shapes.

POST /key/generate, GET|POST /key/info, POST /key/update, POST /key/delete,
GET /key/list. A key is shown once, at generation; afterwards it is named by
its ``key_hash`` (LiteLLM's ``token``/``token_id``), which is not a secret and
may travel in a URL. Spend comes from the spend log (``key_hash`` column).
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from gateway.admin import (
    BudgetTable,
    ModelBudgets,
    budget_table,
    decode_body,
    json_response,
    model_budgets,
    refuse_unsupported,
)
from gateway.appkeys import KEY_BOOK, REQUEST_ID, STORE
from gateway.errors import ApiError
from gateway.spend_api import int_param
from ledger import events as ev
from ledger.apikeys import ApiKey, ApiKeyError, KeyBook, KeyFields
from ledger.domain.windows import LIFETIME
from ledger.postgres.queries import spend_of

routes = web.RouteTableDef()

# LiteLLM key settings budget-ledger does not have (accepted only when they ask for nothing).
_UNSUPPORTED = (
    "aliases",
    "config",
    "permissions",
    "allowed_cache_controls",
    "guardrails",
    "policies",
    "prompts",
    "enforced_params",
    "allowed_routes",
    "allowed_passthrough_routes",
    "allowed_vector_store_indexes",
    "access_group_ids",
    "model_rpm_limit",
    "model_tpm_limit",
    "router_settings",
    "object_permission",
    "organization_id",
    "project_id",
    "auto_rotate",
    "rotation_interval",
    "tpm_limit_type",
    "rpm_limit_type",
)


class _KeySettings(msgspec.Struct, forbid_unknown_fields=True):
    key_alias: str | None = None
    duration: str | None = None  # lifetime: Ns, Nm, Nh, Nd, Nw, Nmo; null = never expires
    models: list[str] | None = None  # LiteLLM: the models the key may use; [] or null = all
    allowed_models: list[str] | None = None  # budget-ledger's name; [] = none
    tags: list[str] | None = None
    # tags requests with this key may carry besides its own: names, "prefix:*", "*" for any;
    # absent: its own tags and those under them
    allowed_tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    user_id: str | None = None
    team_id: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: ModelBudgets | None = None
    budget_id: str | None = None
    blocked: bool | None = None
    send_invite_email: bool | None = None  # no e-mail is sent; accepted and ignored
    aliases: Any = None
    config: Any = None
    permissions: Any = None
    allowed_cache_controls: Any = None
    guardrails: Any = None
    policies: Any = None
    prompts: Any = None
    enforced_params: Any = None
    allowed_routes: Any = None
    allowed_passthrough_routes: Any = None
    allowed_vector_store_indexes: Any = None
    access_group_ids: Any = None
    model_rpm_limit: Any = None
    model_tpm_limit: Any = None
    router_settings: Any = None
    object_permission: Any = None
    organization_id: Any = None
    project_id: Any = None
    auto_rotate: Any = None
    rotation_interval: Any = None
    tpm_limit_type: Any = None
    rpm_limit_type: Any = None
    key_type: Any = None


class KeyGenerate(_KeySettings, forbid_unknown_fields=True):
    key: str | None = None  # a caller-chosen key (kept as its hash only), e.g. to keep old keys
    spend: Decimal | None = None  # LiteLLM's starting spend: only 0 here


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Partial: a field that is absent stays as it is; null clears it."""

    key: str | None = None  # the key or its key_hash; without it, key_alias names the key
    key_alias: str | UnsetType | None = UNSET
    duration: str | None = None  # a new lifetime, counted from now
    models: list[str] | UnsetType | None = UNSET
    allowed_models: list[str] | UnsetType | None = UNSET
    tags: list[str] | UnsetType | None = UNSET
    allowed_tags: list[str] | UnsetType | None = UNSET  # null: any tag
    metadata: dict[str, Any] | UnsetType | None = UNSET
    user_id: str | UnsetType | None = UNSET
    team_id: str | UnsetType | None = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    tpm_limit: int | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    model_max_budget: ModelBudgets | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET
    blocked: bool | UnsetType | None = UNSET
    spend: Decimal | None = None  # LiteLLM: set the key's spend (0 clears it); null leaves it
    temp_budget_increase: Any = None
    temp_budget_expiry: Any = None
    aliases: Any = None
    config: Any = None
    permissions: Any = None
    allowed_cache_controls: Any = None
    guardrails: Any = None
    policies: Any = None
    prompts: Any = None
    enforced_params: Any = None
    allowed_routes: Any = None
    allowed_passthrough_routes: Any = None
    allowed_vector_store_indexes: Any = None
    access_group_ids: Any = None
    model_rpm_limit: Any = None
    model_tpm_limit: Any = None
    router_settings: Any = None
    object_permission: Any = None
    organization_id: Any = None
    project_id: Any = None
    auto_rotate: Any = None
    rotation_interval: Any = None
    tpm_limit_type: Any = None
    rpm_limit_type: Any = None


class KeyRef(msgspec.Struct, forbid_unknown_fields=True):
    key: str  # the secret, or its key_hash as /key/list shows it


class KeyDelete(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[str] | None = None  # LiteLLM: keys or their hashes
    key_aliases: list[str] | None = None  # LiteLLM: or their aliases
    key: str | None = None  # budget-ledger's single key


class KeyInfo(msgspec.Struct):
    """LiteLLM's key record (its ``info``), with budget-ledger's fields alongside."""

    key_name: str | None
    key_alias: str | None
    spend: Decimal  # in the current budget window (all time without a budget_duration)
    expires: datetime | None
    models: list[str]  # [] = every model
    user_id: str | None
    team_id: str | None
    max_parallel_requests: int | None
    metadata: dict[str, Any]
    tpm_limit: int | None
    rpm_limit: int | None
    max_budget: Decimal | None
    soft_budget: Decimal | None
    budget_duration: str | None
    budget_reset_at: datetime | None
    model_spend: dict[str, Decimal]
    model_max_budget: dict[str, ev.ModelBudget]
    budget_id: str | None
    blocked: bool
    tags: list[str]
    created_at: datetime
    updated_at: datetime | None
    created_by: str
    token: str  # the key's hash
    key_hash: str
    key_prefix: str
    allowed_models: list[str] | None  # None: every model; [] none
    allowed_tags: list[str] | None  # None: any tag
    total_spend: Decimal
    request_count: int
    remaining: Decimal | None
    window_start: datetime | None
    aliases: dict[str, Any] = {}
    config: dict[str, Any] = {}
    permissions: dict[str, Any] = {}
    allowed_cache_controls: list[str] = []
    litellm_budget_table: BudgetTable | UnsetType = UNSET


class KeyInfoView(msgspec.Struct):
    key: str
    info: KeyInfo


class KeyCreated(KeyInfo):
    key: str = ""  # shown once, never again
    token_id: str = ""  # LiteLLM's name for the key's hash
    duration: str | None = None


class KeyUpdated(KeyInfo):
    key: str = ""  # as the request named it


class KeysDeleted(msgspec.Struct):
    deleted_keys: list[str]
    key_hashes: list[str]
    message: str


class KeyList(msgspec.Struct):
    keys: list[str | KeyInfo]  # key hashes, or whole records with return_full_object=true
    total_count: int
    current_page: int
    total_pages: int


def _bad_key(e: ApiKeyError) -> ApiError:
    type_ = {404: "not_found_error", 409: "conflict_error"}.get(e.status, "invalid_request_error")
    return ApiError(e.status, str(e), type=type_, param=e.field)


def _models(models: list[str] | None, allowed_models: list[str] | None) -> list[str] | UnsetType | None:
    """LiteLLM's ``models`` ([] or null: every model) and ours (null: every model; [] none)."""
    if (
        models is not None
        and allowed_models is not None
        and sorted(set(models)) != sorted(set(allowed_models))
    ):
        raise ApiError(422, "models and allowed_models disagree; send one of them", param="models")
    if allowed_models is not None:
        return allowed_models
    if models is not None:
        return models or None
    return UNSET


async def key_info(request: web.Request, key: ApiKey) -> KeyInfo:
    now = request.app[KEY_BOOK].now()
    window = key.window(now)
    spent = await spend_of(
        request.app[STORE].pool,
        column="key_hash",
        value=key.key_hash,
        window_start=window.start,
        window_end=window.end,
        reset_at=key.spend_reset_at,
        reset_to=key.spend_reset_to,
    )
    reset_at = window.end if window != LIFETIME else None
    remaining = max(Decimal(0), key.max_budget - spent.spend) if key.max_budget is not None else None
    return KeyInfo(
        key_name=key.key_name,
        key_alias=key.key_alias,
        spend=spent.spend,
        expires=key.expires,
        models=list(key.allowed_models or ()),
        user_id=key.user_id,
        team_id=key.team_id,
        max_parallel_requests=key.max_parallel_requests,
        metadata=key.metadata,
        tpm_limit=key.tpm_limit,
        rpm_limit=key.rpm_limit,
        max_budget=key.max_budget,
        soft_budget=key.soft_budget,
        budget_duration=key.budget_duration,
        budget_reset_at=reset_at,
        model_spend=spent.model_spend,
        model_max_budget=key.model_max_budget or {},
        budget_id=key.budget_id,
        blocked=key.blocked,
        tags=list(key.tags),
        created_at=key.created_at,
        updated_at=key.updated_at,
        created_by="admin",
        token=key.key_hash,
        key_hash=key.key_hash,
        key_prefix=key.key_prefix,
        allowed_models=list(key.allowed_models) if key.allowed_models is not None else None,
        allowed_tags=list(key.allowed_tags) if key.allowed_tags is not None else None,
        total_spend=spent.total_spend,
        request_count=spent.request_count,
        remaining=remaining,
        window_start=window.start if window != LIFETIME else None,
        litellm_budget_table=budget_table(key, reset_at),
    )


# ------------------------------------------------------------------ routes


@routes.post("/key/generate")
async def key_generate(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyGenerate)
    refuse_unsupported(body, _UNSUPPORTED)
    refuse_unsupported(body, ("key_type",), neutral=("default", "llm_api"))
    if body.spend:
        raise ApiError(422, "spend is counted from the log; a new key starts at 0", param="spend")
    models = _models(body.models, body.allowed_models)
    settings = KeyFields(
        user_id=body.user_id,
        team_id=body.team_id,
        max_budget=body.max_budget,
        soft_budget=body.soft_budget,
        budget_duration=body.budget_duration,
        tpm_limit=body.tpm_limit,
        rpm_limit=body.rpm_limit,
        max_parallel_requests=body.max_parallel_requests,
        model_max_budget=model_budgets(body.model_max_budget),
        budget_id=body.budget_id,
        blocked=bool(body.blocked),
        allowed_models=None if models is UNSET else models,
        allowed_tags=UNSET if body.allowed_tags is None else body.allowed_tags,
    )
    try:
        secret, key = await request.app[KEY_BOOK].generate(
            key_alias=body.key_alias,
            tags=body.tags or [],
            metadata=body.metadata or {},
            request_id=request[REQUEST_ID],
            secret=body.key,
            duration=body.duration,
            settings=settings,
        )
    except ApiKeyError as e:
        raise _bad_key(e) from None
    info = await key_info(request, key)
    created = KeyCreated(
        **msgspec.structs.asdict(info), key=secret, token_id=key.key_hash, duration=body.duration
    )
    return json_response(created)


@routes.get("/key/info")
async def key_info_get(request: web.Request) -> web.Response:
    """LiteLLM's GET /key/info?key=: here ``key`` is the key's hash (a secret in a
    URL is refused before this handler runs: URLs end up in logs)."""
    for name in request.query:
        if name != "key":
            raise ApiError(400, f"unknown query parameter {name!r}; known: key", param=name)
    given = request.query.get("key", "")
    if not given:
        raise ApiError(400, "key (the key's key_hash) is required", param="key")
    return await _info(request, given)


@routes.post("/key/info")
async def key_info_post(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyRef)
    return await _info(request, body.key)


async def _info(request: web.Request, given: str) -> web.Response:
    try:
        key = await request.app[KEY_BOOK].lookup(given)
    except ApiKeyError as e:
        raise _bad_key(e) from None
    return json_response(KeyInfoView(key=given, info=await key_info(request, key)))


async def _by_alias(book: KeyBook, alias: str) -> ApiKey:
    await book.refresh()
    found = [k for k in book.keys.values() if k.key_alias == alias]
    if not found:
        raise ApiError(404, "no key has this key_alias", type="not_found_error", param="key_alias")
    if len(found) > 1:
        raise ApiError(
            409, "several keys have this key_alias; name the key", type="conflict_error", param="key_alias"
        )
    return found[0]


@routes.post("/key/update")
async def key_update(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyUpdate)
    refuse_unsupported(body, (*_UNSUPPORTED, "temp_budget_increase", "temp_budget_expiry"))
    book = request.app[KEY_BOOK]
    new_alias = body.key_alias
    if body.key is not None:
        name = body.key
    elif isinstance(body.key_alias, str):
        name, new_alias = (await _by_alias(book, body.key_alias)).key_hash, UNSET
    else:
        raise ApiError(400, "key (or key_alias) is required to name the key", param="key")
    models: Any = UNSET
    if body.models is not UNSET or body.allowed_models is not UNSET:
        models = _models(
            None if body.models is UNSET else body.models,
            None if body.allowed_models is UNSET else body.allowed_models,
        )
        if models is UNSET:  # both sent as null: every model
            models = None
    fields = KeyFields(
        key_alias=new_alias,
        tags=[] if body.tags is None else body.tags,
        allowed_models=models,
        metadata={} if body.metadata is None else body.metadata,
        user_id=body.user_id,
        team_id=body.team_id,
        max_budget=body.max_budget,
        soft_budget=body.soft_budget,
        budget_duration=body.budget_duration,
        tpm_limit=body.tpm_limit,
        rpm_limit=body.rpm_limit,
        max_parallel_requests=body.max_parallel_requests,
        model_max_budget=body.model_max_budget
        if body.model_max_budget is UNSET
        else model_budgets(body.model_max_budget),
        budget_id=body.budget_id,
        blocked=False if body.blocked is None else body.blocked,
        allowed_tags=body.allowed_tags,
    )
    try:
        key = await book.update(
            name, fields, duration=body.duration, spend=body.spend, request_id=request[REQUEST_ID]
        )
    except ApiKeyError as e:
        raise _bad_key(e) from None
    info = await key_info(request, key)
    return json_response(KeyUpdated(**msgspec.structs.asdict(info), key=name))


@routes.post("/key/delete")
async def key_delete(request: web.Request) -> web.Response:
    body = await decode_body(request, KeyDelete)
    book = request.app[KEY_BOOK]
    given = [*(body.keys or []), *([body.key] if body.key is not None else [])]
    if not given and not body.key_aliases:
        raise ApiError(400, "keys (or key_aliases) must name at least one key", param="keys")
    if len(given) + len(body.key_aliases or []) > 1000:
        raise ApiError(400, "at most 1000 keys per request", param="keys")
    await book.refresh()
    hashes: list[str] = []
    for i, k in enumerate(given):
        found = book.find(k)
        if found is None:  # never echo the value: it may be a secret
            raise ApiError(404, f"keys[{i}]: no such key", type="not_found_error", param="keys")
        hashes.append(found.key_hash)
    for i, alias in enumerate(body.key_aliases or []):
        matches = [k.key_hash for k in book.keys.values() if k.key_alias == alias]
        if not matches:
            raise ApiError(
                404, f"key_aliases[{i}]: no key has this alias", type="not_found_error", param="key_aliases"
            )
        hashes += matches
    hashes = list(dict.fromkeys(hashes))
    for key_hash in hashes:
        try:
            await book.delete(key_hash, request_id=request[REQUEST_ID])
        except ApiKeyError as e:
            raise _bad_key(e) from None
    return json_response(
        KeysDeleted(
            deleted_keys=[*given, *(body.key_aliases or [])],
            key_hashes=hashes,
            message=f"{len(hashes)} key{'s' if len(hashes) != 1 else ''} deleted",
        )
    )


_LIST_PARAMS = {
    "page",
    "size",
    "user_id",
    "team_id",
    "key_alias",
    "key_hash",
    "return_full_object",
    "include_team_keys",
    "sort_by",
    "sort_order",
    "organization_id",
}
_SORTS = ("created_at", "updated_at", "key_alias", "user_id", "team_id", "expires")


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return raw in ("true", "1")


@routes.get("/key/list")
async def key_list(request: web.Request) -> web.Response:
    for name, value in request.query.items():
        if name not in _LIST_PARAMS:
            raise ApiError(
                400, f"unknown query parameter {name!r}; known: {', '.join(sorted(_LIST_PARAMS))}", param=name
            )
        if "\x00" in value:
            raise ApiError(400, f"{name} contains a NUL character", param=name)
    page = int_param(request, "page", 1, 1, 1_000_000)
    size = int_param(request, "size", 10, 1, 100)
    full = _flag(request, "return_full_object")
    _flag(request, "include_team_keys")  # the admin sees every key anyway
    if request.query.get("organization_id"):
        raise ApiError(400, "budget-ledger has no organizations", param="organization_id")
    sort_by = request.query.get("sort_by", "created_at")
    if sort_by not in _SORTS:
        raise ApiError(400, f"sort_by must be one of {', '.join(_SORTS)}", param="sort_by")
    order = request.query.get("sort_order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "sort_order must be asc or desc", param="sort_order")
    book = request.app[KEY_BOOK]
    await book.refresh()
    keys = list(book.keys.values())
    for name in ("user_id", "team_id", "key_alias", "key_hash"):
        if name in request.query:
            keys = [k for k in keys if getattr(k, name) == request.query[name]]
    # None sorts first ascending; the hash breaks ties so pages are stable.
    keys.sort(key=lambda k: (getattr(k, sort_by) is not None, getattr(k, sort_by) or "", k.key_hash))
    if order == "desc":
        keys.reverse()
    chosen = keys[(page - 1) * size : page * size]
    listed: list[str | KeyInfo] = [await key_info(request, k) if full else k.key_hash for k in chosen]
    return json_response(
        KeyList(
            keys=listed,
            total_count=len(keys),
            current_page=page,
            total_pages=max(1, math.ceil(len(keys) / size)),
        )
    )
