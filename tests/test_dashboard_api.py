"""The dashboard's JSON (/ui/api/*) over real HTTP, checked against the event log and
against the public spend API, which computes the same numbers another way."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest

from ledger import events as ev
from tests.conftest import projected
from tests.test_proxy import ADMIN_KEY, CHAT, Gateway, gateway

__all__ = ["gateway"]  # the fixture, imported for this module
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def get(gw: Gateway, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(gw.url + path, headers=AUTH) as r:
        return r.status, await r.json()


async def traffic(gw: Gateway) -> None:
    """Requests with overlapping tags, two users, an unpriced model, and a budget
    small enough to refuse requests."""
    await gw.budget("team:tight", "0.00003")
    sdk = gw.sdk()
    for i, (tags, model) in enumerate(
        [
            (["team:a", "team:b"], "gpt-4o-mini"),
            (["team:a"], "gpt-4o"),
            (["team:b"], "house-model-x"),  # no known price: recorded at 0
            (["team:a", "team:b"], "gpt-4o-mini"),
        ]
    ):
        await sdk.chat.completions.create(
            model=model,
            messages=CHAT["messages"],
            max_tokens=20,
            user=f"user{i % 2}@example.com",
            extra_body={"tags": tags},
        )
    denied = 0
    for _ in range(8):
        try:
            await sdk.chat.completions.create(**CHAT, max_tokens=20, extra_body={"tags": ["team:tight"]})
        except openai.RateLimitError:
            denied += 1
    assert denied >= 1
    await projected(gw.app)


async def test_overview_counts_each_request_once_and_matches_the_spend_api(gateway: Gateway) -> None:
    gw = gateway
    await traffic(gw)
    spends = await gw.spends()
    status, body = await get(gw, "/ui/api/overview")
    assert status == 200, body
    today = datetime.now(UTC).date()
    assert len(body["days"]) == 30  # the default range, zero days included
    assert body["end_date"] == today.isoformat()
    assert body["start_date"] == (today - timedelta(days=29)).isoformat()
    total = sum((s.cost for s in spends), Decimal(0))
    days = {d["day"]: d for d in body["days"]}
    assert Decimal(str(days[today.isoformat()]["spend"])) == total  # not once per tag
    assert days[today.isoformat()]["requests"] == len(spends)
    assert days[today.isoformat()]["unpriced"] == 1
    assert sum(d["denials"] for d in body["days"]) == body["range"]["denials"] >= 1
    assert Decimal(str(body["today"]["spend"])) == total
    assert Decimal(str(body["month"]["spend"])) >= total
    assert body["today"]["requests"] == body["range"]["requests"] == len(spends)

    # the same numbers from the public report API (grouped by model: one row per request)
    start = (today - timedelta(days=29)).isoformat()
    status, report = await get(
        gw, f"/spend/report?group_by=model&interval=day&start_date={start}&end_date={today}"
    )
    assert status == 200
    per_day: dict[str, Decimal] = defaultdict(Decimal)
    for r in report["rows"]:
        per_day[r["period"]] += Decimal(str(r["spend"]))
    assert {d: Decimal(str(v["spend"])) for d, v in days.items() if v["requests"]} == dict(per_day)
    # the stacked bars: models add up to each day's total
    stacked: dict[str, Decimal] = defaultdict(Decimal)
    for m in body["by_model"]:
        stacked[m["day"]] += Decimal(str(m["spend"]))
    assert stacked == dict(per_day)

    # why requests were refused, from the RequestDenied events themselves
    refusals = [
        ev.decode(r)
        for r in await gw.store.read_types(["RequestDenied"], 0, 100)
        if r.type == "RequestDenied"
    ]
    assert len(body["denials"]) == len(refusals)
    newest = body["denials"][0]
    assert newest["denied_tag"] == "team:tight"
    assert newest["reason"] == "budget"
    assert Decimal(str(newest["max_budget"])) == Decimal("0.00003")
    assert newest["estimate"] > 0
    assert "team:tight" in newest["tags"]
    [denying] = body["denying"]
    assert denying["tag"] == "team:tight"
    assert denying["denials"] == len(refusals)

    # forecast to month end: this month's spend at its rate so far
    now = datetime.fromisoformat(body["now"])
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if (now - month) >= timedelta(hours=1):
        following = (month + timedelta(days=32)).replace(day=1)
        expected = (
            Decimal(str(body["month"]["spend"]))
            * Decimal((following - month).total_seconds())
            / Decimal((now - month).total_seconds())
        )
        assert abs(Decimal(str(body["forecast_month_end"])) - expected) < Decimal("0.000001")


async def test_tag_detail_by_model_user_and_denials(gateway: Gateway) -> None:
    gw = gateway
    await traffic(gw)
    spends = await gw.spends()
    status, body = await get(gw, "/ui/api/tag?name=team:b")
    assert status == 200, body
    mine = [s for s in spends if "team:b" in s.tags]
    models = {g["name"]: g for g in body["by_model"]}
    assert set(models) == {s.model for s in mine}
    assert models["house-model-x"]["unpriced"] == 1
    assert models["house-model-x"]["spend"] == 0
    assert sum(Decimal(str(g["spend"])) for g in body["by_model"]) == sum((s.cost for s in mine), Decimal(0))
    assert sum(g["requests"] for g in body["by_user"]) == len(mine)
    assert body["denials"] == []  # team:b refused nothing
    status, tight = await get(gw, "/ui/api/tag?name=team:tight")
    assert tight["denials"]
    assert {d["denied_tag"] for d in tight["denials"]} == {"team:tight"}


async def test_empty_ledger(gateway: Gateway) -> None:
    status, body = await get(gateway, "/ui/api/overview?start_date=2026-01-01&end_date=2026-01-07")
    assert status == 200
    assert [d["day"] for d in body["days"]] == [str(date(2026, 1, i)) for i in range(1, 8)]
    assert all(d["spend"] == 0 and d["requests"] == 0 for d in body["days"])
    assert body["by_model"] == []
    assert body["denials"] == []
    assert body["denying"] == []


@pytest.mark.parametrize(
    ("query", "param", "fragment"),
    [
        ("/ui/api/overview?start_date=yesterday", "start_date", "must be a date (YYYY-MM-DD"),
        ("/ui/api/overview?end_date=2026-02-30", "end_date", "must be a date"),
        ("/ui/api/overview?start_date=2026-02-02&end_date=2026-02-01", "end_date", "must not be before"),
        ("/ui/api/overview?start_date=2020-01-01&end_date=2026-01-01", "start_date", "at most 400 days"),
        ("/ui/api/overview?colour=red", "colour", "unknown query parameter"),
        ("/ui/api/overview?end_date=9999-12-31", "end_date", "between 1970-01-01 and 9998-12-31"),
        ("/ui/api/overview?end_date=0001-01-05", "end_date", "between 1970-01-01 and 9998-12-31"),
        ("/ui/api/tag", "name", "name must be a tag name"),
        ("/ui/api/tag?name=a%00b", "name", "NUL"),
    ],
)
async def test_bad_parameters_are_400s_naming_them(
    gateway: Gateway, query: str, param: str, fragment: str
) -> None:
    status, body = await get(gateway, query)
    assert status == 400
    assert body["error"]["param"] == param
    assert fragment in body["error"]["message"]


async def test_dashboard_routes_need_the_admin_key(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/ui/api/overview", "/ui/api/tag?name=x"):
            async with http.get(gateway.url + path) as r:
                assert r.status == 401
            async with http.get(gateway.url + path, headers={"Authorization": f"Bearer {gateway.key}"}) as r:
                assert r.status == 401  # a client key is no admin key
