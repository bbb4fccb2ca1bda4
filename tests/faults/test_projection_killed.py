"""Scenario 6: a projection worker SIGKILLed mid-batch, again and again (the full
version is in tests/test_projections.py); here for the suite's report."""

from __future__ import annotations

import asyncio
import random
import signal

import asyncpg
import pytest

from ledger.counters import Counters
from ledger.tags import TagService
from tests.faults.conftest import Row
from tests.test_projections import caught_up, ledger_parts, start_worker, verify_all, workload

pytestmark = pytest.mark.faults
__all__ = ["ledger_parts"]  # the fixture, imported for this module


async def test_projection_worker_killed_repeatedly(
    database_url: str, ledger_parts: tuple[object, TagService, Counters], report: list[Row]
) -> None:
    admission, _, _ = ledger_parts
    load = asyncio.create_task(workload(admission, 2000, concurrency=4))  # type: ignore[arg-type]
    kills = 0
    while not load.done() or kills < 4:
        worker = start_worker(database_url)
        await asyncio.sleep(random.uniform(0.8, 1.5))
        worker.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 10)
        kills += 1
    await load
    final = start_worker(database_url)
    try:
        await caught_up(database_url)
    finally:
        final.terminate()
        await asyncio.to_thread(final.wait, 10)
    result = await verify_all(database_url)
    assert result.ok, [f"{d.where}: {d.detail}" for d in result.drifts[:5]]
    conn = await asyncpg.connect(database_url)
    try:
        spends = int(await conn.fetchval("select count(*) from events where type = 'SpendRecorded'"))
    finally:
        await conn.close()
    report.append(Row(f"projection worker SIGKILLed x{kills}", 2000, spends, "views = replay", 0, 0, 0))
