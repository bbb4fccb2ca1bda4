"""The event store against a real PostgreSQL: ordering, concurrency, group commit."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import msgspec
import pytest

from ledger.errors import ConcurrencyError, InvalidEvent, StoreUnavailable
from ledger.events import NewEvent, RecordedEvent
from ledger.postgres.store import EventStore
from ledger.settings import Settings


def ev(i: int, kind: str = "Tested") -> NewEvent:
    return NewEvent(kind, msgspec.json.encode({"i": i}))


async def tail_until(store: EventStore, expected: int, timeout: float) -> list[RecordedEvent]:
    """Follow read_all from 0 like a projection until ``expected`` events arrived."""
    seen: list[RecordedEvent] = []
    after = 0
    deadline = time.monotonic() + timeout
    while len(seen) < expected:
        assert time.monotonic() < deadline, f"reader saw {len(seen)} of {expected} events"
        batch = await store.read_all(after, 700)
        if batch:
            seen.extend(batch)
            after = batch[-1].position
        else:
            await asyncio.sleep(0.002)
    # and nothing more turns up afterwards
    assert await store.read_all(after, 10) == []
    return seen


def assert_each_once_in_order(seen: list[RecordedEvent], streams: int, per_stream: int) -> None:
    positions = [e.position for e in seen]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    keys = [(e.stream, e.version) for e in seen]
    assert len(set(keys)) == len(keys) == streams * per_stream
    assert set(keys) == {(f"s-{a}", v) for a in range(streams) for v in range(1, per_stream + 1)}
    # within a stream, versions appear in order
    last: dict[str, int] = {}
    for e in seen:
        assert e.version == last.get(e.stream, 0) + 1
        last[e.stream] = e.version


async def test_append_and_read_stream(store: EventStore) -> None:
    positions = await store.append("tag:a", 0, [ev(1), ev(2)])
    assert len(positions) == 2
    assert positions[1] > positions[0]
    more = await store.append("tag:a", 2, [ev(3)])
    events = await store.read_stream("tag:a")
    assert [e.version for e in events] == [1, 2, 3]
    assert [msgspec.json.decode(e.data)["i"] for e in events] == [1, 2, 3]
    assert events[-1].position == more[0]
    assert [e.version for e in await store.read_stream("tag:a", after_version=2)] == [3]
    assert await store.read_stream("tag:none") == []
    assert await store.head() == more[0]


async def test_expected_version_none_appends_at_the_end(store: EventStore) -> None:
    await store.append("s", None, [ev(1)])
    await store.append("s", None, [ev(2), ev(3)])
    assert [e.version for e in await store.read_stream("s")] == [1, 2, 3]


async def test_concurrent_appenders_tailing_reader_sees_each_event_once(store: EventStore) -> None:
    appenders, per = 20, 500

    async def appender(a: int) -> None:
        version = 0
        while version < per:
            n = min(random.randint(1, 5), per - version)
            await store.append(f"s-{a}", version, [ev(version + k) for k in range(n)])
            version += n

    reader = asyncio.create_task(tail_until(store, appenders * per, timeout=120))
    await asyncio.gather(*(appender(a) for a in range(appenders)))
    seen = await reader
    assert_each_once_in_order(seen, appenders, per)
    assert store.stats.commits < store.stats.appends  # group commit really batched


async def test_late_commits_are_never_skipped(store: EventStore, database_url: str) -> None:
    """Writers that bypass the store and sleep inside their transaction (so they
    would commit out of position order) still cannot make a tailing reader skip:
    the append-lock trigger serializes them."""
    appenders, per, chunk = 20, 500, 25

    async def sleepy_appender(a: int) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            for start in range(0, per, chunk):
                async with conn.transaction():
                    await conn.execute(
                        """insert into events (stream, version, type, data)
                           select $1, v, 'Tested', '{}'::jsonb
                           from generate_series($2::int, $3::int) v""",
                        f"s-{a}",
                        start + 1,
                        start + chunk,
                    )
                    await asyncio.sleep(random.uniform(0, 0.004))
        finally:
            await conn.close()

    reader = asyncio.create_task(tail_until(store, appenders * per, timeout=180))
    await asyncio.gather(*(sleepy_appender(a) for a in range(appenders)))
    assert_each_once_in_order(await reader, appenders, per)


async def test_version_conflict_fails_only_the_loser(store: EventStore) -> None:
    await store.append("tag:x", 0, [ev(0)])
    commits_before = store.stats.commits
    results = await asyncio.gather(
        store.append("tag:x", 1, [ev(1)]),
        store.append("tag:x", 1, [ev(2)]),
        *(store.append(f"other-{i}", 0, [ev(i)]) for i in range(8)),
        return_exceptions=True,
    )
    assert store.stats.commits == commits_before + 1  # all in one batch
    winners = [r for r in results[:2] if isinstance(r, list)]
    losers = [r for r in results[:2] if isinstance(r, ConcurrencyError)]
    assert len(winners) == 1
    assert len(losers) == 1
    err = losers[0]
    assert (err.stream, err.expected_version, err.actual_version) == ("tag:x", 1, 2)
    assert "tag:x" in str(err)
    assert "version 2" in str(err)
    assert "expected version 1" in str(err)
    assert all(isinstance(r, list) for r in results[2:])
    for i in range(8):
        assert len(await store.read_stream(f"other-{i}")) == 1
    assert [e.version for e in await store.read_stream("tag:x")] == [1, 2]


async def test_conflict_on_new_stream_and_stale_expected_version(store: EventStore) -> None:
    await store.append("new", 0, [ev(1)])
    with pytest.raises(ConcurrencyError) as info:
        await store.append("new", 0, [ev(2)])
    assert info.value.actual_version == 1
    with pytest.raises(ConcurrencyError):
        await store.append("new", 5, [ev(2)])
    assert len(await store.read_stream("new")) == 1


async def test_same_stream_version_twice_never_duplicates(store: EventStore, database_url: str) -> None:
    await store.append("idem", 0, [ev(1)])
    with pytest.raises(ConcurrencyError):
        await store.append("idem", 0, [ev(1)])
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "insert into events (stream, version, type, data) values ('idem', 1, 'X', '{}')"
            )
        assert await conn.fetchval("select count(*) from events where stream = 'idem'") == 1
    finally:
        await conn.close()


async def test_group_commit_1000_concurrent_single_event_appends(store: EventStore) -> None:
    before = store.stats.commits
    positions = await asyncio.gather(*(store.append(f"g-{i}", 0, [ev(i)]) for i in range(1000)))
    flat = [p for ps in positions for p in ps]
    assert len(flat) == 1000
    assert len(set(flat)) == 1000
    commits = store.stats.commits - before
    assert commits < 100, f"{commits} commits for 1000 appends: not batched"
    seen = await store.read_all(0, 5000)
    assert len(seen) == 1000
    assert sorted(e.position for e in seen) == sorted(flat)
    for i, ps in enumerate(positions):
        assert [e.stream for e in seen if e.position == ps[0]] == [f"g-{i}"]


async def test_events_are_append_only(store: EventStore, database_url: str) -> None:
    await store.append("ro", 0, [ev(1)])
    conn = await asyncpg.connect(database_url)
    try:
        for sql in ("update events set type = 'Y'", "delete from events", "truncate events"):
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute(sql)
    finally:
        await conn.close()
    assert len(await store.read_stream("ro")) == 1


async def test_follow_wakes_on_notify(store: EventStore) -> None:
    """With a poll interval of 60 s, only NOTIFY can deliver the event in time."""
    got: asyncio.Queue[RecordedEvent] = asyncio.Queue()

    async def follower() -> None:
        async for batch in store.follow(0, poll_interval_s=60):
            for e in batch:
                got.put_nowait(e)

    task = asyncio.create_task(follower())
    try:
        await asyncio.sleep(0.3)  # let it listen and find nothing
        await store.append("n", 0, [ev(1)])
        first = await asyncio.wait_for(got.get(), 5)
        assert first.stream == "n"
        await store.append("n", 1, [ev(2)])
        second = await asyncio.wait_for(got.get(), 5)
        assert second.version == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_append_now_bypasses_the_writer(store: EventStore) -> None:
    before = store.stats.commits
    await store.append_now("direct", 0, [ev(1)])
    assert store.stats.commits == before + 1
    with pytest.raises(ConcurrencyError):
        await store.append_now("direct", 0, [ev(1)])


async def test_append_batch_reports_each_result(store: EventStore) -> None:
    await store.append("b-1", 0, [ev(0)])
    results = await store.append_batch([("b-1", 0, [ev(1)]), ("b-2", 0, [ev(2), ev(3)])])
    assert isinstance(results[0], ConcurrencyError)
    assert isinstance(results[1], list)
    assert len(results[1]) == 2


async def test_closed_store_refuses_appends(database_url: str) -> None:
    store = await EventStore.open(Settings.from_dsn(database_url))
    await store.append("c", 0, [ev(1)])
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.append("c", 1, [ev(2)])


async def test_empty_append_is_refused(store: EventStore) -> None:
    with pytest.raises(ValueError, match="at least one event"):
        await store.append("e", 0, [])


async def test_unstorable_event_fails_only_its_caller(store: EventStore) -> None:
    bad = NewEvent("Tested", msgspec.json.encode({"note": "nul\x00here"}))
    fine = NewEvent("Tested", msgspec.json.encode({"note": "a literal \\u0000 is fine"}))
    results = await asyncio.gather(
        store.append("nul-1", 0, [bad]), store.append("nul-2", 0, [fine]), return_exceptions=True
    )
    assert isinstance(results[0], InvalidEvent)
    assert "NUL" in str(results[0])
    assert isinstance(results[1], list)
    assert await store.read_stream("nul-1") == []
    with pytest.raises(InvalidEvent):
        await store.append("nul\x00stream", 0, [fine])


@pytest.mark.parametrize(("mode", "expected"), [("durable", "on"), ("fast", "off")])
async def test_commit_mode_decides_whether_an_append_waits_for_the_fsync(
    database_url: str, mode: str, expected: str
) -> None:
    """LEDGER_COMMIT_MODE=fast acknowledges appends before the WAL fsync on every
    connection of the store's pool; the default waits for it."""
    store = await EventStore.open(Settings.from_dsn(database_url, pool_max_size=3, commit_mode=mode))
    try:
        await store.append("commit-mode", 0, [ev(1)])
        assert [msgspec.json.decode(e.data) for e in await store.read_stream("commit-mode")] == [{"i": 1}]
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("show synchronous_commit") == expected
    finally:
        await store.close()


