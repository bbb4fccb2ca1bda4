"""Spend query API (admin key): views maintained by the projection workers.

GET /spend/tags, /spend/users, /spend/logs (filters, cursor pagination,
?format=csv), /spend/report, /user/info. /spend/tags and /spend/logs answer in
LiteLLM's shapes with budget-ledger's fields alongside. The parameter helpers
here serve gateway/activity.py too.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, overload
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from gateway.appkeys import KEY_BOOK, READ_POOL, USER_SECRET
from gateway.errors import ApiError
from ledger.apikeys import ApiKey, KeyBook, as_key_hash
from ledger.domain.privacy import hash_user
from ledger.postgres import focus, queries, reports

routes = web.RouteTableDef()
_encoder = msgspec.json.Encoder(decimal_format="number")
_FAR_PAST = datetime(1970, 1, 1, tzinfo=UTC)
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)  # the end of 9999-12-31: nothing can be later
_MAX_POSITION = 2**63 - 1  # positions are bigint
_KNOWN = {
    "/spend/tags": {"start_date", "end_date"},
    "/spend/users": {"start_date", "end_date", "limit"},
    "/spend/logs": {
        "start_date",
        "end_date",
        "tag",
        "user",
        "user_hash",
        "model",
        "status",
        "kind",
        "limit",
        "cursor",
        "format",
        "api_key",
        "user_id",
        "request_id",
        "summarize",
    },
    "/spend/report": {"start_date", "end_date", "group_by", "interval", "allocation", "format"},
    "/spend/export": {"start_date", "end_date", "format", "file"},
    "/user/info": {"user", "user_hash"},
}


def json_response(data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(data), content_type="application/json", headers=headers)


def check_params(request: web.Request, known: set[str] | None = None) -> None:
    known = known if known is not None else _KNOWN[request.path]
    for name, value in request.query.items():
        if name not in known:
            raise ApiError(
                400, f"unknown query parameter {name!r}; known: {', '.join(sorted(known))}", param=name
            )
        if "\x00" in value:
            raise ApiError(400, f"{name} contains a NUL character", param=name)


def instant(request: web.Request, name: str, default: datetime, *, end: bool = False) -> datetime:
    """A date (YYYY-MM-DD) or an ISO timestamp, in UTC; an end date includes its whole day.
    Anything outside what a timestamp can hold is a 400 naming the parameter."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            if end and day == date.max:
                return _LATEST
            moment = datetime.combine(day, time(), tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400,
            f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 timestamp, got {raw[:40]!r}",
            param=name,
        ) from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise ApiError(
            400, f"{name} is out of range: {raw[:40]!r} is not a time in years 1 to 9999 UTC", param=name
        ) from None


def date_range(request: web.Request) -> tuple[datetime, datetime]:
    start = instant(request, "start_date", _FAR_PAST)
    end = instant(request, "end_date", _FAR_FUTURE, end=True)
    if end <= start:
        raise ApiError(400, "end_date must be after start_date", param="end_date")
    return start, end


def days(start: datetime, end: datetime) -> tuple[date, date]:
    """Inclusive day bounds for the daily tables."""
    return start.date(), (end - timedelta(microseconds=1)).date()


