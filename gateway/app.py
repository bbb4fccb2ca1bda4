"""The aiohttp application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as redis
from aiohttp import web

from gateway import health
from gateway.keys import REDIS, SETTINGS, STORE
from gateway.middlewares import errors, request_context
from ledger.errors import StoreError
from ledger.settings import Settings
from ledger.store import EventStore

MAX_BODY_BYTES = 8 * 1024 * 1024


def create_app(settings: Settings) -> web.Application:
    if settings.database_url is None or settings.redis_url is None:
        raise StoreError("the gateway needs LEDGER_DATABASE_URL and LEDGER_REDIS_URL")
    app = web.Application(middlewares=[request_context, errors], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    # Opened in this order, closed in reverse: the store drains its writer
    # before the pool closes; Redis closes after nothing can use it.
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.add_routes(health.routes)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await EventStore.open(app[SETTINGS])
    app[STORE] = store
    yield
    await store.close()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.redis_url is not None
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.connect_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=30,
    )
    app[REDIS] = client
    yield
    await client.aclose()
