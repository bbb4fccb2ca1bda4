"""A closed-loop HTTP load generator (its own process): N workers, fixed duration.

Prints one JSON line: requests/s, p50 and p99 latency in ms, error count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Summarise the budget for the search team."}],
    "max_tokens": 64,
}


async def run(url: str, key: str, tags: str, concurrency: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if tags:
        headers["x-ledger-tags"] = tags
    payload = json.dumps(BODY).encode()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                started = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
                    if record and resp.status != 200:
                        errors += 1
                if record:
                    latencies.append(time.perf_counter() - started)

        # a real warm-up: the same load, responses read, for a while (connections,
        # caches, the server's pools), then measured
        warm = time.perf_counter() + max(1.0, duration / 5)
        await asyncio.gather(*(worker(warm, record=False) for _ in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + duration, record=True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "errors": errors,
        "requests": len(latencies),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="none")
    parser.add_argument("--tags", default="")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    a = parser.parse_args()
    print(json.dumps(asyncio.run(run(a.url, a.key, a.tags, a.concurrency, a.duration))))
