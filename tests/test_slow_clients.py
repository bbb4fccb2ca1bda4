"""Issue 11 item 10: a connection trickling its headers, an idle one (never a request,
or idle between keep-alive requests) and one sending its body slowly are closed
within the configured timeouts. Raw sockets, short timeouts set for the test."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import msgspec
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.app import server_options
from gateway.appkeys import KEY_BOOK
from gateway.mock_upstream import create_mock_app
from ledger.apikeys import KeyFields
from ledger.settings import ProviderConfig, Settings
from tests.conftest import gateway_app

HEADER_TIMEOUT_S = 0.6
BODY_TIMEOUT_S = 0.6
# How long past a timeout the close may come: aiohttp's timer is exact, the rest is
# scheduling on a busy 2-core machine.
SLACK_S = 1.5


@dataclass
class Server:
    host: str
    port: int
    key: str
    app: web.Application


@pytest.fixture
async def server(settings: Settings, aiohttp_server: AiohttpServer) -> Server:
    mock = await aiohttp_server(create_mock_app())
    provider = ProviderConfig("mock", str(mock.make_url("/v1")).rstrip("/"), price_provider="openai")
    short = msgspec.structs.replace(
        settings,
        providers=(provider,),
        client_header_timeout_s=HEADER_TIMEOUT_S,
        client_body_timeout_s=BODY_TIMEOUT_S,
    )
    app = gateway_app(short)
    test_server = await aiohttp_server(app, **server_options(short))
    key, _ = await app[KEY_BOOK].generate(key_alias="slow", tags=["slow"], settings=KeyFields())
    return Server(test_server.host, test_server.port, key, app)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    started = time.monotonic()
    received = await asyncio.wait_for(reader.read(), seconds)  # read() returns at EOF
    return received, time.monotonic() - started


async def test_an_idle_connection_that_never_sends_a_request_is_closed(server: Server) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    received, after = await closed_within(reader, HEADER_TIMEOUT_S + SLACK_S)
    assert received == b""
    assert after >= HEADER_TIMEOUT_S * 0.9
    writer.close()


async def test_trickled_headers_do_not_keep_a_connection_open(server: Server) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for i in range(1000):  # a header line every 50 ms, the head never complete
            await asyncio.sleep(0.05)
            writer.write(f"X-Slow-{i}: y\r\n".encode())

    dripping = asyncio.create_task(trickle())
    try:
        received, after = await closed_within(reader, HEADER_TIMEOUT_S + SLACK_S)
    finally:
        dripping.cancel()
    assert b"200" not in received
    assert after >= HEADER_TIMEOUT_S * 0.9
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(server: Server) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" not in head  # kept alive, then idle
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
    )
    await reader.readexactly(length)
    received, after = await closed_within(reader, HEADER_TIMEOUT_S + SLACK_S)
    assert received == b""
    assert after >= HEADER_TIMEOUT_S * 0.9
    writer.close()


async def test_a_slow_body_is_answered_408_and_closed(server: Server) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )

    async def trickle() -> None:
        for b in body[5:-1]:  # one byte every 50 ms, never the last one
            await asyncio.sleep(0.05)
            writer.write(bytes([b]))

    dripping = asyncio.create_task(trickle())
    try:
        received, after = await closed_within(reader, BODY_TIMEOUT_S + SLACK_S)
    finally:
        dripping.cancel()
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    error = json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout"
    assert after >= BODY_TIMEOUT_S * 0.9
    writer.close()


async def test_a_request_slower_than_the_timeouts_upstream_is_not_cut(server: Server) -> None:
    """The header timer is not a request timeout: a request whose upstream takes longer
    than both timeouts is answered, and its connection stays usable."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "mock": {"delay_ms": (HEADER_TIMEOUT_S + BODY_TIMEOUT_S) * 1500},
        }
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {server.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    for _ in range(2):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
        )
        await reader.readexactly(length)
    writer.close()
