"""Scenario 6: a projection worker SIGKILLed mid-batch, again and again, on the
scenario's own PostgreSQL and Redis (the fuller version is in
tests/test_projections.py).

Catches: a worker that makes no progress between kills (each killed worker must
move the checkpoint), views that differ from a replay of the log, counters that
differ from the log (``ledger verify``), and a request left without an ending."""

from __future__ import annotations

import asyncio
import random
import signal
from decimal import Decimal

import asyncpg
import pytest

from ledger import events as ev
from ledger.admission import Admission
from ledger.budgets import BudgetBook
from ledger.counters import Counters, connect_redis
from ledger.postgres.store import EventStore
from ledger.settings import Settings
from ledger.tags import TagService
from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import Cluster
from tests.test_projections import active, start_worker, workload

pytestmark = pytest.mark.faults

# enough that the load outlives the first kills on a fast machine too
REQUESTS = 4000


async def test_projection_worker_killed_repeatedly(cluster: Cluster, report: list[Row]) -> None:
    url = cluster.pg.url
    store = await EventStore.open(Settings.from_dsn(url, pool_max_size=20))
    client = connect_redis(cluster.redis.url)
    counters = Counters(client, store.pool)
    try:
        book = BudgetBook(store)
        tags = TagService(store)
        await tags.create("team:a", ev.TagFields(max_budget=Decimal("1000"), budget_duration="1d"))
        await tags.create("tiny", ev.TagFields(max_budget=Decimal("0.001"), budget_duration="1d"))
        await tags.create("fixed", ev.TagFields(max_budget=Decimal("1000"), budget_duration="3h"))
        await book.refresh()
        admission = Admission(store, counters, book)
        load = asyncio.create_task(workload(admission, REQUESTS, concurrency=4))
        kills = 0
        progress: list[int] = []  # spend_rollups' checkpoint after each kill
        heads: list[int] = []  # the log's head at each kill
        conn = await asyncpg.connect(url)
        try:
            while not load.done() or kills < 4:
                worker = start_worker(url)
                await active(conn, worker.pid)  # a loaded machine can take seconds to start Python
                await asyncio.sleep(random.uniform(0.8, 1.5))
                worker.send_signal(signal.SIGKILL)
                await asyncio.to_thread(worker.wait, 10)
                kills += 1
                progress.append(
                    await conn.fetchval(
                        "select coalesce(max(position), 0) from projection_checkpoints"
                        " where name = 'spend_rollups'"
                    )
                )
                heads.append(await conn.fetchval("select coalesce(max(position), 0) from events"))
                assert kills < 60, "load did not finish"
        finally:
            await conn.close()
        await load
        # Every killed worker that had work waiting did real work before its kill:
        # behind the head at one kill means further on at the next. (The load may
        # end after a few kills; a worker with nothing left to apply need not move.)
        behind = [i for i in range(1, len(progress)) if progress[i - 1] < heads[i - 1]]
        assert behind, (progress, heads)  # at least one kill found work waiting
        stuck = [i for i in behind if progress[i] <= progress[i - 1]]
        assert not stuck, (progress, heads)
        final = start_worker(url)
        try:
            facts = await ledger_facts(url)
            _, checked = await verify(cluster)  # views = replay, counters = log
        finally:
            final.terminate()
            await asyncio.to_thread(final.wait, 10)
    finally:
        await counters.close()
        await client.aclose()
        await store.close()
    assert facts.lost == []
    assert facts.dups == []
    report.append(
        Row.measured(
            f"projection worker SIGKILLed x{kills}", REQUESTS, facts, f"views = replay, {checked} counters", 0
        )
    )