@overload
def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int: ...
@overload
def int_param(request: web.Request, name: str, default: None, lo: int, hi: int) -> int | None: ...
def int_param(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """A whole-number query parameter within [lo, hi]; a 400 naming it otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw[:40]!r}", param=name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}", param=name)
    return value


def flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw.lower() not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return raw.lower() in ("true", "1")


def key_filter(request: web.Request, api_key: str = "api_key", owner: str | None = None) -> list[str] | None:
    """The API keys a request's ``api_key`` (a key hash) and LiteLLM's key-owner
    ``user_id`` name, as key hashes; None when neither is given."""
    book = request.app[KEY_BOOK]
    chosen: set[str] | None = None
    if request.query.get(api_key):
        chosen = {as_key_hash(request.query[api_key])}
    if owner is not None and request.query.get(owner):
        user_id = request.query[owner]
        owned = {h for h, k in (*book.keys.items(), *book.retired.items()) if k.user_id == user_id}
        chosen = owned if chosen is None else chosen & owned
    return sorted(chosen) if chosen is not None else None


def _user_hash(request: web.Request) -> str | None:
    if "user" in request.query:
        return hash_user(request.query["user"], request.app[USER_SECRET])
    return request.query.get("user_hash")


# ------------------------------------------------------------------ spend by tag and user


class TagSpend(msgspec.Struct):
    """LiteLLM's /spend/tags row, with budget-ledger's names and tokens alongside."""

    individual_request_tag: str
    log_count: int
    total_spend: Decimal
    tag: str
    spend: Decimal
    requests: int
    prompt_tokens: int
    completion_tokens: int


@routes.get("/spend/tags")
async def spend_tags(request: web.Request) -> web.Response:
    check_params(request)
    first, last = days(*date_range(request))
    rows = await queries.spend_by_tag(request.app[READ_POOL], first, last)
    return json_response(
        [
            TagSpend(
                individual_request_tag=r["tag"],
                log_count=int(r["requests"]),
                total_spend=r["spend"],
                tag=r["tag"],
                spend=r["spend"],
                requests=int(r["requests"]),
                prompt_tokens=int(r["prompt_tokens"]),
                completion_tokens=int(r["completion_tokens"]),
            )
            for r in rows
        ]
    )


@routes.get("/spend/users")
async def spend_users(request: web.Request) -> web.Response:
    check_params(request)
    first, last = days(*date_range(request))
    limit = int_param(request, "limit", 100, 1, 10_000)
    assert limit is not None
    rows = await queries.spend_by_user(request.app[READ_POOL], first, last, limit)
    return json_response([dict(r) for r in rows])


@routes.get("/user/info")
async def user_info(request: web.Request) -> web.Response:
    check_params(request)
    user_hash = _user_hash(request)
    if not user_hash:
        raise ApiError(400, "user (the raw id; it is hashed for the lookup) is required", param="user")
    total, daily = await queries.user_info(request.app[READ_POOL], user_hash)
    if total is None:
        raise ApiError(404, "no spend recorded for this user", type="not_found_error", param="user")
    return json_response({**dict(total), "daily": [dict(r) for r in daily]})


@routes.get("/spend/report")
async def spend_report(request: web.Request) -> web.Response:
    """Spend per group and period. ``group_by=tag:<dimension>`` groups by a tag
    dimension, split by default (its rows sum to ``total``); ``groups`` compares
    each group with the period of equal length just before."""
    check_params(request)
    start, end = date_range(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "format must be json or csv", param="format")
    try:
        q = reports.make_query(
            request.query.get("group_by", "tag"),
            request.query.get("allocation"),
            request.query.get("interval", "day"),
            start,
            end,
        )
    except reports.ReportError as e:
        raise ApiError(400, str(e), param=e.param) from None
    report = await reports.build(request.app[READ_POOL], q)
    if fmt == "csv":
        return _report_csv(report)
    return json_response(
        {
            "group_by": q.group_by,
            "interval": q.interval,
            "allocation": q.allocation,
            "total": report.total,
            "previous_start": report.previous_start,
            "previous_total": report.previous_total,
            "rows": report.rows,
            "groups": report.groups,
        }
    )


_REPORT_CSV = ("group", "period", "spend", "requests", "prompt_tokens", "completion_tokens")


def _report_csv(report: reports.Report) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_REPORT_CSV)
    for r in report.rows:
        writer.writerow([csv_cell(r[k]) for k in _REPORT_CSV])
    # the group_by may hold any metadata key: only safe characters reach the header
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", report.query.group_by)[:80]
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="spend-report-{name}.csv"'},
    )


@routes.get("/spend/export")
async def spend_export(request: web.Request) -> web.StreamResponse:
    """The period's charges as a FOCUS 1.2 dataset (ledger/postgres/focus.py): CSV, streamed,
    or Parquet (``file=parquet``, built in memory: pyarrow writes whole row groups)."""
    check_params(request)
    start, end = date_range(request)
    if request.query.get("format") != "focus":
        raise ApiError(400, "format must be focus (a FOCUS 1.2 dataset)", param="format")
    kind = request.query.get("file", "csv")
    if kind not in ("csv", "parquet"):
        raise ApiError(400, "file must be csv or parquet", param="file")
    pool = request.app[READ_POOL]
    if kind == "parquet":
        if not focus.parquet_available():
            raise ApiError(
                400, "Parquet needs pyarrow on the gateway; file=csv works without it", param="file"
            )
        body = io.BytesIO()
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            await focus.write_parquet(conn, start, end, body)
        return web.Response(
            body=body.getvalue(),
            content_type="application/vnd.apache.parquet",
            headers={"Content-Disposition": 'attachment; filename="focus.parquet"'},
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": 'attachment; filename="focus.csv"',
        }
    )
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        dims = await focus.dimensions(conn, start, end)
        await response.prepare(request)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(focus.header(dims))
        async for values in focus.rows(conn, start, end, dims):
            writer.writerow([focus.cell(v) for v in values])
            if buffer.tell() > 64 * 1024:
                await response.write(buffer.getvalue().encode())
                buffer.seek(0)
                buffer.truncate()
        await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


# ------------------------------------------------------------------ spend logs


class SpendLog(msgspec.Struct):
    """One request: LiteLLM's spend-log fields first, budget-ledger's alongside."""

    request_id: str
    api_key: str  # the key's hash; "" for the admin key or rows recorded without one
    model: str
    spend: Decimal
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    startTime: datetime
    endTime: datetime
    user: str  # the key's owner (user_id), as LiteLLM records it; "" without
    end_user: str  # the end user's hash (the raw `user` is never stored); "" without
    metadata: dict[str, Any]  # spend_logs_metadata and the key's alias, team and owner
    request_tags: list[str]
    team_id: str | None
    status: str  # "success" or "failure"
    custom_llm_provider: str
    model_group: str
    position: int
    recorded_at: datetime
    admitted_at: datetime | None
    kind: str  # spend | expired | released | denied
    tags: list[str]
    user_hash: str | None
    cost: Decimal
    http_status: int | None
    latency_ms: float | None
    streamed: bool
    provider: str | None
    key_hash: str | None
    spend_logs_metadata: dict[str, Any]
    call_type: str = ""
    api_base: str = ""
    cache_hit: str = ""


def _encode_cursor(recorded_at: datetime, position: int) -> str:
    return base64.urlsafe_b64encode(f"{recorded_at.isoformat()}|{position}".encode()).decode()


def _decode_cursor(raw: str) -> tuple[datetime, int]:
    bad = ApiError(400, "cursor is not one this API handed out", param="cursor")
    try:
        text = base64.urlsafe_b64decode(raw.encode()).decode()
        stamp, _, position = text.partition("|")
        moment, at = datetime.fromisoformat(stamp), int(position)
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if moment.tzinfo is None or not 0 <= at <= _MAX_POSITION:
        raise bad
    try:
        return moment.astimezone(UTC), at
    except OverflowError:
        raise bad from None


def _key_of(book: KeyBook, key_hash: str | None) -> ApiKey | None:
    return book.known(key_hash) if key_hash else None


def _row(r: Any, book: KeyBook) -> SpendLog:
    meta = msgspec.json.decode(r["metadata"]) if r["metadata"] else {}
    key = _key_of(book, r["key_hash"])
    ok = r["kind"] in ("spend", "expired") and (r["status"] is None or r["status"] < 400)
    litellm_meta: dict[str, Any] = {"spend_logs_metadata": meta}
    if key is not None:
        litellm_meta |= {
            "user_api_key": key.key_hash,
            "user_api_key_alias": key.key_alias,
            "user_api_key_team_id": key.team_id,
            "user_api_key_user_id": key.user_id,
        }
    return SpendLog(
        request_id=r["request_id"],
        api_key=r["key_hash"] or "",
        model=r["model"] or "",
        spend=r["cost"],
        total_tokens=r["prompt_tokens"] + r["completion_tokens"],
        prompt_tokens=r["prompt_tokens"],
        completion_tokens=r["completion_tokens"],
        startTime=r["admitted_at"] or r["recorded_at"],
        endTime=r["recorded_at"],
        user=(key.user_id or "") if key else "",
        end_user=r["user_hash"] or "",
        metadata=litellm_meta,
        request_tags=list(r["tags"]),
        team_id=key.team_id if key else None,
        status="success" if ok else "failure",
        custom_llm_provider=r["provider"] or "",
        model_group=r["model"] or "",
        position=r["position"],
        recorded_at=r["recorded_at"],
        admitted_at=r["admitted_at"],
        kind=r["kind"],
        tags=list(r["tags"]),
        user_hash=r["user_hash"],
        cost=r["cost"],
        http_status=r["status"],
        latency_ms=r["latency_ms"],
        streamed=r["streamed"],
        provider=r["provider"],
        key_hash=r["key_hash"],
        spend_logs_metadata=meta,
    )


_CSV_FIELDS = (
    "request_id",
    "recorded_at",
    "kind",
    "model",
    "provider",
    "tags",
    "user_hash",
    "metadata",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "status",
    "latency_ms",
    "streamed",
    "key_hash",
)
# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list):
        text = ",".join(value)
    elif isinstance(value, dict):
        text = msgspec.json.encode(value).decode()
    elif isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, Decimal):
        text = format(value, "f")
    else:
        text = str(value)
    # Neutralised with a leading quote, which spreadsheets show as text.
    return "'" + text if text.startswith(_FORMULA_START) else text


@routes.get("/spend/logs")
async def spend_logs(request: web.Request) -> web.StreamResponse:
    """LiteLLM's /spend/logs: a bare list, newest first. With ``limit`` (or a
    ``cursor``) one page, and the next page's cursor in ``x-ledger-next-cursor``
    and a ``Link: rel="next"`` header; without, every row, streamed. With both
    start_date and end_date and summarize not false, LiteLLM's daily summary."""
    check_params(request)
    start, end = date_range(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "format must be json or csv", param="format")
    kind = request.query.get("kind")
    if kind is not None and kind not in ("spend", "expired", "released", "denied"):
        raise ApiError(400, "kind must be spend, expired, released or denied", param="kind")
    status = int_param(request, "status", None, 100, 599)
    summarize = flag(request, "summarize", True)
    cursor = _decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
    paged = fmt == "json" and ("limit" in request.query or cursor is not None)
    limit = int_param(request, "limit", 100, 1, 1000) if paged else None
    sql, args = queries.spend_logs_query(
        tag=request.query.get("tag"),
        user_hash=_user_hash(request),
        model=request.query.get("model"),
        status=status,
        kind=kind,
        start=start,
        end=end,
        cursor=cursor,
        limit=limit,
        request_id=request.query.get("request_id"),
        key_hashes=key_filter(request, owner="user_id"),
    )
    pool, book = request.app[READ_POOL], request.app[KEY_BOOK]
    if fmt == "json" and summarize and "start_date" in request.query and "end_date" in request.query:
        return json_response(await _summary(request, sql, args, start, end))
    if paged:
        rows = await pool.fetch(sql, *args)
        headers = {}
        if limit is not None and len(rows) == limit:
            token = _encode_cursor(rows[-1]["recorded_at"], rows[-1]["position"])
            query = urlencode({**{k: v for k, v in request.query.items() if k != "cursor"}, "cursor": token})
            headers = {"x-ledger-next-cursor": token, "Link": f'<{request.path}?{query}>; rel="next"'}
        return json_response([_row(r, book) for r in rows], headers)
    # Every row: streamed from a server-side cursor, never held in memory whole.
    content_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    headers = {"Content-Type": content_type}
    if fmt == "csv":
        headers["Content-Disposition"] = 'attachment; filename="spend_logs.csv"'
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if fmt == "csv":
        writer.writerow(_CSV_FIELDS)
    else:
        buffer.write("[")
    first = True
    async with pool.acquire() as conn, conn.transaction():
        async for r in conn.cursor(sql, *args, prefetch=1000):
            if fmt == "csv":
                writer.writerow([csv_cell(v) for v in _csv_values(r)])
            else:
                buffer.write(("" if first else ",") + _encoder.encode(_row(r, book)).decode())
                first = False
            if buffer.tell() > 65536:
                await response.write(buffer.getvalue().encode())
                buffer.seek(0)
                buffer.truncate()
    if fmt == "json":
        buffer.write("]")
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


