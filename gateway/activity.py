"""Daily activity and the global spend report, in LiteLLM's shapes.

GET /tag/daily/activity, /user/daily/activity, /customer/daily/activity (and
/end_user/daily/activity): LiteLLM's paginated {results: [{date, metrics,
breakdown}], metadata}, one result per UTC day, newest first. A page holds
``page_size`` whole days (LiteLLM pages its table rows, which can cut a day in
two); ``metadata`` totals the whole range, not just the page.

GET /global/spend/report: LiteLLM's report per day and team, customer (end
user) or API key; budget-ledger adds ``group_by=tag``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from gateway.appkeys import KEY_BOOK, READ_POOL, USER_SECRET
from gateway.errors import ApiError
from gateway.spend_api import check_params, date_range, int_param, json_response, key_filter
from ledger.apikeys import KeyBook
from ledger.domain.privacy import hash_user
from ledger.postgres import queries

routes = web.RouteTableDef()

_ACTIVITY = {"start_date", "end_date", "model", "api_key", "page", "page_size"}


class SpendMetrics(msgspec.Struct):
    spend: Decimal = Decimal(0)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    total_tokens: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    api_requests: int = 0

    def add(self, r: Any) -> None:
        self.spend += r["spend"]
        self.prompt_tokens += int(r["prompt_tokens"])
        self.completion_tokens += int(r["completion_tokens"])
        self.total_tokens += int(r["prompt_tokens"]) + int(r["completion_tokens"])
        self.successful_requests += int(r["successful_requests"])
        self.failed_requests += int(r["failed_requests"])
        self.api_requests += int(r["api_requests"])


class KeyMetadata(msgspec.Struct):
    key_alias: str | None = None
    team_id: str | None = None


class KeyMetric(msgspec.Struct):
    metrics: SpendMetrics
    metadata: KeyMetadata


class Metric(msgspec.Struct):
    metrics: SpendMetrics
    metadata: dict[str, Any] = {}
    api_key_breakdown: dict[str, KeyMetric] = {}


class Breakdown(msgspec.Struct):
    models: dict[str, Metric] = {}
    model_groups: dict[str, Metric] = {}
    providers: dict[str, Metric] = {}
    api_keys: dict[str, KeyMetric] = {}
    entities: dict[str, Metric] = {}  # tags, or end users' hashes
    mcp_servers: dict[str, Metric] = {}
    endpoints: dict[str, Metric] = {}


class DailySpend(msgspec.Struct):
    date: date
    metrics: SpendMetrics
    breakdown: Breakdown


class ActivityMetadata(msgspec.Struct):
    total_spend: Decimal
    total_prompt_tokens: int
    total_completion_tokens: int
    total_tokens: int
    total_api_requests: int
    total_successful_requests: int
    total_failed_requests: int
    total_cache_read_input_tokens: int
    total_cache_creation_input_tokens: int
    page: int
    total_pages: int
    has_more: bool


class DailyActivity(msgspec.Struct):
    results: list[DailySpend]
    metadata: ActivityMetadata


def _key_meta(book: KeyBook, key_hash: str) -> KeyMetadata:
    key = book.known(key_hash)
    return KeyMetadata(key.key_alias, key.team_id) if key else KeyMetadata()


def _add(target: dict[str, Metric], name: str, r: Any, book: KeyBook) -> None:
    metric = target.get(name)
    if metric is None:
        metric = target[name] = Metric(SpendMetrics(), {}, {})
    metric.metrics.add(r)
    if r["key_hash"]:
        per_key = metric.api_key_breakdown.get(r["key_hash"])
        if per_key is None:
            per_key = metric.api_key_breakdown[r["key_hash"]] = KeyMetric(
                SpendMetrics(), _key_meta(book, r["key_hash"])
            )
        per_key.metrics.add(r)


def _list(request: web.Request, name: str) -> list[str] | None:
    raw = request.query.get(name)
    if not raw:
        return None
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if len(values) > 1000:
        raise ApiError(400, f"{name} may list at most 1000 values", param=name)
    return values or None


async def _activity(request: web.Request, entity: str, ids: list[str] | None) -> web.Response:
    start, end = date_range(request)
    page = int_param(request, "page", 1, 1, 1_000_000)
    size = int_param(request, "page_size", 10, 1, 1000)
    assert page is not None
    assert size is not None
    rows = await queries.daily_activity(
        request.app[READ_POOL],
        entity=entity,
        ids=ids,
        start=start,
        end=end,
        model=request.query.get("model") or None,
        key_hashes=key_filter(request),
    )
    book = request.app[KEY_BOOK]
    by_day: dict[date, list[Any]] = defaultdict(list)
    totals = SpendMetrics()
    for r in rows:
        by_day[r["day"]].append(r)
        totals.add(r)
    ordered = sorted(by_day, reverse=True)
    results = []
    for day in ordered[(page - 1) * size : page * size]:
        metrics, breakdown = SpendMetrics(), Breakdown({}, {}, {}, {}, {}, {}, {})
        for r in by_day[day]:
            metrics.add(r)
            _add(breakdown.models, r["model"] or "unknown", r, book)
            _add(breakdown.model_groups, r["model"] or "unknown", r, book)
            _add(breakdown.providers, r["provider"] or "unknown", r, book)
            _add(breakdown.entities, r["entity"], r, book)
            if r["key_hash"]:
                per_key = breakdown.api_keys.get(r["key_hash"])
                if per_key is None:
                    per_key = breakdown.api_keys[r["key_hash"]] = KeyMetric(
                        SpendMetrics(), _key_meta(book, r["key_hash"])
                    )
                per_key.metrics.add(r)
        results.append(DailySpend(day, metrics, breakdown))
    total_pages = max(1, math.ceil(len(ordered) / size))
    return json_response(
        DailyActivity(
            results=results,
            metadata=ActivityMetadata(
                total_spend=totals.spend,
                total_prompt_tokens=totals.prompt_tokens,
                total_completion_tokens=totals.completion_tokens,
                total_tokens=totals.total_tokens,
                total_api_requests=totals.api_requests,
                total_successful_requests=totals.successful_requests,
                total_failed_requests=totals.failed_requests,
                total_cache_read_input_tokens=0,
                total_cache_creation_input_tokens=0,
                page=page,
                total_pages=total_pages,
                has_more=page < total_pages,
            ),
        )
    )


@routes.get("/tag/daily/activity")
async def tag_daily_activity(request: web.Request) -> web.Response:
    """Per day and tag (a request with two tags counts under both, as in LiteLLM)."""
    check_params(request, {*_ACTIVITY, "tags"})
    return await _activity(request, "tag", _list(request, "tags"))


@routes.get("/user/daily/activity")
async def user_daily_activity(request: web.Request) -> web.Response:
    """Per day and end user: ``user_id`` is the raw ``user`` value (hashed for the
    lookup) or ``user_hash`` its hash. budget-ledger has no internal users."""
    check_params(request, {*_ACTIVITY, "user_id", "user_hash"})
    ids = None
    if request.query.get("user_id"):
        ids = [hash_user(request.query["user_id"], request.app[USER_SECRET])]
    elif request.query.get("user_hash"):
        ids = [request.query["user_hash"]]
    return await _activity(request, "user", ids)


async def customer_daily_activity(request: web.Request) -> web.Response:
    """LiteLLM's per end user (customer) activity: ``end_user_ids`` are raw ids, comma-separated."""
    check_params(request, {*_ACTIVITY, "end_user_ids"})
    raw = _list(request, "end_user_ids")
    secret = request.app[USER_SECRET]
    ids = [hash_user(u, secret) for u in raw] if raw else None
    return await _activity(request, "user", ids)


