"""The event store: an append-only PostgreSQL log behind a group-commit writer.

* ``append`` queues a caller's events for the per-process writer, which takes
  whatever is queued, writes it as one multi-row insert in one transaction, and
  resolves every caller's future with its positions, or with the error that
  concerns that caller alone (a version conflict fails only its own append).
* ``read_all`` tails the log by position without ever skipping a late commit:
  appends are serialized by a transaction-level advisory lock (see
  ``sql/0001_events.sql``), so commit order is position order.
* Every committed batch sends a NOTIFY on :data:`CHANNEL` so tailing readers wake
  at once; they poll as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from ledger.errors import (
    AppendOutcomeUnknown,
    ConcurrencyError,
    InvalidEvent,
    StoreError,
    StoreOverloaded,
    StoreUnavailable,
)
from ledger.events import NewEvent, RecordedEvent
from ledger.loops import cancelling
from ledger.settings import Settings

log = structlog.get_logger(__name__)

CHANNEL = "ledger_events"

# Errors that mean "PostgreSQL is not there right now", as opposed to a bug.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
    # A connection broken mid-operation can surface as a client state error.
    asyncpg.InternalClientError,
)


@dataclass(slots=True)
class _Append:
    stream: str
    expected_version: int | None
    events: Sequence[NewEvent]
    # Resolved by the writer only, with the real outcome; callers never cancel it.
    future: asyncio.Future[list[int]]
    # Set by a caller that gave up before the writer took the append: never written.
    abandoned: bool = False
    taken: bool = False


class Pending:
    """An append handed to the writer. ``wait()`` is what callers await; if they
    give up (cancelled, timed out), ``outcome()`` still tells what happened: the
    writer never commits an append after its caller gave up on it unless it had
    already taken it, and then the outcome is recorded here."""

    __slots__ = ("_item",)

    def __init__(self, item: _Append) -> None:
        self._item = item

    async def wait(self) -> list[int]:
        try:
            return await asyncio.shield(self._item.future)
        except asyncio.CancelledError:
            if not self._item.taken:
                self._item.abandoned = True  # the writer will skip it
            raise

    async def outcome(self) -> list[int]:
        """The append's real outcome: positions, or the error. Raises
        NotWritten if it was abandoned before being written."""
        if self._item.abandoned and not self._item.taken:
            raise NotWritten("append abandoned before it was written")
        return await self._item.future


class NotWritten(StoreUnavailable):
    """The append was never written (abandoned by its caller, or failed before its
    transaction began)."""


@dataclass(slots=True)
class WriterStats:
    """Counters of the group-commit writer, for metrics and tests."""

    commits: int = 0
    events: int = 0
    appends: int = 0
    conflicts: int = 0
    failures: int = 0
    largest_batch: int = 0
    last_error: str | None = field(default=None)


_APPEND_BATCH = (
    "select * from ledger_append_batch($1::text[], $2::int[], $3::int[], $4::text[], $5::text[], $6)"
)
_SELECT = "select position, stream, version, type, data::text, recorded_at from events"


def _row(r: asyncpg.Record) -> RecordedEvent:
    return RecordedEvent(r[0], r[1], r[2], r[3], r[4], r[5])


async def read_after(conn: asyncpg.Connection[Any], after: int, limit: int) -> list[RecordedEvent]:
    """Up to ``limit`` events of the live log after position ``after``, in position
    order, on ``conn`` (a tailing worker's or a replay's own connection)."""
    rows = await conn.fetch(f"{_SELECT} where position > $1 order by position limit $2", after, limit)
    return [_row(r) for r in rows]


class EventStore:
    """The event log. Create with :meth:`open`, close with :meth:`close`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch: int = 2000,
        max_wait_s: float = 0.002,
        queue_size: int = 20000,
        append_timeout_s: float = 5.0,
        acquire_timeout_s: float = 3.0,
    ) -> None:
        self.pool = pool
        self._max_batch = max_batch
        self._max_wait = max_wait_s
        self._append_timeout = append_timeout_s
        self._acquire_timeout = acquire_timeout_s
        self._queue: asyncio.Queue[_Append] = asyncio.Queue(maxsize=queue_size)
        self._writer: asyncio.Task[None] | None = None
        self.stats = WriterStats()
        self.dsn: str | None = None  # for components that need connections of their own

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, settings: Settings) -> Self:
        if settings.database_url is None:
            raise StoreError("no database URL configured (LEDGER_DATABASE_URL)")
        pool = await create_pool(settings)
        store = cls(
            pool,
            max_batch=settings.writer_max_batch,
            max_wait_s=settings.writer_max_wait_ms / 1000,
            queue_size=settings.writer_queue_size,
            append_timeout_s=settings.append_timeout_s,
            acquire_timeout_s=settings.connect_timeout_s,
        )
        store.dsn = settings.database_url
        store.start()
        return store

    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(), name="event-writer")

    async def close(self) -> None:
        """Drain the queue (bounded by the append timeout), stop the writer, close the pool."""
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self._append_timeout)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            _fail(item, StoreUnavailable("event store is closed"))
        # pool.close() waits for every connection to come back; a shutdown must
        # not hang on one that never does.
        try:
            await asyncio.wait_for(self.pool.close(), 10)
        except TimeoutError:
            log.warning("pool_close_timed_out")
            self.pool.terminate()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def writer_alive(self) -> bool:
        return self._writer is not None and not self._writer.done()

    async def ping(self) -> None:
        """Raise StoreUnavailable unless PostgreSQL answers within the connect timeout."""
        async with unavailable_as_store_error("PostgreSQL does not answer"):
            async with asyncio.timeout(self._acquire_timeout):
                async with self.pool.acquire() as conn:
                    await conn.fetchval("select 1")

    # ------------------------------------------------------------ appending

    async def append(
        self, stream: str, expected_version: int | None, events: Sequence[NewEvent]
    ) -> list[int]:
        """Append ``events`` to ``stream`` through the group-commit writer.

        ``expected_version`` is the stream's version the caller last saw (0 for a
        new stream); None appends without a check. Returns the events' positions.
        Raises ConcurrencyError if the stream moved, StoreUnavailable if the
        append could not be made durable within the append timeout (the outcome
        is then unknown; retrying with the same expected version is safe).
        """
        pending = await self.submit(stream, expected_version, events)
        return await pending.wait()

    async def submit(self, stream: str, expected_version: int | None, events: Sequence[NewEvent]) -> Pending:
        """Queue an append for the writer and return its handle (see Pending)."""
        if not events:
            raise ValueError("append needs at least one event")
        _check_storable(stream, events)
        if self._writer is None:
            raise StoreUnavailable("event store is closed")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        item = _Append(stream, expected_version, events, future)
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            try:
                await asyncio.wait_for(self._queue.put(item), self._append_timeout)
            except TimeoutError:
                raise StoreOverloaded(
                    f"event writer queue full ({self._queue.maxsize}) for "
                    f"{self._append_timeout:g}s; PostgreSQL is too slow or down"
                ) from None
        # Bounded without a timer per caller: the writer bounds every batch by
        # the append timeout and, when PostgreSQL is unavailable, fails the
        # whole queue at once.
        return Pending(item)

    async def append_now(
        self, stream: str, expected_version: int | None, events: Sequence[NewEvent]
    ) -> list[int]:
        """Append in a transaction of its own, bypassing the group-commit writer."""
        loop = asyncio.get_running_loop()
        item = _Append(stream, expected_version, events, loop.create_future())
        await self._commit([item])
        return await item.future

    async def append_batch(
        self, appends: Sequence[tuple[str, int | None, Sequence[NewEvent]]]
    ) -> list[list[int] | BaseException]:
        """Append many streams' events in one transaction (bulk loading, replays)."""
        loop = asyncio.get_running_loop()
        items = [_Append(s, v, e, loop.create_future()) for s, v, e in appends]
        await self._commit(items)
        results: list[list[int] | BaseException] = []
        for item in items:
            error = item.future.exception()
            results.append(error if error is not None else item.future.result())
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            self._take_queued(batch)
            # Linger while producers that are ready to run keep adding to the
            # batch (bounded by max_wait); stop as soon as a pass brings nothing,
            # so a lone caller never waits for company that is not coming.
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_batch and loop.time() < deadline:
                await asyncio.sleep(0)
                if not self._take_queued(batch):
                    break
            # Callers that gave up before now are never written; the rest are
            # taken: from here on their outcome is decided by this commit.
            skipped = [item for item in batch if item.abandoned]
            batch = [item for item in batch if not item.abandoned]
            for item in skipped:
                _fail(item, NotWritten("append abandoned by its caller"))
                self._queue.task_done()
            for item in batch:
                item.taken = True
            if not batch:
                continue
            try:
                async with asyncio.timeout(self._append_timeout):
                    await self._commit(batch)
            except TimeoutError:
                self._fail_batch(
                    batch,
                    AppendOutcomeUnknown(
                        f"append not confirmed within {self._append_timeout:g}s "
                        "(outcome unknown; retrying with the same expected version is safe)"
                    ),
                )
            except Exception as e:  # the writer must outlive any one batch
                log.exception("event_writer_batch_failed")
                self._fail_batch(batch, StoreError(f"event writer failed: {e!r}"))
            finally:
                for _ in batch:
                    self._queue.task_done()
            if any(_unavailable(item) for item in batch):
                # Fail fast: whatever queued behind a failed batch would only
                # wait for the same outage.
                queued: list[_Append] = []
                while not self._queue.empty():
                    queued.append(self._queue.get_nowait())
                self._fail_batch(queued, NotWritten("PostgreSQL unavailable; append not made"))
                for _ in queued:
                    self._queue.task_done()

    def _fail_batch(self, batch: list[_Append], error: StoreError) -> None:
        self.stats.failures += 1
        self.stats.last_error = str(error)
        for item in batch:
            _fail(item, error)

    def _take_queued(self, batch: list[_Append]) -> int:
        taken = 0
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
            taken += 1
        return taken

    async def _commit(self, batch: list[_Append]) -> None:
        try:
            await self._write(batch)
        except asyncpg.DataError as e:
            # One caller's bad value must not fail the others: retry one by one.
            if len(batch) == 1:
                _fail(batch[0], InvalidEvent(f"event cannot be stored: {_describe(e)}"))
                return
            for item in batch:
                await self._commit([item])
        except asyncpg.UniqueViolationError:
            # Only reachable if a row got in without the append lock; fall back
            # to one transaction per caller so one conflict fails one caller.
            if len(batch) == 1:
                _fail(batch[0], ConcurrencyError(batch[0].stream, batch[0].expected_version or 0, -1))
                return
            for item in batch:
                await self._commit([item])
        except _NotStarted as e:
            self.stats.failures += 1
            self.stats.last_error = _describe(e.cause)
            not_written = NotWritten(f"PostgreSQL unavailable: {_describe(e.cause)}")
            for item in batch:
                _fail(item, not_written)
        except _UNAVAILABLE as e:
            # Lost during the transaction: the commit may have happened.
            self.stats.failures += 1
            self.stats.last_error = _describe(e)
            unknown = AppendOutcomeUnknown(f"PostgreSQL unavailable during the commit: {_describe(e)}")
            for item in batch:
                _fail(item, unknown)
        except asyncpg.PostgresError as e:
            self.stats.failures += 1
            self.stats.last_error = _describe(e)
            failure = StoreError(f"append failed: {_describe(e)}")
            for item in batch:
                _fail(item, failure)

    async def _write(self, batch: list[_Append]) -> None:
        try:
            conn = await self.pool.acquire(timeout=self._acquire_timeout)
        except _UNAVAILABLE as e:
            raise _NotStarted(e) from e
        try:
            await self._write_on(conn, batch)
        except BaseException:
            await self.pool.release(conn)  # asyncpg's full reset
            raise
        # The batch was one statement in its own transaction (the append lock is
        # transaction-level): no session state to reset, so no reset round trip.
        token = _NO_RESET.set(True)
        try:
            await self.pool.release(conn)
        finally:
            _NO_RESET.reset(token)

    async def _write_on(self, conn: PoolConnectionProxy[asyncpg.Record], batch: list[_Append]) -> None:
        # One call, one implicit transaction, one round trip: the function takes
        # the append lock, checks versions, inserts and NOTIFYs (sql/0021).
        types: list[str] = []
        data: list[str] = []
        for item in batch:
            for event in item.events:
                types.append(event.type)
                data.append(event.data.decode())
        rows = await conn.fetch(
            _APPEND_BATCH,
            [item.stream for item in batch],
            [item.expected_version for item in batch],
            [len(item.events) for item in batch],
            types,
            data,
            CHANNEL,
        )
        positions: dict[tuple[str, int], int] = {}
        lowest: dict[str, int] = {}  # the first version written per stream
        refused: dict[int, int] = {}  # batch index -> the stream's current version
        for r in rows:
            if r[3] is None:
                positions[(r[0], r[1])] = r[2]
                if r[1] < lowest.get(r[0], r[1] + 1):
                    lowest[r[0]] = r[1]
            else:
                refused[r[3] - 1] = r[1]
        accepted: list[tuple[_Append, int]] = []  # (append, its first version)
        rejected: list[tuple[_Append, int]] = []
        next_version: dict[str, int] = {}
        for index, item in enumerate(batch):
            if index in refused:
                rejected.append((item, refused[index]))
                continue
            # versions were given in batch order, so each accepted append's first
            # version follows the previous accepted append on its stream
            first = next_version.get(item.stream, lowest.get(item.stream, 1))
            accepted.append((item, first))
            next_version[item.stream] = first + len(item.events)
        # Committed: resolve futures only now, so nobody sees an unconfirmed write.
        self.stats.commits += 1
        self.stats.events += len(positions)
        self.stats.appends += len(accepted)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for item, first in accepted:
            result = [positions[(item.stream, first + i)] for i in range(len(item.events))]
            if not item.future.done():
                item.future.set_result(result)
        for item, actual in rejected:
            self.stats.conflicts += 1
            _fail(item, ConcurrencyError(item.stream, item.expected_version or 0, actual))

    # ------------------------------------------------------------ reading

    async def _select(self, where: str, *args: Any) -> list[RecordedEvent]:
        async with unavailable_as_store_error():
            rows = await self.pool.fetch(f"{_SELECT} where {where}", *args)
        return [_row(r) for r in rows]

    async def read_stream(self, stream: str, after_version: int = 0) -> list[RecordedEvent]:
        """All events of ``stream`` with version > ``after_version``, in version order."""
        return await self._select("stream = $1 and version > $2 order by version", stream, after_version)

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` committed events with position > ``after``, in position order.

        Never skips an event that commits late and never returns one twice: the
        append lock makes commit order equal position order.
        """
        return await self._select("position > $1 order by position limit $2", after, limit)

    async def read_types(
        self, types: Sequence[str], after: int = 0, limit: int = 1000
    ) -> list[RecordedEvent]:
        """Like read_all, restricted to events of the given types."""
        return await self._select(
            "type = any($1::text[]) and position > $2 order by position limit $3", list(types), after, limit
        )

    async def head(self) -> int:
        """The position of the last committed event (0 for an empty log)."""
        async with unavailable_as_store_error():
            value = await self.pool.fetchval("select coalesce(max(position), 0) from events")
        return int(value)

    async def follow(
        self, after: int = 0, *, batch: int = 1000, poll_interval_s: float = 1.0
    ) -> AsyncIterator[list[RecordedEvent]]:
        """Yield batches of new events forever: woken by NOTIFY, polling as a fallback."""
        async with Notifications(self.pool, CHANNEL) as wake:
            while True:
                events = await self.read_all(after, batch)
                if events:
                    after = events[-1].position
                    yield events
                    continue
                await wake.wait(poll_interval_s)


# A JSON-escaped NUL: \u0000 preceded by an even number of backslashes.
NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _check_storable(stream: str, events: Sequence[NewEvent]) -> None:
    """PostgreSQL text and jsonb cannot hold NUL characters: refuse them up front."""
    if "\x00" in stream:
        raise InvalidEvent("stream names cannot contain NUL characters")
    for event in events:
        # the substring test first (memchr speed): the regex only where an escape is
        if "\x00" in event.type or (b"\\u0000" in event.data and NUL_ESCAPE.search(event.data)):
            raise InvalidEvent(f"{event.type} event contains a NUL character, which cannot be stored")


class _NotStarted(Exception):
    """No connection: the transaction never began."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _unavailable(item: _Append) -> bool:
    f = item.future
    return f.done() and not f.cancelled() and isinstance(f.exception(), StoreUnavailable)


def _fail(item: _Append, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def is_unavailable(e: BaseException) -> bool:
    """Whether a driver error means "PostgreSQL is not there right now"."""
    return isinstance(e, _UNAVAILABLE)


@contextlib.asynccontextmanager
async def unavailable_as_store_error(what: str = "PostgreSQL unavailable") -> AsyncIterator[None]:
    """Driver errors that mean "PostgreSQL is not there" become StoreUnavailable
    (the domain's error; the HTTP layer answers it with a 503), ``what`` first."""
    try:
        yield
    except _UNAVAILABLE as e:
        raise StoreUnavailable(f"{what}: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def payload_types(payload: str) -> set[str]:
    """The event types named in a NOTIFY payload of :data:`CHANNEL`."""
    _, _, types = payload.partition(" ")
    return set(types.split(",")) if types else set()


class Notifications:
    """A LISTEN on its own connection that sets an event on every NOTIFY
    (or on those whose payload ``wanted`` accepts).

    If the connection drops, waiters fall back to their poll interval and the
    listener reconnects in the background.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        channel: str,
        wanted: Callable[[str], bool] | None = None,
    ) -> None:
        self._pool = pool
        self._wanted = wanted
        self._channel = channel
        self._event = asyncio.Event()
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._keep_listening(), name=f"listen-{self._channel}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a cancellation the driver turned into a connection error
            # must not keep its owner (a projection worker) here forever.
            await asyncio.wait({self._task}, timeout=5)
        await self._release()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if self._wanted is None or self._wanted(str(payload)):
            self._event.set()

    def _on_terminated(self, *_: Any) -> None:
        self._lost.set()
        self._event.set()  # readers poll once more rather than wait out their interval

    async def wait(self, timeout: float) -> bool:
        """Wait for a notification; False when ``timeout`` passed without one."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True

    async def _keep_listening(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await self._pool.acquire()
                self._conn = conn
                self._lost.clear()
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(self._channel, self._on_notify)
                # Anything committed while we were not listening: wake readers once.
                self._event.set()
                delay = 0.1
                await self._lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if cancelling():  # asyncpg may surface a cancel as a connection error
                    raise asyncio.CancelledError from e
                log.warning("listen_failed", channel=self._channel, error=_describe(e))
            await self._release()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Bounded: a connection that stopped answering must not hang a shutdown.
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await asyncio.wait_for(conn.remove_listener(self._channel, self._on_notify), 5)
        try:
            await asyncio.wait_for(self._pool.release(conn), 5)
        except Exception:
            with contextlib.suppress(Exception):
                conn.terminate()


# Set around a release whose connection holds no session state (see EventStore._write);
# a context variable, since asyncpg runs the reset in a task of its own (a copy).
_NO_RESET: contextvars.ContextVar[bool] = contextvars.ContextVar("ledger_no_reset", default=False)


async def _reset(conn: asyncpg.Connection[Any]) -> None:
    """asyncpg's reset (after its own rollback of an open transaction): the session
    reset query, skipped only where ``_NO_RESET`` says there is nothing to reset."""
    if _NO_RESET.get():
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


async def create_pool(settings: Settings, url: str | None = None) -> asyncpg.Pool:
    """An asyncpg pool with bounded connect and statement times (on ``url``, by
    default the primary's)."""
    url = url or settings.database_url
    assert url is not None
    try:
        pool = await asyncpg.create_pool(
            url,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            timeout=settings.connect_timeout_s,
            command_timeout=settings.statement_timeout_s,
            reset=_reset,
            server_settings={
                "application_name": "budget-ledger",
                # LEDGER_COMMIT_MODE=fast: commits return before the WAL fsync
                "synchronous_commit": "off" if settings.commit_mode == "fast" else "on",
            },
        )
    except _UNAVAILABLE as e:
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {_describe(e)}") from e
    assert pool is not None
    return pool


async def replica_lag(primary: asyncpg.Pool, replica: asyncpg.Pool) -> tuple[int, float]:
    """How far a streaming replica is behind: (WAL bytes not yet replayed, seconds
    since the last replayed commit, 0 when nothing is left to replay)."""
    async with unavailable_as_store_error():
        row = await replica.fetchrow(
            "select pg_last_wal_replay_lsn()::text, "
            "coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp()), 0)::float8"
        )
        assert row is not None
        if row[0] is None:  # not a replica: it is the primary itself
            return 0, 0.0
        behind = await primary.fetchval(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", row[0]
        )
    behind = max(0, int(behind))
    return behind, float(row[1]) if behind > 0 else 0.0
