"""JSON the dashboard needs beyond the spend API: top-line numbers, spend per UTC
day counted once per request, which tags are refusing requests, and one tag's
breakdown by model, user and denial (admin key, like every admin route).

GET /ui/api/overview?start_date=&end_date=   (inclusive UTC days; default: the last 30)
GET /ui/api/tag?name=&start_date=&end_date=
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from gateway.appkeys import READ_POOL, TAGS
from gateway.errors import ApiError
from gateway.spend_api import check_params
from ledger.postgres import queries

routes = web.RouteTableDef()

DEFAULT_DAYS = 30
MAX_DAYS = 400  # a range is read from spend_logs: keep one request's work bounded
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NANO = Decimal("0.000000001")
_KNOWN = {"/ui/api/overview": {"start_date", "end_date"}, "/ui/api/tag": {"name", "start_date", "end_date"}}


class Totals(msgspec.Struct):
    spend: Decimal
    requests: int
    unpriced: int  # requests to models without a known price (recorded at 0)
    denials: int


class Day(msgspec.Struct):
    day: date  # a UTC day
    spend: Decimal  # every request once, whatever its tags
    requests: int
    unpriced: int
    denials: int


class ModelDay(msgspec.Struct):
    day: date
    model: str | None  # None: swept at its estimate, the model unknown
    spend: Decimal
    requests: int


class Denying(msgspec.Struct):
    """A tag that refused requests for its budget in the last month."""

    tag: str
    last_denied_at: datetime
    denials: int
    last_admitted_at: datetime | None  # the last charged request carrying the tag


class Denial(msgspec.Struct):
    request_id: str
    recorded_at: datetime
    model: str | None
    tags: list[str]
    user_hash: str | None
    metadata: dict[str, Any]
    denied_tag: str | None  # the tag whose budget said no (None: Redis was unavailable)
    reason: str | None
    estimate: Decimal | None  # the request's bound, reserved had it been admitted
    spent: Decimal | None  # the tag's spend and reservations in its window then
    reserved: Decimal | None
    max_budget: Decimal | None


class Overview(msgspec.Struct):
    now: datetime
    start_date: date
    end_date: date
    range: Totals
    today: Totals
    month: Totals  # this calendar month (UTC) so far
    last_month: Totals  # the whole previous month
    last_month_same_period: Totals  # the previous month up to the same point
    forecast_month_end: Decimal | None  # this month's spend at its rate so far
    days: list[Day]  # every day of the range, zeros included
    by_model: list[ModelDay]
    denying: list[Denying]
    denials: list[Denial]  # the newest in the range


class Group(msgspec.Struct):
    name: str | None
    spend: Decimal
    requests: int
    unpriced: int


class TagDetail(msgspec.Struct):
    tag: str
    start_date: date
    end_date: date
    by_model: list[Group]
    by_user: list[Group]  # hashed ids
    denials: list[Denial]  # requests carrying the tag that were refused, by it or another
    denying: Denying | None  # when the tag itself refused requests in the last month


_overview_encoder = msgspec.json.Encoder(decimal_format="number")


def _json(data: Overview | TagDetail) -> web.Response:
    return web.Response(body=_overview_encoder.encode(data), content_type="application/json")


def _check_params(request: web.Request) -> None:
    check_params(request, _KNOWN[request.path])


def _day(request: web.Request, name: str, default: date) -> date:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        if not _DATE.fullmatch(raw):
            raise ValueError
        day = date.fromisoformat(raw)
    except ValueError:
        raise ApiError(
            400, f"{name} must be a date (YYYY-MM-DD, a UTC day), got {raw!r}", param=name
        ) from None
    if not 1970 <= day.year <= 9998:  # room for the day arithmetic either side
        raise ApiError(400, f"{name} must be between 1970-01-01 and 9998-12-31, got {raw!r}", param=name)
    return day


def _days(request: web.Request, now: datetime) -> tuple[date, date]:
    """The inclusive UTC days asked for (default: the last 30, today included)."""
    end = _day(request, "end_date", now.date())
    start = _day(request, "start_date", end - timedelta(days=DEFAULT_DAYS - 1))
    if end < start:
        raise ApiError(400, "end_date must not be before start_date", param="end_date")
    if (end - start).days + 1 > MAX_DAYS:
        raise ApiError(400, f"a range may span at most {MAX_DAYS} days", param="start_date")
    return start, end


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _month_start(moment: datetime) -> datetime:
    return _midnight(moment.date().replace(day=1))


def _totals(row: Any) -> Totals:
    return Totals(Decimal(row["spend"]), int(row["requests"]), int(row["unpriced"]), int(row["denials"]))


def _denial(r: Any) -> Denial:
    return Denial(
        request_id=r["request_id"],
        recorded_at=r["recorded_at"],
        model=r["model"],
        tags=list(r["tags"]),
        user_hash=r["user_hash"],
        metadata=msgspec.json.decode(r["metadata"]) if r["metadata"] else {},
        denied_tag=r["denied_tag"],
        reason=r["reason"],
        estimate=r["estimate"],
        spent=r["spent"],
        reserved=r["reserved"],
        max_budget=r["max_budget"],
    )


async def _denying(pool: Any, now: datetime) -> list[Denying]:
    """Tags that refused requests for their budget in the last 31 days (the longest window)."""
    return [
        Denying(r["tag"], r["last_denied_at"], int(r["denials"]), r["last_admitted_at"])
        for r in await queries.denying_tags(pool, now - timedelta(days=31))
    ]


def forecast(spend: Decimal, month_start: datetime, now: datetime) -> Decimal | None:
    """This month's spend at the month's average rate so far (None in its first hour:
    too little to extrapolate from)."""
    elapsed = (now - month_start).total_seconds()
    if elapsed < 3600:
        return None
    next_month = _month_start(month_start + timedelta(days=32))
    length = (next_month - month_start).total_seconds()
    return (spend * Decimal(length) / Decimal(elapsed)).quantize(_NANO)


@routes.get("/ui/api/overview")
async def overview(request: web.Request) -> web.Response:
    _check_params(request)
    now = request.app[TAGS].now()
    start, end = _days(request, now)
    pool = request.app[READ_POOL]
    first, last = _midnight(start), _midnight(end + timedelta(days=1))
    month = _month_start(now)
    last_month = _month_start(month - timedelta(days=1))
    same_point = min(last_month + (now - month), month)

    rows = await queries.daily_by_model(pool, first, last)
    per_day: dict[date, Day] = {}
    for i in range((end - start).days + 1):
        day = start + timedelta(days=i)
        per_day[day] = Day(day, Decimal(0), 0, 0, 0)
    by_model = []
    for r in rows:
        d = per_day[r["day"]]
        d.spend += r["spend"]
        d.requests += r["requests"]
        d.unpriced += r["unpriced"]
        d.denials += r["denials"]
        if r["requests"]:
            by_model.append(ModelDay(r["day"], r["model"], Decimal(r["spend"]), int(r["requests"])))
    days = list(per_day.values())
    next_month = _month_start(month + timedelta(days=32))
    this_month = _totals(await queries.spend_between(pool, month, next_month))
    body = Overview(
        now=now,
        start_date=start,
        end_date=end,
        range=Totals(
            sum((d.spend for d in days), Decimal(0)),
            sum(d.requests for d in days),
            sum(d.unpriced for d in days),
            sum(d.denials for d in days),
        ),
        today=_totals(
            await queries.spend_between(
                pool, _midnight(now.date()), _midnight(now.date() + timedelta(days=1))
            )
        ),
        month=this_month,
        last_month=_totals(await queries.spend_between(pool, last_month, month)),
        last_month_same_period=_totals(await queries.spend_between(pool, last_month, same_point)),
        forecast_month_end=forecast(this_month.spend, month, now),
        days=days,
        by_model=by_model,
        denying=await _denying(pool, now),
        denials=[_denial(r) for r in await queries.denials(pool, tag=None, start=first, end=last, limit=20)],
    )
    return _json(body)


@routes.get("/ui/api/tag")
async def tag_detail(request: web.Request) -> web.Response:
    _check_params(request)
    name = request.query.get("name", "")
    if not name or len(name) > 256:
        raise ApiError(400, "name must be a tag name of 1 to 256 characters", param="name")
    now = request.app[TAGS].now()
    start, end = _days(request, now)
    pool = request.app[READ_POOL]
    first, last = _midnight(start), _midnight(end + timedelta(days=1))

    def groups(rows: list[Any]) -> list[Group]:
        return [Group(r["grp"], Decimal(r["spend"]), int(r["requests"]), int(r["unpriced"])) for r in rows]

    body = TagDetail(
        tag=name,
        start_date=start,
        end_date=end,
        by_model=groups(await queries.tag_breakdown(pool, name, "model", first, last, 50)),
        by_user=groups(await queries.tag_breakdown(pool, name, "user", first, last, 20)),
        denials=[_denial(r) for r in await queries.denials(pool, tag=name, start=first, end=last, limit=50)],
        denying=next((d for d in await _denying(pool, now) if d.tag == name), None),
    )
    return _json(body)
