"""Event store throughput: group commit vs one commit per event, and read_all scans.

Runs against a durable embedded PostgreSQL (fsync on: commits cost what they cost
in production), or LEDGER_BENCH_DATABASE_URL. Every figure is the median of
``repeats`` runs; the headline is the ratio to one-commit-per-event in the same run.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import msgspec

from ledger.events import NewEvent
from ledger.postgres.migrations import migrate
from ledger.postgres.store import EventStore
from ledger.run.embedded import EmbeddedPostgres
from ledger.settings import Settings

PAYLOAD = msgspec.json.encode(
    {
        "request_id": "0" * 32,
        "cost": "0.000123450",
        "model": "gpt-4o-mini",
        "tags": ["team:search", "app:bot"],
        "prompt_tokens": 812,
        "completion_tokens": 121,
    }
)


async def _reset(url: str) -> str:
    """A fresh, migrated database of the benchmark's own (events refuse TRUNCATE)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("drop database if exists ledger_bench with (force)")
        await conn.execute("create database ledger_bench")
    finally:
        await conn.close()
    bench_url = url.rsplit("/", 1)[0] + "/ledger_bench"
    await migrate(bench_url)
    return bench_url


async def _throughput(
    store: EventStore,
    concurrency: int,
    total: int,
    append: Callable[[str, int | None, list[NewEvent]], Awaitable[list[int]]],
) -> float:
    per_task = total // concurrency
    run_id = time.perf_counter_ns()
    event = [NewEvent("SpendRecorded", PAYLOAD)]

    async def worker(w: int) -> None:
        for i in range(per_task):
            await append(f"request:{run_id}-{w}-{i}", 0, event)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return per_task * concurrency / (time.perf_counter() - started)


async def _scan(store: EventStore) -> tuple[int, float]:
    started = time.perf_counter()
    after, n = 0, 0
    while batch := await store.read_all(after, 5000):
        n += len(batch)
        after = batch[-1].position
    return n, n / (time.perf_counter() - started)


async def run(url: str, repeats: int = 3) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    for concurrency, group_total, single_total in (
        (1, 3000, 1500),
        (16, 20000, 3000),
        (256, 60000, 3000),
        (1024, 100000, 3000),
    ):
        group, single = [], []
        for _ in range(repeats):
            bench_url = await _reset(url)
            store = await EventStore.open(Settings.from_dsn(bench_url, pool_max_size=20))
            try:
                group.append(await _throughput(store, concurrency, group_total, store.append))
                single.append(await _throughput(store, concurrency, single_total, store.append_now))
            finally:
                await store.close()
        g, s = statistics.median(group), statistics.median(single)
        rows.append((f"append, group commit, concurrency {concurrency} (events/s)", g))
        rows.append((f"append, one commit per event, concurrency {concurrency} (events/s)", s))
        rows.append((f"ratio group/single at concurrency {concurrency}", g / s))
    scans = []
    store = await EventStore.open(Settings.from_dsn(bench_url))
    try:
        for _ in range(repeats):
            n, rate = await _scan(store)
            scans.append(rate)
    finally:
        await store.close()
    rows.append((f"read_all scan of {n} events (events/s)", statistics.median(scans)))
    return rows


def main() -> list[tuple[str, float]]:
    url = os.environ.get("LEDGER_BENCH_DATABASE_URL")
    if url:
        return asyncio.run(run(url))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        return asyncio.run(run(pg.url))


if __name__ == "__main__":
    for name, value in main():
        print(f"{name:70s} {value:12,.1f}")
