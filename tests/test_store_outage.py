"""PostgreSQL stopped mid-run: bounded failures, recovery, nothing half-written.

Uses an embedded server of its own: this test stops and restarts it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest

from ledger.errors import StoreUnavailable
from ledger.events import NewEvent
from ledger.postgres.migrations import migrate
from ledger.postgres.store import EventStore
from ledger.run.embedded import EmbeddedPostgres
from ledger.settings import Settings
from tests.conftest import FAST_PG

pytestmark = pytest.mark.faults

APPEND_TIMEOUT = 2.0


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path / "pg", settings=FAST_PG).start()
    yield pg
    pg.stop()


def events(n: int) -> list[NewEvent]:
    return [NewEvent("Tested", msgspec.json.encode({"k": k})) for k in range(n)]


async def test_postgres_stopped_mid_run(own_postgres: EmbeddedPostgres) -> None:
    pg = own_postgres
    await migrate(pg.url)
    settings = Settings.from_dsn(
        pg.url, append_timeout_s=APPEND_TIMEOUT, connect_timeout_s=1.0, pool_min_size=1
    )
    store = await EventStore.open(settings)
    acknowledged: set[str] = set()
    failures: list[float] = []
    stop_load = asyncio.Event()

    async def load(worker: int) -> None:
        i = 0
        while not stop_load.is_set():
            stream = f"w{worker}-{i}"
            started = time.monotonic()
            try:
                await store.append(stream, 0, events(3))
                acknowledged.add(stream)
            except StoreUnavailable:
                failures.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            i += 1

    try:
        workers = [asyncio.create_task(load(w)) for w in range(8)]
        await asyncio.sleep(0.5)
        assert acknowledged, "no append succeeded before the outage"
        port = pg.port
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(APPEND_TIMEOUT + 1.5)
        assert failures, "appends kept succeeding with PostgreSQL down"
        # every failure came back within the bound (plus scheduling slack)
        assert max(failures) < APPEND_TIMEOUT + 1.0
        during = len(acknowledged)

        pg.preferred_port = port
        await asyncio.to_thread(pg.start)
        deadline = time.monotonic() + 15
        while len(acknowledged) == during:
            assert time.monotonic() < deadline, "appends did not recover after restart"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop_load.set()
        await asyncio.gather(*workers)
    finally:
        stop_load.set()
        await store.close()

    conn = await asyncpg.connect(pg.url)
    try:
        rows = await conn.fetch("select stream, count(*) n, max(version) v from events group by stream")
    finally:
        await conn.close()
    counts = {r["stream"]: (r["n"], r["v"]) for r in rows}
    # nothing half-written: each append is all three events or none
    assert all(c == (3, 3) for c in counts.values())
    # nothing acknowledged was lost
    assert acknowledged <= set(counts)
