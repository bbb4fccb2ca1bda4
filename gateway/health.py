"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from gateway.appkeys import REDIS, STORE
from gateway.auth import public
from ledger.errors import StoreUnavailable

routes = web.RouteTableDef()
_encoder = msgspec.json.Encoder()


class Readiness(msgspec.Struct):
    status: str  # ok, degraded (serving, but a view is stuck) or unavailable
    postgres: str
    redis: str
    writer: str
    projections: str = "ok"  # or which projections cannot apply their next batch, and why


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
    projections = await _stuck_projections(store.pool) if postgres == "ok" else "unknown"
    # A stuck view does not stop admission or charging: the gateway stays in
    # rotation (200), and says "degraded" so a monitor can page someone.
    status = "unavailable" if not ok else "ok" if projections == "ok" else "degraded"
    body = Readiness(status, postgres, redis_state, writer, projections)
    return web.Response(
        status=200 if ok else 503, body=_encoder.encode(body), content_type="application/json"
    )


async def _stuck_projections(pool: Any) -> str:
    try:
        async with asyncio.timeout(2):
            rows = await pool.fetch(
                "select name, failing_since, last_error from projection_checkpoints "
                "where failing_since is not null order by name"
            )
    except Exception as e:  # any failure to answer is reported, never a 500
        return f"unknown ({type(e).__name__})"
    if not rows:
        return "ok"
    return "; ".join(f"{r[0]} failing since {r[1]:%Y-%m-%dT%H:%M:%SZ}: {(r[2] or '')[:200]}" for r in rows)
