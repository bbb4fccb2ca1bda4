"""The gateway's health endpoints and error envelope, over real HTTP."""

from __future__ import annotations

import socket

from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from ledger.settings import Settings
from tests.conftest import gateway_app


async def client_for(aiohttp_client: AiohttpClient, settings: Settings) -> TestClient:
    return await aiohttp_client(gateway_app(settings))


async def test_live_and_ready(aiohttp_client: AiohttpClient, settings: Settings) -> None:
    client = await client_for(aiohttp_client, settings)
    r = await client.get("/health/live")
    assert r.status == 200
    r = await client.get("/health/ready")
    assert r.status == 200
    assert await r.json() == {
        "status": "ok",
        "postgres": "ok",
        "redis": "ok",
        "writer": "ok",
        "projections": "ok",
    }


async def test_not_ready_without_redis(aiohttp_client: AiohttpClient, database_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    settings = Settings.from_dsn(database_url, f"redis://127.0.0.1:{dead_port}/0", connect_timeout_s=0.5)
    client = await client_for(aiohttp_client, settings)
    r = await client.get("/health/ready")
    assert r.status == 503
    body = await r.json()
    assert body["status"] == "unavailable"
    assert body["postgres"] == "ok"
    assert body["redis"] != "ok"


async def test_errors_use_the_openai_envelope(aiohttp_client: AiohttpClient, settings: Settings) -> None:
    client = await client_for(aiohttp_client, settings)
    r = await client.get("/no/such/route", headers={"x-request-id": "req-123"})
    assert r.status == 404
    assert r.headers["x-ledger-request-id"] == "req-123"
    body = await r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "/no/such/route" in body["error"]["message"]
    r = await client.post("/health/live")
    assert r.status == 405
    assert (await r.json())["error"]["type"] == "invalid_request_error"
