"""Admin API for end users ("customers"), on LiteLLM's paths and shapes.

POST /customer/new, GET /customer/info, POST /customer/update,
POST /customer/delete, GET /customer/list, POST /customer/block,
POST /customer/unblock, and the same under /end_user/ (LiteLLM's old name).

An end user is the ``user`` value of a request. The API takes the raw id and
hashes it at once with the gateway's secret; only the hash is stored, so
/customer/list, which has no raw ids to show, names end users by their hash.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
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
from gateway.appkeys import CUSTOMER_BOOK, READ_POOL, REQUEST_ID, SETTINGS, STORE, USER_SECRET
from gateway.errors import ApiError
from ledger import events as ev
from ledger.customers import (
    CustomerBook,
    CustomerError,
    CustomerService,
    CustomerState,
    validate_user_id,
)
from ledger.domain.privacy import hash_user
from ledger.domain.windows import LIFETIME
from ledger.postgres.queries import spend_of

routes = web.RouteTableDef()

_HASH = re.compile(r"[0-9a-f]{64}")
_UNSUPPORTED = ("allowed_model_region", "default_model", "object_permission", "budget_reset_at")


class CustomerNew(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str  # the raw end-user id, as requests send it in `user`; hashed at once
    alias: str | None = None  # stored as given: not the place for personal data
    blocked: bool = False
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: ModelBudgets | None = None
    budget_id: str | None = None
    spend: Decimal | None = None  # LiteLLM's starting spend: only 0 here
    allowed_model_region: Any = None
    default_model: Any = None
    object_permission: Any = None
    budget_reset_at: Any = None


class CustomerUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Partial: a field that is absent stays as it is; null clears it."""

    user_id: str
    alias: str | UnsetType | None = UNSET
    blocked: bool | None = None
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    tpm_limit: int | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    model_max_budget: ModelBudgets | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET
    allowed_model_region: Any = None
    default_model: Any = None
    object_permission: Any = None
    budget_reset_at: Any = None


class UserIds(msgspec.Struct, forbid_unknown_fields=True):
    user_ids: list[str]


class CustomerView(msgspec.Struct):
    """LiteLLM's end-user record, with budget-ledger's fields alongside."""

    user_id: str  # as the request named it; /customer/list shows the hash (no raw id is kept)
    user_hash: str
    blocked: bool
    alias: str | None
    spend: Decimal  # in the current budget window (all time without a budget_duration)
    budget_id: str | None
    max_budget: Decimal | None
    soft_budget: Decimal | None
    budget_duration: str | None
    tpm_limit: int | None
    rpm_limit: int | None
    max_parallel_requests: int | None
    model_max_budget: dict[str, ev.ModelBudget] | None
    remaining: Decimal | None
    window_start: datetime | None
    reset_at: datetime | None
    total_spend: Decimal
    request_count: int
    created_at: datetime | None
    updated_at: datetime | None
    allowed_model_region: str | None = None
    default_model: str | None = None
    object_permission: dict[str, Any] | None = None
    litellm_budget_table: BudgetTable | UnsetType = UNSET


class CustomersDeleted(msgspec.Struct):
    deleted_customers: int
    message: str


class BlockedUsers(msgspec.Struct):
    blocked_users: list[CustomerView]  # block: the end users named; unblock: those still blocked
    unblocked_users: list[CustomerView] = []


async def customers_ctx(app: web.Application) -> AsyncIterator[None]:
    """The in-memory end-user definitions (the request path reads them too)."""
    book = CustomerBook(app[STORE], poll_interval_s=app[SETTINGS].poll_interval_s)
    await book.start()
    app[CUSTOMER_BOOK] = book
    yield
    await book.close()


def _hash(request: web.Request, user_id: str, field: str = "user_id") -> str:
    try:
        validate_user_id(user_id, field)
    except CustomerError as e:
        raise _bad(e) from None
    return hash_user(user_id, request.app[USER_SECRET])