async def test_one_batch_mixes_refusals_multi_event_appends_and_a_stream_twice(store: EventStore) -> None:
    """The batch function (sql/0021): set-based when every stream appears once,
    in order when one appears twice; either way each append gets its own answer."""
    await store.append("b:old", 0, [ev(0)])
    once = await store.append_batch(
        [("b:new", 0, [ev(1), ev(2)]), ("b:old", 0, [ev(3)]), ("b:old2", None, [ev(4)]), ("b:x", 0, [ev(5)])]
    )
    assert isinstance(once[1], ConcurrencyError)  # b:old is at version 1
    firsts = [r for i, r in enumerate(once) if i != 1]
    assert all(isinstance(r, list) for r in firsts)
    assert [len(r) for r in firsts if isinstance(r, list)] == [2, 1, 1]
    assert [e.version for e in await store.read_stream("b:new")] == [1, 2]
    twice = await store.append_batch(
        [("b:t", 0, [ev(6)]), ("b:t", 1, [ev(7), ev(8)]), ("b:t", 1, [ev(9)]), ("b:u", None, [ev(10)])]
    )
    assert isinstance(twice[2], ConcurrencyError)  # the second append moved b:t to 3
    t_events = await store.read_stream("b:t")
    assert [(e.version, msgspec.json.decode(e.data)["i"]) for e in t_events] == [(1, 6), (2, 7), (3, 8)]
    positions = [p for r in twice if isinstance(r, list) for p in r]
    assert positions == sorted(positions)
    assert [e.position for e in t_events] == positions[:3]
