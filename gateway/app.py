"""The aiohttp application factory."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import activity, admin, customers, dashboard, health, keys_api, openapi, proxy, spend_api, ui
from gateway.appkeys import (
    ADMISSION,
    BUDGET_BOOK,
    COUNTERS,
    GATE,
    KEY_BOOK,
    METRICS,
    PRICES,
    READ_POOL,
    REDIS,
    SETTINGS,
    STORE,
    TAGS,
    UPSTREAMS,
    USER_SECRET,
)
from gateway.auth import authenticate
from gateway.errors import ApiError
from gateway.metrics import create_metrics
from gateway.middlewares import errors, request_context
from gateway.upstreams import Upstreams
from ledger.admission import Admission
from ledger.apikeys import KeyBook
from ledger.budgets import BudgetBook
from ledger.counters import Counters, connect_redis
from ledger.domain.pricing import PriceBook
from ledger.domain.privacy import stored_secret
from ledger.errors import StoreError
from ledger.gate import Gate
from ledger.loops import background, run_forever
from ledger.postgres.partitions import ensure_partitions
from ledger.postgres.queries import projection_lag
from ledger.postgres.store import EventStore, create_pool, replica_lag
from ledger.settings import Settings
from ledger.tags import TagService

log = structlog.get_logger("gateway")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def server_options(settings: Settings) -> dict[str, Any]:
    """What the HTTP server (an AppRunner) needs beyond the app: aiohttp closes a
    connection that has no complete request head when its keep-alive timer runs
    out, counted from the connection's opening and from each response's end, so
    that timer is the header timeout and the idle timeout at once."""
    return {
        "keepalive_timeout": settings.client_header_timeout_s,
        # how long a refused request's unread body is drained before closing
        "lingering_time": min(10.0, settings.client_body_timeout_s),
    }


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request body must arrive within client_body_timeout_s of its head: when
    it has not, the handler's next read fails with a 408 and the connection is
    closed (aiohttp itself has no body timeout)."""
    if not request.body_exists:
        return await handler(request)
    timeout = request.app[SETTINGS].client_body_timeout_s
    expired = False

    def expire() -> None:
        nonlocal expired
        if not request.content.is_eof():
            expired = True
            log.info("client_body_timeout", path=request.path, timeout_s=timeout)
            request.content.set_exception(
                ApiError(
                    408,
                    f"the request body did not arrive within {timeout:g} s",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
            )

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        response = await handler(request)
    finally:
        timer.cancel()
    if expired:
        response.force_close()
    return response


# How often each gateway checks that the coming months have their log partitions.
_PARTITIONS_INTERVAL_S = 3600.0


def create_app(settings: Settings, contexts: Sequence[CleanupContext] = ()) -> web.Application:
    if settings.database_url is None or settings.redis_url is None:
        raise StoreError("the gateway needs LEDGER_DATABASE_URL and LEDGER_REDIS_URL")
    app = web.Application(
        middlewares=[body_deadline, request_context, errors, authenticate],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    # Opened in this order, closed in reverse: the store drains its writer
    # before the pool closes; Redis closes after nothing can use it.
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_read_pool_ctx)
    app.cleanup_ctx.append(_budgets_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    app.cleanup_ctx.append(_partitions_ctx)
    app.cleanup_ctx.append(_upstreams_ctx)
    app.cleanup_ctx.append(customers.customers_ctx)
    app[PRICES] = PriceBook(settings.price_overrides)
    app.add_routes(health.routes)
    app.add_routes(admin.routes)
    app.add_routes(keys_api.routes)
    app.add_routes(customers.routes)
    app.add_routes(proxy.routes)
    app.add_routes(spend_api.routes)
    app.add_routes(activity.routes)
    app.add_routes(openapi.routes)
    app.add_routes(ui.routes)
    app.add_routes(dashboard.routes)
    app.cleanup_ctx.append(_lag_ctx)
    app.cleanup_ctx.append(_reconcile_ctx)
    # Background work the composition root adds (the projection workers).
    app.cleanup_ctx.extend(contexts)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await EventStore.open(app[SETTINGS])
    app[STORE] = store
    yield
    await store.close()


async def _read_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reads of reports and the dashboard go to the replica when one is set, so
    heavy reports never compete with the request path's commits."""
    settings = app[SETTINGS]
    if settings.database_read_url is None:
        app[READ_POOL] = app[STORE].pool
        yield
        return
    pool = await create_pool(settings, settings.database_read_url)
    app[READ_POOL] = pool
    yield
    await pool.close()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.redis_url is not None
    client = connect_redis(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout_s=settings.connect_timeout_s,
        cluster=settings.redis_cluster,
    )
    app[REDIS] = client
    yield
    await client.aclose()


async def _budgets_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, store = app[SETTINGS], app[STORE]
    book = BudgetBook(store, poll_interval_s=settings.poll_interval_s)
    await book.start()
    counters = Counters(app[REDIS], store.pool, max_connections=settings.redis_max_connections)
    app[BUDGET_BOOK] = book
    app[COUNTERS] = counters
    app[TAGS] = TagService(store)
    app[ADMISSION] = Admission(
        store,
        counters,
        book,
        reservation_ttl=timedelta(seconds=settings.reservation_ttl_s),
        on_redis_down="allow" if settings.on_redis_down == "allow" else "deny",
    )
    app[GATE] = Gate(settings, book, app[PRICES], app[ADMISSION])
    keys = KeyBook(store, poll_interval_s=settings.poll_interval_s, default_scope=settings.key_scope_default)
    await keys.start()
    app[KEY_BOOK] = keys
    app[METRICS] = create_metrics(lambda: float(store.queue_depth))
    if settings.user_hash_secret:
        app[USER_SECRET] = settings.user_hash_secret.encode()
    else:
        app[USER_SECRET] = await stored_secret(store.pool, "user_hash")
    yield
    await app[ADMISSION].drain()
    await counters.close()
    await keys.close()
    await book.close()


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Settle reservations whose gateway never did (crashed, cut off)."""
    admission = app[ADMISSION]

    async def sweep() -> None:
        report = await admission.sweep()
        if report.expired or report.settled or report.dropped:
            log.info("reservations_swept", **dataclasses.asdict(report))

    loop = run_forever(sweep, app[SETTINGS].sweep_interval_s, error_event="sweep_failed")
    async with background("reservation-sweeper", loop):
        yield


async def _partitions_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep the event log's month partitions created ahead (migrations create them
    too; a gateway that runs for months must not let appends fall into the
    default partition). Every gateway does it; the database makes it once."""
    pool = app[STORE].pool

    async def ensure() -> None:
        await ensure_partitions(pool)

    try:  # at once: the process may start months after the last migration
        await ensure()
    except Exception as e:
        log.warning("partitions_failed", error=f"{type(e).__name__}: {e}")
    async with background(
        "event-partitions", run_forever(ensure, _PARTITIONS_INTERVAL_S, error_event="partitions_failed")
    ):
        yield


async def _upstreams_ctx(app: web.Application) -> AsyncIterator[None]:
    upstreams = Upstreams(app[SETTINGS])
    await upstreams.open()
    app[UPSTREAMS] = upstreams
    yield
    await upstreams.close()


async def _lag_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep the projection-lag gauges fresh (whichever process runs the workers)."""
    metrics, pool = app[METRICS], app[STORE].pool

    async def refresh() -> None:
        for row in await projection_lag(pool):
            metrics.projection_lag_events.labels(row.name).set(row.events_behind)
            metrics.projection_lag_seconds.labels(row.name).set(row.seconds_behind)
            metrics.projection_failing.labels(row.name).set(1 if row.failing_since else 0)
        if app[READ_POOL] is not pool:
            behind, seconds = await replica_lag(pool, app[READ_POOL])
            metrics.replica_lag_bytes.set(behind)
            metrics.replica_lag_seconds.set(seconds)

    # metrics must never take the gateway down: failures are not even logged
    async with background("projection-lag", run_forever(refresh, 2.0, error_event=None)):
        yield


async def _reconcile_ctx(app: web.Application) -> AsyncIterator[None]:
    """Requests admitted while Redis was down (policy allow) get their reservation
    or their charge into the counters as soon as Redis answers again."""
    admission = app[ADMISSION]

    async def reconcile() -> None:
        if not admission.unreconciled:
            return
        await app[REDIS].ping()  # still down: raises, and the next second tries again
        waiting = await admission.reconcile()
        log.warning("counters_reconciled", waiting=waiting)

    loop = run_forever(reconcile, 1.0, error_event="reconcile_waiting", level="info")
    async with background("counter-reconcile", loop):
        yield
