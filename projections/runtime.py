"""The projection runtime: named workers that turn the event log into views.

A worker owns one projection. It holds a session-level advisory lock on a
dedicated connection while it is the active worker (others stand by and take
over when the connection dies), and for every batch it, in ONE transaction:
locks its checkpoint row, reads the events after it, applies them to its
tables, and advances the checkpoint. A crash anywhere rolls the whole batch
back, so every event is applied exactly once. It wakes on NOTIFY and polls as a
fallback.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import asyncpg
import structlog
from aiohttp import web

from ledger.events import RecordedEvent
from ledger.loops import cancelling
from ledger.postgres.queries import projection_lag
from ledger.postgres.store import CHANNEL, EventStore, Notifications, read_after
from ledger.settings import WebhookConfig

log = structlog.get_logger(__name__)

_LOCK_CLASS = 4243  # advisory lock namespace of projection workers


class Projection(abc.ABC):
    """A view: the tables it owns, the event types it reads, how it applies them."""

    name: str
    tables: tuple[str, ...]
    types: frozenset[str]

    async def load(self, conn: asyncpg.Connection, position: int) -> None:  # noqa: B027
        """Rebuild any in-memory state as of ``position`` (before applying after it)."""

    @abc.abstractmethod
    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        """Apply events (already filtered to ``types``) inside the caller's transaction.

        ``tables`` maps each owned table name to the (possibly schema-qualified)
        name to write: the live table, or a replay's fresh one.
        """


def lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def live_tables(projection: Projection) -> dict[str, str]:
    return {t: t for t in projection.tables}


@dataclass(slots=True)
class WorkerStats:
    batches: int = 0
    events: int = 0
    active: bool = False


class Worker:
    def __init__(
        self,
        store: EventStore,
        projection: Projection,
        *,
        batch_size: int = 2000,
        poll_interval_s: float = 1.0,
        standby_retry_s: float = 1.0,
        coalesce_s: float = 0.05,
    ) -> None:
        self.store = store
        self.projection = projection
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.standby_retry_s = standby_retry_s
        self.coalesce_s = coalesce_s
        self.position = -1  # unknown until loaded
        self.stats = WorkerStats()
        # True until a batch succeeds: a failure another process recorded is cleared then
        self.failing = True

    async def run(self) -> None:
        """Forever: become the active worker, then follow the log."""
        while True:
            try:
                await self._run_active()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a worker must never die quietly: log, stand down, retry
                if cancelling():
                    raise asyncio.CancelledError from e
                log.exception("projection_worker_error", projection=self.projection.name, error=str(e))
                self.stats.active = False
                await self._record_failure(e)
                await asyncio.sleep(self.standby_retry_s)

    async def _run_active(self) -> None:
        name = self.projection.name
        # statement_cache_size=0: a replay swaps tables under us; cached plans
        # would point at the dropped ones.
        conn = await asyncpg.connect(
            self.store_dsn,
            statement_cache_size=0,
            server_settings={"application_name": f"ledger-projection-{os.getpid()}"},
        )
        try:
            # Standing by: the lock is PostgreSQL's, so there is nothing local to wait on.
            while not await conn.fetchval(  # noqa: ASYNC110
                "select pg_try_advisory_lock($1, $2)", _LOCK_CLASS, lock_key(name)
            ):
                await asyncio.sleep(self.standby_retry_s)
            self.stats.active = True
            log.info("projection_active", projection=name)
            await conn.execute(
                "insert into projection_checkpoints (name) values ($1) on conflict do nothing", name
            )
            async with Notifications(self.store.pool, CHANNEL) as wake:
                while True:
                    applied = await self.step(conn)
                    if applied < self.batch_size:
                        await wake.wait(self.poll_interval_s)
                        # let a burst of commits gather into one batch
                        await asyncio.sleep(self.coalesce_s)
        finally:
            self.stats.active = False
            try:  # a connection cancelled mid-statement may never answer a polite close
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()

    async def _record_failure(self, error: BaseException) -> None:
        """Say in the checkpoint row that this projection is stuck, and since when, so
        `projections status`, /health/ready and /metrics show it from any process."""
        self.failing = True
        try:
            await self.store.pool.execute(
                "update projection_checkpoints set last_error = $2, "
                "failing_since = coalesce(failing_since, now()) where name = $1",
                self.projection.name,
                f"{type(error).__name__}: {error}"[:1000],
            )
        except Exception as e:  # the database may be what failed: the log line above stands
            log.warning("projection_failure_not_recorded", projection=self.projection.name, error=str(e))

    async def _clear_failure(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "update projection_checkpoints set last_error = null, failing_since = null where name = $1",
            self.projection.name,
        )
        self.failing = False

    @property
    def store_dsn(self) -> str:
        dsn = self.store.dsn
        assert dsn is not None
        return dsn

    async def step(self, conn: asyncpg.Connection) -> int:
        """Apply one batch in one transaction; return how many events were read.

        All or nothing, in memory too: a batch that fails rolls the tables back,
        and the projection's in-memory state is reloaded from them before the
        next batch (it may have changed before the failure)."""
        try:
            return await self._step(conn)
        except BaseException:
            self.position = -1  # forces load() at the checkpoint on the next step
            self.failing = True  # a clearing that rolled back must be done again
            raise

    async def _step(self, conn: asyncpg.Connection) -> int:
        p = self.projection
        async with conn.transaction():
            # Views and checkpoint commit together, so losing this commit in a
            # crash only means the batch is applied again: no fsync needed, and
            # the gateway's own durable commits do not wait behind ours.
            await conn.execute("set local synchronous_commit = off")
            checkpoint = await conn.fetchval(
                "select position from projection_checkpoints where name = $1 for update", p.name
            )
            if checkpoint is None:
                await conn.execute(
                    "insert into projection_checkpoints (name) values ($1) on conflict do nothing",
                    p.name,
                )
                checkpoint = 0
            if checkpoint != self.position:
                # first batch, or a replay moved the checkpoint: reload state there
                await p.load(conn, checkpoint)
                self.position = checkpoint
            events = await read_after(conn, checkpoint, self.batch_size)
            if not events:
                if self.failing:
                    await self._clear_failure(conn)
                return 0
            relevant = [e for e in events if e.type in p.types]
            if relevant:
                await p.apply(conn, relevant, live_tables(p))
            last = events[-1].position
            await conn.execute(
                "update projection_checkpoints set position = $2, updated_at = now() where name = $1",
                p.name,
                last,
            )
            if self.failing:
                await self._clear_failure(conn)
        self.position = last
        self.stats.batches += 1
        self.stats.events += len(events)
        return len(events)


async def alert_workers(
    store: EventStore,
    poll_interval_s: float,
    webhooks: tuple[WebhookConfig, ...],
    webhook_secret: str | None,
) -> list[Worker]:
    """The alerting worker and one delivery worker per webhook."""
    from ledger.domain.privacy import stored_secret
    from projections.alerts import Alerts
    from projections.notify import Notifier

    workers = [Worker(store, Alerts(store), poll_interval_s=poll_interval_s)]
    if webhooks:
        secret = webhook_secret.encode() if webhook_secret else await stored_secret(store.pool, "webhook")
        workers += [
            Worker(store, Notifier(store, w, secret), poll_interval_s=poll_interval_s) for w in webhooks
        ]
    return workers


def workers_context(
    store_of: Callable[[web.Application], EventStore],
    poll_interval_s: float = 1.0,
    *,
    webhooks: tuple[WebhookConfig, ...] = (),
    webhook_secret: str | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs every projection's worker inside an aiohttp app.

    The composition root passes how to find the app's store, so neither the
    gateway nor this package needs to know the other.
    """
    from projections.spend import PROJECTIONS

    async def context(app: web.Application) -> AsyncIterator[None]:
        store = store_of(app)
        workers = [Worker(store, make(), poll_interval_s=poll_interval_s) for make in PROJECTIONS.values()]
        workers += await alert_workers(store, poll_interval_s, webhooks, webhook_secret)
        tasks = [asyncio.create_task(w.run(), name=f"projection-{w.projection.name}") for w in workers]
        yield
        for task in tasks:
            task.cancel()
        # bounded: shutdown must not hang on a worker stuck in the driver
        done, pending = await asyncio.wait(tasks, timeout=10)
        for task in done:
            # a worker cancelled mid-statement may surface the driver's error instead
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        if pending:
            log.warning("projection_workers_not_stopped", workers=len(pending))

    return context


lag = projection_lag  # re-exported for the CLI
