"""Projection lag while the gateway serves a steady 500 requests/s.

One gateway process (running the projection workers) in front of the mock
upstream; an open-loop client fires requests at a fixed rate for DURATION
seconds while the lag of every projection is sampled every 100 ms. As shipped:
PostgreSQL with fsync on, the default log level (a line per request).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

from ledger.postgres.queries import projection_lag
from tests.faults.harness import Cluster, http

RATE = int(os.environ.get("LEDGER_BENCH_RATE", "500"))
DURATION = float(os.environ.get("LEDGER_BENCH_DURATION", "10"))


async def run(cluster: Cluster, separate: bool) -> list[tuple[str, float]]:
    worker = None
    if separate:  # the workers in a process of their own: the second core
        url = await asyncio.to_thread(cluster.start_gateway, 0, log_level="info", run_projections="false")
        worker = subprocess.Popen(
            [sys.executable, "-m", "ledger.run.cli", "projections", "run"],
            env=cluster.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    else:
        url = await asyncio.to_thread(cluster.start_gateway, 0, log_level="info")
    http("POST", f"{url}/tag/new", {"name": "lag", "max_budget": 1000, "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"tags": ["lag"]})[1]["key"]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    pool = await asyncpg.create_pool(cluster.pg.url, min_size=1, max_size=2)
    samples: list[float] = []
    statuses: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            rows = await projection_lag(pool)
            samples.append(max((r.seconds_behind for r in rows), default=0.0))
            await asyncio.sleep(0.1)

    async def fire(session: aiohttp.ClientSession) -> None:
        async with session.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            await r.read()
            statuses.append(r.status)

    sampler = asyncio.create_task(sample())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        started = time.perf_counter()
        n = int(RATE * DURATION)
        for i in range(n):
            delay = started + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(session)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    stop.set()
    await sampler
    await pool.close()
    if worker is not None:
        worker.terminate()
        worker.wait(10)
    ordered = sorted(samples)
    where = "workers in their own process" if separate else "workers in the gateway process"
    return [
        (f"{where}: offered requests/s", RATE),
        (f"{where}: served requests/s", len(statuses) / elapsed),
        (f"{where}: non-200 answers", float(sum(1 for s in statuses if s != 200))),
        (f"{where}: projection lag p50 (s)", statistics.median(ordered)),
        (f"{where}: projection lag p99 (s)", ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]),
    ]


def main() -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    for separate in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = Cluster(Path(tmp)).start(durable=True)
            try:
                rows += asyncio.run(run(cluster, separate))
            finally:
                cluster.stop()
    return rows


if __name__ == "__main__":
    for label, value in main():
        print(f"{label:70s} {value:12,.3f}")