def _bad(e: CustomerError) -> ApiError:
    type_ = {404: "not_found_error", 409: "conflict_error"}.get(e.status, "invalid_request_error")
    return ApiError(e.status, str(e), type=type_, param=e.field)


async def view(request: web.Request, state: CustomerState, user_id: str | None = None) -> CustomerView:
    now = datetime.now(UTC)
    window = state.window(now)
    spent = await spend_of(
        request.app[READ_POOL],
        column="user_hash",
        value=state.user_hash,
        window_start=window.start,
        window_end=window.end,
    )
    reset_at = window.end if window != LIFETIME else None
    remaining = max(Decimal(0), state.max_budget - spent.spend) if state.max_budget is not None else None
    return CustomerView(
        user_id=user_id if user_id is not None else state.user_hash,
        user_hash=state.user_hash,
        blocked=state.blocked,
        alias=state.alias,
        spend=spent.spend,
        budget_id=state.budget_id,
        max_budget=state.max_budget,
        soft_budget=state.soft_budget,
        budget_duration=state.budget_duration,
        tpm_limit=state.tpm_limit,
        rpm_limit=state.rpm_limit,
        max_parallel_requests=state.max_parallel_requests,
        model_max_budget=state.model_max_budget,
        remaining=remaining,
        window_start=window.start if window != LIFETIME else None,
        reset_at=reset_at,
        total_spend=spent.total_spend,
        request_count=spent.request_count,
        created_at=state.created_at,
        updated_at=state.updated_at,
        litellm_budget_table=budget_table(state, reset_at),
    )


def _service(request: web.Request) -> CustomerService:
    return CustomerService(request.app[STORE])


async def _fresh(request: web.Request) -> None:
    await request.app[CUSTOMER_BOOK].refresh()


def _fields(body: CustomerNew | CustomerUpdate) -> ev.CustomerFields:
    return ev.CustomerFields(
        alias=body.alias,
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
    )


def _both(path: str) -> list[str]:
    """LiteLLM serves these under /customer/ and, by their old name, /end_user/."""
    return [f"/customer/{path}", f"/end_user/{path}"]


# ------------------------------------------------------------------ routes


async def customer_new(request: web.Request) -> web.Response:
    body = await decode_body(request, CustomerNew)
    refuse_unsupported(body, _UNSUPPORTED)
    if body.spend:
        raise ApiError(422, "spend is counted from the log; a new end user starts at 0", param="spend")
    user_hash = _hash(request, body.user_id)
    try:
        state = await _service(request).create(
            user_hash, _fields(body), blocked=body.blocked, request_id=request[REQUEST_ID]
        )
    except CustomerError as e:
        raise _bad(e) from None
    await _fresh(request)
    return json_response(await view(request, state, body.user_id))


async def customer_info(request: web.Request) -> web.Response:
    """?end_user_id=<raw id> (hashed for the lookup), or ?user_hash=<hash>."""
    for name in request.query:
        if name not in ("end_user_id", "user_hash"):
            raise ApiError(
                400, f"unknown query parameter {name!r}; known: end_user_id, user_hash", param=name
            )
    raw = request.query.get("end_user_id")
    if raw:
        user_hash, shown = _hash(request, raw, "end_user_id"), raw
    elif request.query.get("user_hash"):
        user_hash = shown = request.query["user_hash"]
        if not _HASH.fullmatch(user_hash):
            raise ApiError(400, "user_hash must be 64 hexadecimal digits", param="user_hash")
    else:
        raise ApiError(
            400, "end_user_id (the raw id; it is hashed for the lookup) is required", param="end_user_id"
        )
    try:
        state = await _service(request).get(user_hash)
    except CustomerError as e:
        raise ApiError(404, "no such end user", type="not_found_error", param="end_user_id") from e
    return json_response(await view(request, state, shown))