def _csv_values(r: Any) -> list[Any]:
    row = dict(r)
    row["metadata"] = msgspec.json.decode(row["metadata"]) if row["metadata"] else {}
    return [row[f] for f in _CSV_FIELDS]


async def _summary(
    request: web.Request, sql: str, args: list[Any], start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Per day: spend, per key owner (``users``), per model, per API key (a key of
    its own, as LiteLLM does) and, alongside, per end user (``end_users``). Days
    without spend are filled in from the first day with spend to the end date
    (or today, whichever is earlier)."""
    book = request.app[KEY_BOOK]
    rows = await queries.spend_summary(request.app[READ_POOL], sql, args)
    out: dict[date, dict[str, Any]] = {}
    for r in rows:
        day = out.setdefault(r["day"], _empty_day())
        key = _key_of(book, r["key_hash"] or None)
        amount = r["spend"]
        day["spend"] += amount
        day["users"][(key.user_id or "") if key else ""] += amount
        day["models"][r["model"]] += amount
        day["end_users"][r["user_hash"]] += amount
        if r["key_hash"]:
            day[r["key_hash"]] = day.get(r["key_hash"], Decimal(0)) + amount
    if out:
        first_day, last_day = days(start, end)
        day_ = max(min(out), first_day)
        last_day = min(last_day, datetime.now(UTC).date())
        while day_ <= last_day:
            out.setdefault(day_, _empty_day())
            day_ += timedelta(days=1)
    return [{**v, "startTime": k} for k, v in sorted(out.items())]


def _empty_day() -> dict[str, Any]:
    return {
        "spend": Decimal(0),
        "users": defaultdict(Decimal),
        "models": defaultdict(Decimal),
        "end_users": defaultdict(Decimal),
    }
