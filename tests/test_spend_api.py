"""The spend query API over real HTTP, on views built by the projection workers."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.keys import ADMISSION, BUDGET_BOOK, TAGS, USER_SECRET
from ledger import events as ev
from ledger.admission import Admitted
from ledger.settings import Settings
from tests.conftest import gateway_app, projected

ADMIN = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
N = 45


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return gateway_app(dataclasses.replace(settings, admin_key=ADMIN))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, app: web.Application) -> TestClient:
    c = await aiohttp_client(app)
    await app[TAGS].create("team:a", ev.TagFields(max_budget=Decimal(100), budget_duration="1d"))
    await app[BUDGET_BOOK].refresh()
    admission = app[ADMISSION]
    secret = app[USER_SECRET]
    for i in range(N):
        a = await admission.admit(f"r{i}", ["team:a", f"app:{i % 3}"], Decimal("0.01"), model="m")
        assert isinstance(a, Admitted)
        user = hmac.new(secret, f"user{i % 4}@example.com".encode(), hashlib.sha256).hexdigest()
        await admission.record_spend(
            a,
            Decimal("0.001") * (i % 5 + 1),
            model="gpt-4o" if i % 2 else "gpt-4o-mini",
            provider="mock",
            user_hash=user,
            metadata={"customer": f"c{i % 2}"},
            prompt_tokens=10,
            completion_tokens=5,
            status=200,
        )
    await projected(app)
    return c


async def get(client: TestClient, path: str) -> tuple[int, Any]:
    r = await client.get(path, headers=AUTH)
    return r.status, await r.json()


async def test_spend_by_tag_user_and_dates(client: TestClient) -> None:
    status, rows = await get(client, "/spend/tags")
    assert status == 200
    by_tag = {r["tag"]: r for r in rows}
    expected = sum(Decimal("0.001") * (i % 5 + 1) for i in range(N))
    assert Decimal(str(by_tag["team:a"]["spend"])) == expected
    assert by_tag["team:a"]["requests"] == N
    assert sum(by_tag[f"app:{k}"]["requests"] for k in range(3)) == N
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert (await get(client, f"/spend/tags?start_date={tomorrow}"))[1] == []
    status, users = await get(client, "/spend/users?limit=2")
    assert status == 200
    assert len(users) == 2
    status, info = await get(client, "/user/info?user=user1@example.com")
    assert status == 200
    assert info["requests"] == len(range(1, N, 4))
    assert info["daily"][0]["requests"] == info["requests"]
    assert (await get(client, "/user/info?user=nobody@example.com"))[0] == 404


async def test_spend_logs_filters_and_pagination(client: TestClient) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        path = "/spend/logs?limit=7" + (f"&cursor={cursor}" if cursor else "")
        status, page = await get(client, path)
        assert status == 200
        seen += [row["request_id"] for row in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == N  # no gaps, no repeats
    assert pages == N // 7 + 1
    status, page = await get(client, "/spend/logs?tag=app:1&model=gpt-4o&limit=1000")
    assert {r["request_id"] for r in page["data"]} == {f"r{i}" for i in range(N) if i % 3 == 1 and i % 2}
    status, page = await get(client, "/spend/logs?user=user2@example.com&status=200&kind=spend&limit=1000")
    assert len(page["data"]) == len(range(2, N, 4))
    assert page["data"][0]["metadata"]["customer"] in ("c0", "c1")


async def test_spend_logs_csv(client: TestClient) -> None:
    r = await client.get("/spend/logs?format=csv&tag=team:a", headers=AUTH)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert len(rows) == N
    assert {row["tags"] for row in rows} >= {"team:a,app:0"}
    assert all(Decimal(row["cost"]) > 0 for row in rows)


async def test_report_and_daily_activity(client: TestClient) -> None:
    for group_by in ("tag", "user", "model", "metadata.customer"):
        for interval in ("day", "week", "month"):
            status, report = await get(client, f"/spend/report?group_by={group_by}&interval={interval}")
            assert status == 200, report
            total = sum(r["requests"] for r in report["rows"])
            assert total == (N * 2 if group_by == "tag" else N)
    status, report = await get(client, "/spend/report?group_by=metadata.customer")
    assert {r["group"] for r in report["rows"]} == {"c0", "c1"}
    status, rows = await get(client, "/tag/daily/activity?tags=team:a")
    assert status == 200
    assert {(r["tag"], r["model"]) for r in rows} == {("team:a", "gpt-4o"), ("team:a", "gpt-4o-mini")}
    assert sum(r["requests"] for r in rows) == N


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/spend/tags?start=2024-01-01", "start"),
        ("/spend/tags?start_date=yesterday", "start_date"),
        ("/spend/tags?start_date=2026-02-30", "start_date"),
        ("/spend/tags?start_date=2026-01-02&end_date=2026-01-01", "end_date"),
        ("/spend/users?limit=0", "limit"),
        ("/spend/users?limit=ten", "limit"),
        ("/spend/logs?cursor=garbage", "cursor"),
        ("/spend/logs?format=xml", "format"),
        ("/spend/logs?status=abc", "status"),
        ("/spend/logs?kind=refund", "kind"),
        ("/spend/logs?limit=5000", "limit"),
        ("/spend/report?group_by=colour", "group_by"),
        ("/spend/report?interval=hour", "interval"),
        ("/user/info", "user"),
    ],
)
async def test_bad_parameters_are_400s_naming_them(client: TestClient, path: str, param: str) -> None:
    status, body = await get(client, path)
    assert status == 400, body
    assert body["error"]["param"] == param