for _path in ("/customer/daily/activity", "/end_user/daily/activity"):
    routes.get(_path)(customer_daily_activity)


# ------------------------------------------------------------------ global spend report


class ModelDetail(msgspec.Struct):
    model: str
    total_cost: Decimal
    total_input_tokens: int
    total_output_tokens: int


class KeyReport(msgspec.Struct):
    api_key: str
    total_cost: Decimal
    total_input_tokens: int
    total_output_tokens: int
    model_details: list[ModelDetail]
    key_alias: str | None = None
    team_id: str | None = None


class SpendItem(msgspec.Struct):
    model: str
    api_key: str
    spend: Decimal
    total_tokens: int


_GROUPS = {"team": "teams", "customer": "customers", "tag": "tags", "api_key": ""}


@routes.get("/global/spend/report")
async def global_spend_report(request: web.Request) -> web.Response:
    """Per day, per team (the keys' ``team_id``), customer (end-user hash) or tag:
    spend and its split by model and key; or, with group_by=api_key, ``api_key``
    or ``internal_user_id`` (keys' owner), totals per key and model. Both dates
    are inclusive (LiteLLM's ends before its end date)."""
    check_params(
        request,
        {"start_date", "end_date", "group_by", "api_key", "internal_user_id", "team_id", "customer_id"},
    )
    start, end = date_range(request)
    group_by = request.query.get("group_by", "team")
    if group_by not in _GROUPS:
        raise ApiError(400, "group_by must be team, customer, api_key or tag", param="group_by")
    book = request.app[KEY_BOOK]
    keys = key_filter(request, owner="internal_user_id")
    if request.query.get("team_id"):
        team = request.query["team_id"]
        in_team = {h for h, k in (*book.keys.items(), *book.retired.items()) if k.team_id == team}
        keys = sorted(in_team if keys is None else set(keys) & in_team)
    customer = request.query.get("customer_id")
    user_hash = hash_user(customer, request.app[USER_SECRET]) if customer else None
    pool = request.app[READ_POOL]
    if group_by == "api_key" or request.query.get("api_key") or request.query.get("internal_user_id"):
        rows = await queries.report_rows(
            pool, by="key", start=start, end=end, key_hashes=keys, user_hash=user_hash
        )
        return json_response(_per_key(rows, book))
    by = "tag" if group_by == "tag" else "customer" if group_by == "customer" else "key"
    rows = await queries.report_rows(pool, by=by, start=start, end=end, key_hashes=keys, user_hash=user_hash)
    return json_response(_per_day(rows, book, group_by))


