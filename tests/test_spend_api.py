"""The spend query API over real HTTP, on views built by the projection workers."""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.appkeys import ADMISSION, BUDGET_BOOK, TAGS, USER_SECRET
from ledger import events as ev
from ledger.admission import Admitted
from ledger.settings import Settings
from tests.conftest import gateway_app, projected

ADMIN = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
N = 45


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return gateway_app(msgspec.structs.replace(settings, admin_key=ADMIN))


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
    # LiteLLM's names for the same numbers
    assert Decimal(str(by_tag["team:a"]["total_spend"])) == expected
    assert (by_tag["team:a"]["individual_request_tag"], by_tag["team:a"]["log_count"]) == ("team:a", N)
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
    """A bare list (LiteLLM's shape); with limit, the next page's cursor travels in
    x-ledger-next-cursor and a Link header."""
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        path = "/spend/logs?limit=7" + (f"&cursor={cursor}" if cursor else "")
        r = await client.get(path, headers=AUTH)
        assert r.status == 200
        page = await r.json()
        seen += [row["request_id"] for row in page]
        pages += 1
        cursor = r.headers.get("x-ledger-next-cursor")
        if cursor is None:
            assert "Link" not in r.headers
            break
        link = r.headers["Link"]
        assert link.endswith('>; rel="next"')
        next_url = urlsplit(link[1 : link.index(">")])
        assert parse_qs(next_url.query) == {"limit": ["7"], "cursor": [cursor]}
    assert len(seen) == len(set(seen)) == N  # no gaps, no repeats
    assert pages == N // 7 + 1
    # without limit: every row, streamed, newest first
    status, every = await get(client, "/spend/logs")
    assert status == 200
    assert [row["request_id"] for row in every] == seen
    status, page = await get(client, "/spend/logs?tag=app:1&model=gpt-4o")
    assert {r["request_id"] for r in page} == {f"r{i}" for i in range(N) if i % 3 == 1 and i % 2}
    status, page = await get(client, "/spend/logs?user=user2@example.com&status=200&kind=spend&limit=1000")
    assert len(page) == len(range(2, N, 4))
    assert page[0]["spend_logs_metadata"]["customer"] in ("c0", "c1")
    assert page[0]["metadata"]["spend_logs_metadata"] == page[0]["spend_logs_metadata"]
    status, [one] = await get(client, "/spend/logs?request_id=r7")
    assert (one["request_id"], one["status"], one["http_status"], one["kind"]) == (
        "r7",
        "success",
        200,
        "spend",
    )
    assert Decimal(str(one["spend"])) == Decimal(str(one["cost"])) == Decimal("0.003")
    assert one["total_tokens"] == 15
    assert one["request_tags"] == one["tags"] == ["team:a", "app:1"]


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
    status, activity = await get(client, "/tag/daily/activity?tags=team:a")
    assert status == 200
    [today] = activity["results"]
    assert set(today["breakdown"]["models"]) == {"gpt-4o", "gpt-4o-mini"}
    assert set(today["breakdown"]["entities"]) == {"team:a"}
    assert today["metrics"]["api_requests"] == today["metrics"]["successful_requests"] == N
    assert activity["metadata"]["total_api_requests"] == N


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


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
        # issue 11 item 11: these were 500s
        ("/spend/logs?start_date=0001-01-01T00:00:00%2B14:00", "start_date"),
        ("/spend/tags?end_date=0001-01-01T00:00:00%2B14:00", "end_date"),
        (f"/spend/logs?cursor={_cursor('2026-01-01T00:00:00+00:00|99999999999999999999')}", "cursor"),
        (f"/spend/logs?cursor={_cursor('2026-01-01T00:00:00+00:00|-1')}", "cursor"),
        (f"/spend/logs?cursor={_cursor('2026-01-01T00:00:00|5')}", "cursor"),
        (f"/spend/logs?cursor={_cursor('0001-01-01T00:00:00+14:00|5')}", "cursor"),
        ("/spend/logs?summarize=maybe", "summarize"),
        ("/tag/daily/activity?page=0", "page"),
        ("/global/spend/report?group_by=colour", "group_by"),
        ("/user/daily/activity?page_size=1001", "page_size"),
    ],
)
async def test_bad_parameters_are_400s_naming_them(client: TestClient, path: str, param: str) -> None:
    status, body = await get(client, path)
    assert status == 400, body
    assert body["error"]["param"] == param


@pytest.mark.parametrize(
    "path",
    [
        "/spend/logs?end_date=9999-12-31",
        "/spend/tags?end_date=9999-12-31",
        "/spend/logs?start_date=2026-01-01&end_date=9999-12-31&summarize=false",
        "/spend/users?end_date=9999-12-31",
        "/spend/report?end_date=9999-12-31",
        "/tag/daily/activity?end_date=9999-12-31",
        "/global/spend/report?end_date=9999-12-31",
        "/spend/logs?start_date=0001-01-01T00:00:00Z",
    ],
)
async def test_extreme_dates_are_answered(client: TestClient, path: str) -> None:
    """Issue 11 item 11: the last day a date can name and the first instant are answers, not 500s."""
    status, body = await get(client, path)
    assert status == 200, body
    assert body  # all of the fixture's traffic is inside these ranges


async def test_csv_neutralises_formulas_and_writes_booleans(client: TestClient, app: web.Application) -> None:
    """Issue 11 item 6 (OWASP CSV injection) and issue 12 item 10 (booleans)."""
    evil = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(1)", "\tTAB", "\rCR"]
    admission = app[ADMISSION]
    for i, value in enumerate(evil):
        a = await admission.admit(f"evil{i}", [value], Decimal("0.01"), model=value)
        assert isinstance(a, Admitted)
        await admission.record_spend(a, Decimal("0.001"), model=value, metadata={"note": value}, status=200)
    await projected(app)
    r = await client.get("/spend/logs?format=csv&kind=spend", headers=AUTH)
    assert r.status == 200
    rows = list(csv.DictReader(io.StringIO(await r.text(), newline="")))
    by_id = {row["request_id"]: row for row in rows}
    for i, value in enumerate(evil):
        row = by_id[f"evil{i}"]
        assert row["model"] == "'" + value  # shown as text by spreadsheets, not run
        assert row["tags"] == "'" + value
        assert row["metadata"].startswith("{")  # starts with a brace: no formula
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
        assert row["streamed"] in ("true", "false")
    assert by_id["r0"]["streamed"] == "false"
