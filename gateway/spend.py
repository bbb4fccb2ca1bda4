"""Spend query API (admin key): views maintained by the projection workers.

GET /spend/tags, /spend/users, /spend/logs (filters, cursor pagination,
?format=csv), /spend/report, /tag/daily/activity, /user/info.
"""

from __future__ import annotations

import base64
import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from gateway.errors import ApiError
from gateway.keys import STORE, USER_SECRET
from ledger import queries
from ledger.privacy import hash_user

routes = web.RouteTableDef()
_encoder = msgspec.json.Encoder(decimal_format="number")
_FAR_PAST = datetime(1970, 1, 1, tzinfo=UTC)
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
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
    },
    "/spend/report": {"start_date", "end_date", "group_by", "interval"},
    "/tag/daily/activity": {"start_date", "end_date", "tags"},
    "/user/info": {"user", "user_hash"},
}


def _json(data: Any) -> web.Response:
    return web.Response(body=_encoder.encode(data), content_type="application/json")


def _check_params(request: web.Request) -> None:
    known = _KNOWN[request.path]
    for name, value in request.query.items():
        if name not in known:
            raise ApiError(
                400, f"unknown query parameter {name!r}; known: {', '.join(sorted(known))}", param=name
            )
        if "\x00" in value:
            raise ApiError(400, f"{name} contains a NUL character", param=name)


def _instant(request: web.Request, name: str, default: datetime, *, end: bool = False) -> datetime:
    """A date (YYYY-MM-DD) or an ISO timestamp; an end date includes its whole day."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            moment = datetime.combine(day, time(), tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400,
            f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 timestamp, got {raw!r}",
            param=name,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _range(request: web.Request) -> tuple[datetime, datetime]:
    start = _instant(request, "start_date", _FAR_PAST)
    end = _instant(request, "end_date", _FAR_FUTURE, end=True)
    if end <= start:
        raise ApiError(400, "end_date must be after start_date", param="end_date")
    return start, end


def _days(start: datetime, end: datetime) -> tuple[date, date]:
    """Inclusive day bounds for the daily tables."""
    return start.date(), (end - timedelta(microseconds=1)).date()


def _int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}", param=name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}", param=name)
    return value


def _user_hash(request: web.Request) -> str | None:
    if "user" in request.query:
        return hash_user(request.query["user"], request.app[USER_SECRET])
    return request.query.get("user_hash")


@routes.get("/spend/tags")
async def spend_tags(request: web.Request) -> web.Response:
    _check_params(request)
    first, last = _days(*_range(request))
    rows = await queries.spend_by_tag(request.app[STORE].pool, first, last)
    return _json([dict(r) for r in rows])


@routes.get("/spend/users")
async def spend_users(request: web.Request) -> web.Response:
    _check_params(request)
    first, last = _days(*_range(request))
    limit = _int(request, "limit", 100, 1, 10_000)
    assert limit is not None
    rows = await queries.spend_by_user(request.app[STORE].pool, first, last, limit)
    return _json([dict(r) for r in rows])


@routes.get("/user/info")
async def user_info(request: web.Request) -> web.Response:
    _check_params(request)
    user_hash = _user_hash(request)
    if not user_hash:
        raise ApiError(400, "user (the raw id; it is hashed for the lookup) is required", param="user")
    total, daily = await queries.user_info(request.app[STORE].pool, user_hash)
    if total is None:
        raise ApiError(404, "no spend recorded for this user", type="not_found_error", param="user")
    return _json({**dict(total), "daily": [dict(r) for r in daily]})


@routes.get("/tag/daily/activity")
async def tag_daily_activity(request: web.Request) -> web.Response:
    _check_params(request)
    first, last = _days(*_range(request))
    raw = request.query.get("tags")
    tags = [t.strip() for t in raw.split(",") if t.strip()] if raw else None
    rows = await queries.tag_daily_activity(request.app[STORE].pool, tags, first, last)
    return _json([dict(r) for r in rows])


@routes.get("/spend/report")
async def spend_report(request: web.Request) -> web.Response:
    _check_params(request)
    start, end = _range(request)
    group_by = request.query.get("group_by", "tag")
    if not queries.valid_group(group_by):
        raise ApiError(400, "group_by must be tag, user, model or metadata.<key>", param="group_by")
    interval = request.query.get("interval", "day")
    if interval not in queries.INTERVALS:
        raise ApiError(400, "interval must be day, week or month", param="interval")
    rows = await queries.spend_report(
        request.app[STORE].pool, group_by=group_by, interval=interval, start=start, end=end
    )
    return _json(
        {
            "group_by": group_by,
            "interval": interval,
            "rows": [{"group": r["grp"], **{k: v for k, v in r.items() if k != "grp"}} for r in rows],
        }
    )


def _encode_cursor(recorded_at: datetime, position: int) -> str:
    return base64.urlsafe_b64encode(f"{recorded_at.isoformat()}|{position}".encode()).decode()


def _decode_cursor(raw: str) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(raw.encode()).decode()
        stamp, _, position = text.partition("|")
        return datetime.fromisoformat(stamp), int(position)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "cursor is not one this API handed out", param="cursor") from None


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
)


@routes.get("/spend/logs")
async def spend_logs(request: web.Request) -> web.StreamResponse:
    _check_params(request)
    start, end = _range(request)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ApiError(400, "format must be json or csv", param="format")
    kind = request.query.get("kind")
    if kind is not None and kind not in ("spend", "expired", "released", "denied"):
        raise ApiError(400, "kind must be spend, expired, released or denied", param="kind")
    status = _int(request, "status", None, 100, 599)
    cursor = _decode_cursor(request.query["cursor"]) if request.query.get("cursor") else None
    limit = _int(request, "limit", 100, 1, 1000) if fmt == "json" else None
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
    )
    pool = request.app[STORE].pool
    if fmt == "json":
        rows = await pool.fetch(sql, *args)
        data = [_log(r) for r in rows]
        next_cursor = (
            _encode_cursor(rows[-1]["recorded_at"], rows[-1]["position"])
            if limit is not None and len(rows) == limit
            else None
        )
        return _json({"data": data, "next_cursor": next_cursor})
    # CSV: streamed straight from a server-side cursor, never held in memory whole.
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": 'attachment; filename="spend_logs.csv"',
        }
    )
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(_CSV_FIELDS)
    async with pool.acquire() as conn, conn.transaction():
        async for r in conn.cursor(sql, *args, prefetch=1000):
            row = _log(r)
            writer.writerow([_csv_value(row[f]) for f in _CSV_FIELDS])
            if buffer.tell() > 65536:
                await response.write(buffer.getvalue().encode())
                buffer.seek(0)
                buffer.truncate()
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


def _log(r: Any) -> dict[str, Any]:
    row = dict(r)
    row["metadata"] = msgspec.json.decode(row["metadata"]) if row["metadata"] else {}
    return row


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return msgspec.json.encode(value).decode()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)
