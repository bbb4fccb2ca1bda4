"""Admit decision latency: `Counters.reserve` with 1 and 5 tags vs a Redis PING.

Both go through the same client and connection pool in the same run, so the
ratio isolates what the Lua script costs over a bare round trip. Sequential
calls (latency, not throughput); figures are medians over ``repeats`` runs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from ledger.counters import Budget, Counters, connect_redis
from ledger.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger.migrations import migrate
from ledger.money import to_nanos
from ledger.windows import parse_duration, window_at

N = 5000


async def _latencies(call: Callable[[int], Awaitable[object]], n: int = N) -> list[float]:
    for i in range(200):  # warm up: connections, script cache
        await call(-i - 1)
    out = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - started)
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1e6


async def run(database_url: str, redis_url: str, repeats: int = 5) -> list[tuple[str, float]]:
    await migrate(database_url)
    client = connect_redis(redis_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    counters = Counters(client, pool)
    now = datetime.now(UTC)
    window = window_at(parse_duration("1d"), now, now)
    budgets = [Budget(f"bench-{i}", "1d", window, to_nanos(Decimal(10**9))) for i in range(5)]
    deadline = now + timedelta(minutes=10)
    estimate = to_nanos(Decimal("0.001"))
    results: dict[str, list[tuple[float, float]]] = {
        "ping": [],
        "reserve, 1 tag": [],
        "reserve, 5 tags": [],
    }
    try:
        for r in range(repeats):
            ping = await _latencies(lambda i: client.ping())
            one = await _latencies(
                lambda i, r=r: counters.reserve(f"a{r}-{i}", budgets[:1], estimate, deadline)
            )
            five = await _latencies(lambda i, r=r: counters.reserve(f"b{r}-{i}", budgets, estimate, deadline))
            for name, values in (
                ("ping", ping),
                ("reserve, 1 tag", one),
                ("reserve, 5 tags", five),
            ):
                results[name].append((_pct(values, 0.5), _pct(values, 0.99)))
    finally:
        await pool.close()
        await client.aclose()
    rows: list[tuple[str, float]] = []
    ping_p50 = statistics.median(p50 for p50, _ in results["ping"])
    for name, runs in results.items():
        p50 = statistics.median(a for a, _ in runs)
        p99 = statistics.median(b for _, b in runs)
        rows.append((f"{name}: p50 (µs)", p50))
        rows.append((f"{name}: p99 (µs)", p99))
        if name != "ping":
            rows.append((f"{name}: p50 / PING p50", p50 / ping_p50))
    return rows


def main() -> list[tuple[str, float]]:
    db, rd = os.environ.get("LEDGER_BENCH_DATABASE_URL"), os.environ.get("LEDGER_BENCH_REDIS_URL")
    if db and rd:
        return asyncio.run(run(db, rd))
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedPostgres(Path(tmp) / "pg") as pg,
        EmbeddedRedis(Path(tmp) / "redis") as redis,
    ):
        return asyncio.run(run(db or pg.url, rd or redis.url))


if __name__ == "__main__":
    for name, value in main():
        print(f"{name:70s} {value:12,.1f}")
