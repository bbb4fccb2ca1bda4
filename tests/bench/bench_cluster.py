"""Budget counters on a Redis Cluster against one Redis, in the same run.

`Counters.reserve` with 1 tag and with 3 tags whose counters live on the three
masters of a real 3-master, 3-replica cluster on loopback
(tests/redis_cluster.py), and the same calls on one embedded Redis; plus a
key-routed round trip (GET) through each client as the baseline. Sequential
calls; p50 and p99 are medians over the runs. What the ratios show: a request
pays one round trip per subject on a cluster, one in all on a single Redis.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
from redis.cluster import RedisCluster as SyncCluster

from ledger.counters import Budget, Counters, RedisClient, connect_redis, keys
from ledger.domain.money import to_nanos
from ledger.domain.windows import parse_duration, window_at
from ledger.postgres.migrations import migrate
from ledger.run.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.bench.bench_counters import _latencies, _pct
from tests.redis_cluster import LocalRedisCluster

N = 2000


def _subjects_on_three_masters(seed_url: str) -> list[str]:
    client = SyncCluster.from_url(seed_url)
    try:
        found: dict[str, str] = {}
        i = 0
        while len(found) < 3:
            subject = f"tag:bench-{i}"
            found.setdefault(client.get_node_from_key(keys.counter(subject, 0, 0)).name, subject)
            i += 1
        return list(found.values())
    finally:
        client.close()


async def _measure(
    client: RedisClient, pool: asyncpg.Pool, subjects: list[str], label: str, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    counters = Counters(client, pool)
    now = datetime.now(UTC)
    window = window_at(parse_duration("1d"), now, now)
    budgets = [Budget(s, 1, window, to_nanos(Decimal(10**9))) for s in subjects]
    deadline = now + timedelta(minutes=10)
    estimate = to_nanos(Decimal("0.001"))
    out: dict[str, list[tuple[float, float]]] = {}
    probe = keys.counter(subjects[0], 1, 0)
    try:
        for r in range(repeats):
            got = {
                f"{label}: GET (one round trip)": await _latencies(lambda i: client.get(probe), N),
                f"{label}: reserve, 1 tag": await _latencies(
                    lambda i, r=r: counters.reserve(f"{label}a{r}-{i}", budgets[:1], estimate, deadline), N
                ),
                f"{label}: reserve, 3 tags on 3 masters": await _latencies(
                    lambda i, r=r: counters.reserve(f"{label}b{r}-{i}", budgets, estimate, deadline), N
                ),
            }
            for name, values in got.items():
                out.setdefault(name, []).append((_pct(values, 0.5), _pct(values, 0.99)))
    finally:
        await counters.close()
    return out


async def run(
    database_url: str, single_url: str, cluster_url: str, repeats: int = 3
) -> list[tuple[str, float]]:
    await migrate(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    subjects = _subjects_on_three_masters(cluster_url)
    single = connect_redis(single_url)
    cluster = connect_redis(cluster_url, cluster=True)
    try:
        results = await _measure(single, pool, subjects, "one Redis", repeats)
        results |= await _measure(cluster, pool, subjects, "cluster", repeats)
    finally:
        await single.aclose()
        await cluster.aclose()
        await pool.close()
    rows: list[tuple[str, float]] = []
    p50s = {name: statistics.median(a for a, _ in runs) for name, runs in results.items()}
    for name, runs in results.items():
        rows.append((f"{name}: p50 (µs)", p50s[name]))
        rows.append((f"{name}: p99 (µs)", statistics.median(b for _, b in runs)))
    for what in ("reserve, 1 tag", "reserve, 3 tags on 3 masters"):
        rows.append(
            (f"cluster / one Redis, {what} (p50)", p50s[f"cluster: {what}"] / p50s[f"one Redis: {what}"])
        )
    return rows


def main() -> list[tuple[str, float]]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedPostgres(Path(tmp) / "pg") as pg,
        EmbeddedRedis(Path(tmp) / "redis") as redis,
        LocalRedisCluster(Path(tmp) / "cluster") as cluster,
    ):
        return asyncio.run(run(pg.url, redis.url, cluster.seed_url))
