"""Liveness and readiness."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from gateway.auth import public
from gateway.keys import REDIS, STORE
from ledger.errors import StoreUnavailable

routes = web.RouteTableDef()
_encoder = msgspec.json.Encoder()


class Readiness(msgspec.Struct):
    status: str
    postgres: str
    redis: str
    writer: str


@routes.get("/health/live")
@public
async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/health/ready")
@public
async def ready(request: web.Request) -> web.Response:
    """Ready only when PostgreSQL, Redis and the event writer all answer."""
    store = request.app[STORE]
    try:
        await store.ping()
        postgres = "ok"
    except StoreUnavailable as e:
        postgres = str(e)
    try:
        async with asyncio.timeout(2):
            await request.app[REDIS].ping()
        redis_state = "ok"
    except Exception as e:  # any failure to answer is "not ready", never a 500
        redis_state = f"{type(e).__name__}: {e}"
    writer = "ok" if store.writer_alive else "stopped"
    ok = postgres == redis_state == writer == "ok"
    body = Readiness("ok" if ok else "unavailable", postgres, redis_state, writer)
    return web.Response(
        status=200 if ok else 503, body=_encoder.encode(body), content_type="application/json"
    )
