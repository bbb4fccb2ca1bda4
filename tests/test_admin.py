"""The admin API over real HTTP: every endpoint, every error, auth on every route."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.appkeys import ADMISSION
from gateway.auth import ADMIN, PUBLIC, access_of
from ledger.admission import Admitted
from ledger.settings import Settings
from tests.conftest import gateway_app, projected

ADMIN_KEY = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return gateway_app(msgspec.structs.replace(settings, admin_key=ADMIN_KEY))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, app: web.Application) -> TestClient:
    return await aiohttp_client(app)


async def post(client: TestClient, path: str, body: Any) -> tuple[int, Any]:
    r = await client.post(path, json=body, headers=AUTH)
    return r.status, await r.json()


async def get(client: TestClient, path: str) -> tuple[int, Any]:
    r = await client.get(path, headers=AUTH)
    return r.status, await r.json()


async def test_create_inspect_update_delete(client: TestClient, app: web.Application) -> None:
    status, tag = await post(
        client,
        "/tag/new",
        {
            "name": "team:search",
            "max_budget": 10,
            "budget_duration": "1d",
            "soft_budget": 8,
            "description": "search",
            "models": ["gpt-4o-mini"],
            "metadata": {"owner": "ana"},
        },
    )
    assert status == 200  # LiteLLM's /tag/new answers 200 {message, tag}
    assert "created" in tag["message"]
    tag = tag["tag"]
    assert tag["name"] == "team:search"
    assert tag["max_budget"] == 10
    assert tag["remaining"] == 10
    assert tag["window_start"].endswith("T00:00:00Z")
    assert tag["reset_at"] > tag["window_start"]

    # traffic through the ledger shows up in /tag/info
    admission = app[ADMISSION]
    a = await admission.admit("req-1", ["team:search"], Decimal("0.5"))
    assert isinstance(a, Admitted)
    await admission.record_spend(a, Decimal("0.25"))
    b = await admission.admit("req-2", ["team:search"], Decimal("1"))  # in flight
    assert isinstance(b, Admitted)

    await projected(app)
    status, infos = await post(client, "/tag/info", {"names": ["team:search"]})
    assert status == 200
    info = infos["team:search"]
    assert (info["spend"], info["reserved"], info["remaining"]) == (0.25, 1, 8.75)
    assert (info["total_spend"], info["request_count"]) == (0.25, 1)
    for field in (
        "name",
        "description",
        "max_budget",
        "soft_budget",
        "budget_duration",
        "spend",
        "remaining",
        "window_start",
        "reset_at",
        "total_spend",
        "request_count",
        "created_at",
        "updated_at",
    ):
        assert field in info

    status, infos = await get(client, "/tag/info?names=team:search")
    assert status == 200
    assert infos["team:search"]["spend"] == 0.25

    status, body = await post(client, "/tag/update", {"name": "team:search", "max_budget": 20})
    tag = body["tag"]
    assert (status, tag["max_budget"], tag["soft_budget"], tag["description"]) == (
        200,
        20,
        8,
        "search",
    )

    status, listed = await get(client, "/tag/list")
    assert status == 200
    assert [t["name"] for t in listed] == ["team:search"]

    status, history = await get(client, "/tag/team:search/history")
    assert status == 200
    assert [h["type"] for h in history] == ["TagCreated", "TagUpdated"]
    assert history[1]["changes"] == {"max_budget": {"old": 10, "new": 20}}
    assert history[1]["actor"] == "admin"

    status, body = await post(client, "/tag/delete", {"name": "team:search"})
    assert status == 200
    assert body["name"] == "team:search"
    status, listed = await get(client, "/tag/list")
    # no longer defined, but seen in traffic: listed as such (as LiteLLM lists spend tags)
    assert [(t["name"], t["defined"], t["max_budget"], t["total_spend"]) for t in listed] == [
        ("team:search", False, None, 0.25)
    ]
    status, history = await get(client, "/tag/team:search/history")
    assert [h["type"] for h in history][-1] == "TagDeleted"


async def test_not_found_and_conflict(client: TestClient) -> None:
    assert (await post(client, "/tag/new", {"name": "a"}))[0] == 200
    status, body = await post(client, "/tag/new", {"name": "a"})
    assert (status, body["error"]["param"]) == (409, "name")
    status, body = await post(client, "/tag/info", {"names": ["a", "ghost", "phantom"]})
    assert status == 404
    assert "'ghost'" in body["error"]["message"]
    assert "'phantom'" in body["error"]["message"]
    assert (await post(client, "/tag/update", {"name": "ghost", "description": "x"}))[0] == 404
    assert (await post(client, "/tag/delete", {"name": "ghost"}))[0] == 404
    assert (await get(client, "/tag/ghost/history"))[0] == 404


BAD_INPUTS: list[tuple[str, str, Any, int, str | None]] = [
    # (path, description, body, status, param)
    ("/tag/new", "missing name", {}, 400, "name"),
    ("/tag/new", "name not a string", {"name": 5}, 400, "name"),
    ("/tag/new", "empty name", {"name": ""}, 422, "name"),
    ("/tag/new", "name too long", {"name": "x" * 129}, 422, "name"),
    ("/tag/new", "leading space", {"name": " x"}, 422, "name"),
    ("/tag/new", "control character", {"name": "a\u0007b"}, 422, "name"),
    ("/tag/new", "unknown field", {"name": "x", "tpm": 5}, 400, "tpm"),
    ("/tag/new", "tpm_limit zero", {"name": "x", "tpm_limit": 0}, 422, "tpm_limit"),
    ("/tag/new", "rpm_limit as text", {"name": "x", "rpm_limit": "5"}, 400, "rpm_limit"),
    (
        "/tag/new",
        "parallel too large",
        {"name": "x", "max_parallel_requests": 10**7},
        422,
        "max_parallel_requests",
    ),
    (
        "/tag/new",
        "model budget negative",
        {"name": "x", "model_max_budget": {"gpt-4o": {"max_budget": -1}}},
        422,
        "model_max_budget.gpt-4o.max_budget",
    ),
    (
        "/tag/new",
        "model budget empty",
        {"name": "x", "model_max_budget": {"gpt-4o": {}}},
        422,
        "model_max_budget.gpt-4o",
    ),
    (
        "/tag/new",
        "model budget bad duration",
        {"name": "x", "model_max_budget": {"gpt-4o": {"max_budget": 1, "budget_duration": "1dx"}}},
        422,
        "model_max_budget.gpt-4o.budget_duration",
    ),
    ("/tag/new", "budget_id too long", {"name": "x", "budget_id": "b" * 300}, 422, "budget_id"),
    ("/tag/update", "negative spend", {"name": "a", "spend": -1}, 422, "spend"),
    ("/tag/new", "negative budget", {"name": "x", "max_budget": -1}, 422, "max_budget"),
    ("/tag/new", "NaN budget", {"name": "x", "max_budget": "NaN"}, 422, "max_budget"),
    ("/tag/new", "Infinity budget", {"name": "x", "max_budget": "Infinity"}, 422, "max_budget"),
    ("/tag/new", "huge budget", {"name": "x", "max_budget": 1e12}, 422, "max_budget"),
    ("/tag/new", "budget as bool", {"name": "x", "max_budget": True}, 400, "max_budget"),
    ("/tag/new", "budget as text", {"name": "x", "max_budget": "ten"}, 400, "max_budget"),
    (
        "/tag/new",
        "soft above max",
        {"name": "x", "max_budget": 1, "soft_budget": 2},
        422,
        "soft_budget",
    ),
    (
        "/tag/new",
        "duration 30dx",
        {"name": "x", "max_budget": 1, "budget_duration": "30dx"},
        422,
        "budget_duration",
    ),
    (
        "/tag/new",
        "duration 0d",
        {"name": "x", "max_budget": 1, "budget_duration": "0d"},
        422,
        "budget_duration",
    ),
    (
        "/tag/new",
        "duration -1d",
        {"name": "x", "max_budget": 1, "budget_duration": "-1d"},
        422,
        "budget_duration",
    ),
    (
        "/tag/new",
        "duration 1.5d",
        {"name": "x", "max_budget": 1, "budget_duration": "1.5d"},
        422,
        "budget_duration",
    ),
    (
        "/tag/new",
        "duration 1e9d",
        {"name": "x", "max_budget": 1, "budget_duration": "1e9d"},
        422,
        "budget_duration",
    ),
    (
        "/tag/new",
        "empty duration",
        {"name": "x", "max_budget": 1, "budget_duration": ""},
        422,
        "budget_duration",
    ),
    (
        "/tag/new",
        "duration as number",
        {"name": "x", "max_budget": 1, "budget_duration": 7},
        400,
        "budget_duration",
    ),
    (
        "/tag/new",
        "duration without budget",
        {"name": "x", "budget_duration": "1d"},
        422,
        "budget_duration",
    ),
    ("/tag/new", "models not a list", {"name": "x", "models": "gpt-4o"}, 400, "models"),
    ("/tag/new", "metadata not an object", {"name": "x", "metadata": [1]}, 400, "metadata"),
    ("/tag/new", "body is a list", [{"name": "x"}], 400, None),
    ("/tag/update", "update without name", {"max_budget": 1}, 400, "name"),
    ("/tag/update", "update unknown field", {"name": "x", "budget": 1}, 400, "budget"),
    ("/tag/delete", "delete extra field", {"name": "x", "force": True}, 400, "force"),
    ("/tag/info", "names not a list", {"names": "a,b"}, 400, "names"),
    ("/tag/info", "empty names", {"names": []}, 400, "names"),
    ("/tag/info", "names with a number", {"names": ["a", 1]}, 400, "names[1]"),
    ("/tag/new", "NUL in metadata", {"name": "x", "metadata": {"k": "a\u0000b"}}, 400, "body"),
    ("/key/generate", "NUL in key metadata", {"metadata": {"k": "\u0000"}}, 400, "body"),
]


@pytest.mark.parametrize(
    ("path", "what", "body", "status", "param"), BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS]
)
async def test_bad_inputs(
    client: TestClient, path: str, what: str, body: Any, status: int, param: str | None
) -> None:
    got, payload = await post(client, path, body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"]


@pytest.mark.parametrize(
    ("raw", "headers", "status", "fragment"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b"", {}, 400, "empty"),
        (b'{"name": "x"' + b" " * 70_000 + b"}", {}, 413, "too large"),
        ('{"name": "\udcff"}'.encode("utf-8", "surrogatepass"), {}, 400, "JSON"),
    ],
)
async def test_malformed_bodies(
    client: TestClient, raw: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    r = await client.post(
        "/tag/new", data=raw, headers={**AUTH, **headers, "Content-Type": "application/json"}
    )
    assert r.status == status
    assert fragment in (await r.json())["error"]["message"]


async def test_every_route_needs_a_key(client: TestClient, app: web.Application) -> None:
    """Enumerated from the router, so a new route cannot be forgotten."""
    status, made = await post(client, "/key/generate", {"tags": ["t"]})
    assert status == 200
    client_key = made["key"]
    checked = 0
    for route in app.router.routes():
        access = access_of(route.handler)
        if access == PUBLIC:
            continue
        path = route.resource.canonical.replace("{name}", "some-tag") if route.resource else "/"
        if access == ADMIN:  # a client key is no admin key
            r = await client.request(route.method, path, headers={"Authorization": f"Bearer {client_key}"})
            assert r.status == 401, (route.method, path)
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key-wrong-key"},
            {"Authorization": ADMIN_KEY},
        ):
            r = await client.request(route.method, path, headers=headers)
            assert r.status == 401, (route.method, path, headers)
            if route.method != "HEAD":
                body = await r.json()
                assert body["error"]["type"] == "authentication_error"
        checked += 1
    assert checked >= 7 + 6 + 16 + 1 + 8  # tag, key, customer, metrics and proxy routes


async def test_health_routes_are_public(client: TestClient) -> None:
    assert (await client.get("/health/live")).status == 200


async def test_admin_key_in_query_string_is_refused(client: TestClient) -> None:
    r = await client.get(f"/tag/list?api_key={ADMIN_KEY}", headers=AUTH)
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "credentials_in_url"


async def test_every_admin_route_is_in_the_openapi_document(client: TestClient, app: web.Application) -> None:
    r = await client.get("/openapi.json")
    assert r.status == 200
    spec = await r.json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    for route in app.router.routes():
        if access_of(route.handler) != ADMIN or route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource else ""
        if path == "/metrics":
            continue  # Prometheus text, not JSON
        assert (path, route.method) in documented, f"{route.method} {path} is missing from /openapi.json"


async def test_concurrent_key_and_end_user_updates_are_never_lost(client: TestClient) -> None:
    """Updates of different fields race on one stream version; the losers retry on
    fresh state, so every change lands."""
    status, made = await post(client, "/key/generate", {"key_alias": "racy"})
    assert status == 200
    changes: list[dict[str, Any]] = [
        {"tpm_limit": 10},
        {"rpm_limit": 5},
        {"max_parallel_requests": 2},
        {"team_id": "t"},
        {"user_id": "u"},
        {"budget_id": "b"},
        {"max_budget": 3},
        {"metadata": {"m": 1}},
    ]
    answers = await asyncio.gather(
        *(post(client, "/key/update", {"key": made["token_id"], **c}) for c in changes)
    )
    assert [a[0] for a in answers] == [200] * len(changes)
    status, info = await get(client, f"/key/info?key={made['token_id']}")
    for change in changes:
        for field, value in change.items():
            assert info["info"][field] == value, field

    assert (await post(client, "/customer/new", {"user_id": "racer"}))[0] == 200
    answers = await asyncio.gather(
        *(post(client, "/customer/update", {"user_id": "racer", **c}) for c in changes[:3]),
        post(client, "/customer/update", {"user_id": "racer", "alias": "R"}),
        post(client, "/customer/block", {"user_ids": ["racer"]}),
    )
    assert [a[0] for a in answers] == [200] * 5
    status, view = await get(client, "/customer/info?end_user_id=racer")
    assert (view["tpm_limit"], view["rpm_limit"], view["max_parallel_requests"]) == (10, 5, 2)
    assert (view["alias"], view["blocked"]) == ("R", True)