def _per_key(rows: list[Any], book: KeyBook) -> list[KeyReport]:
    reports: dict[str, KeyReport] = {}
    for r in rows:
        report = reports.get(r["key_hash"])
        if report is None:
            key = book.known(r["key_hash"]) if r["key_hash"] else None
            report = reports[r["key_hash"]] = KeyReport(
                r["key_hash"],
                Decimal(0),
                0,
                0,
                [],
                key.key_alias if key else None,
                key.team_id if key else None,
            )
        report.total_cost += r["spend"]
        report.total_input_tokens += int(r["prompt_tokens"])
        report.total_output_tokens += int(r["completion_tokens"])
        for detail in report.model_details:
            if detail.model == r["model"]:
                detail.total_cost += r["spend"]
                detail.total_input_tokens += int(r["prompt_tokens"])
                detail.total_output_tokens += int(r["completion_tokens"])
                break
        else:
            report.model_details.append(
                ModelDetail(r["model"], r["spend"], int(r["prompt_tokens"]), int(r["completion_tokens"]))
            )
    return sorted(reports.values(), key=lambda k: k.total_cost, reverse=True)


def _per_day(rows: list[Any], book: KeyBook, group_by: str) -> list[dict[str, Any]]:
    days: dict[date, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if group_by == "team":
            key = book.known(r["key_hash"]) if r["key_hash"] else None
            team_id = key.team_id if key else None
            name, extra = team_id or "Unassigned Team", {"team_id": team_id}
            label = "team_name"
        elif group_by == "customer":
            name, extra, label = r["grp"], {}, "customer"
        else:
            name, extra, label = r["grp"], {}, "tag"
        groups = days.setdefault(r["day"], {})
        group = groups.get(name)
        if group is None:
            group = groups[name] = {label: name, "total_spend": Decimal(0), "metadata": [], **extra}
        group["total_spend"] += r["spend"]
        group["metadata"].append(
            SpendItem(
                r["model"], r["key_hash"], r["spend"], int(r["prompt_tokens"]) + int(r["completion_tokens"])
            )
        )
    field = _GROUPS[group_by]
    return [
        {
            "group_by_day": datetime.combine(day, time(), tzinfo=UTC),
            field: sorted(groups.values(), key=lambda g: g["total_spend"], reverse=True),
        }
        for day, groups in sorted(days.items())
    ]