async def customer_update(request: web.Request) -> web.Response:
    body = await decode_body(request, CustomerUpdate)
    refuse_unsupported(body, _UNSUPPORTED)
    user_hash = _hash(request, body.user_id)
    try:
        state = await _service(request).update(
            user_hash, _fields(body), blocked=body.blocked, request_id=request[REQUEST_ID]
        )
    except CustomerError as e:
        raise _bad(e) from None
    await _fresh(request)
    return json_response(await view(request, state, body.user_id))


def _ids(request: web.Request, body: UserIds) -> list[tuple[str, str]]:
    if not body.user_ids:
        raise ApiError(400, "user_ids must list at least one end user", param="user_ids")
    if len(body.user_ids) > 1000:
        raise ApiError(400, "user_ids may list at most 1000 end users", param="user_ids")
    return [(u, _hash(request, u, "user_ids")) for u in dict.fromkeys(body.user_ids)]


async def customer_delete(request: web.Request) -> web.Response:
    body = await decode_body(request, UserIds)
    ids = _ids(request, body)
    service = _service(request)
    missing = [i for i, (_, h) in enumerate(ids) if not (await service.load(h)).exists]
    if missing:
        where = ", ".join(f"user_ids[{i}]" for i in missing)
        raise ApiError(
            404, f"no such end user: {where}; nothing deleted", type="not_found_error", param="user_ids"
        )
    for _, user_hash in ids:
        try:
            await service.delete(user_hash, request_id=request[REQUEST_ID])
        except CustomerError as e:
            raise _bad(e) from None
    await _fresh(request)
    return json_response(
        CustomersDeleted(deleted_customers=len(ids), message=f"{len(ids)} end user(s) deleted")
    )


async def customer_list(request: web.Request) -> web.Response:
    if request.query:
        name = next(iter(request.query))
        raise ApiError(400, f"unknown query parameter {name!r}; /customer/list takes none", param=name)
    book = request.app[CUSTOMER_BOOK]
    await book.refresh()
    states = sorted(
        book.customers.values(), key=lambda s: (s.created_at or datetime.min.replace(tzinfo=UTC), s.user_hash)
    )
    return json_response([await view(request, s) for s in states])


async def customer_block(request: web.Request) -> web.Response:
    """LiteLLM's block also creates an end user it does not know, blocked."""
    body = await decode_body(request, UserIds)
    service = _service(request)
    views = []
    for user_id, user_hash in _ids(request, body):
        try:
            state = await service.set_blocked(user_hash, True, create=True, request_id=request[REQUEST_ID])
        except CustomerError as e:
            raise _bad(e) from None
        views.append(await view(request, state, user_id))
    await _fresh(request)
    return json_response(BlockedUsers(blocked_users=views))


async def customer_unblock(request: web.Request) -> web.Response:
    body = await decode_body(request, UserIds)
    service = _service(request)
    ids = _ids(request, body)
    missing = [i for i, (_, h) in enumerate(ids) if not (await service.load(h)).exists]
    if missing:
        where = ", ".join(f"user_ids[{i}]" for i in missing)
        raise ApiError(404, f"no such end user: {where}", type="not_found_error", param="user_ids")
    unblocked = []
    for user_id, user_hash in ids:
        try:
            state = await service.set_blocked(user_hash, False, request_id=request[REQUEST_ID])
        except CustomerError as e:
            raise _bad(e) from None
        unblocked.append(await view(request, state, user_id))
    book = request.app[CUSTOMER_BOOK]
    await book.refresh()
    still = [await view(request, s) for s in book.customers.values() if s.blocked]
    return json_response(BlockedUsers(blocked_users=still, unblocked_users=unblocked))


for _path, _method, _handler in (
    ("new", "POST", customer_new),
    ("info", "GET", customer_info),
    ("update", "POST", customer_update),
    ("delete", "POST", customer_delete),
    ("list", "GET", customer_list),
    ("block", "POST", customer_block),
    ("unblock", "POST", customer_unblock),
):
    for _route in _both(_path):
        routes.route(_method, _route)(_handler)
