"""Replay speed: 1,000,000 realistic events, then `replay --all`.

Events are written through the store's batch writer (RequestAdmitted and
SpendRecorded pairs with tags, users, metadata, some denials); then, in each
of ``LEDGER_BENCH_REPLAY_RUNS`` rounds: a ``read_all`` scan of the whole log
(batches of 5,000, the store benchmark's scan), each projection replayed from
position 0, and `ledger replay --all` (the CLI, in its own process) timed end
to end. Figures are medians of the rounds; each ratio compares a replay with
the scan of its own round, which is what compares across noisy runs.
``LEDGER_BENCH_REPLAY_EVENTS`` sets the log's size (200000 is enough to iterate).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from ledger import events as ev
from ledger.postgres.migrations import migrate
from ledger.postgres.store import EventStore
from ledger.run.embedded import EmbeddedPostgres
from ledger.settings import Settings
from projections.replay import replay
from projections.spend import PROJECTIONS, create

EVENTS = int(os.environ.get("LEDGER_BENCH_REPLAY_EVENTS", "1000000"))
RUNS = int(os.environ.get("LEDGER_BENCH_REPLAY_RUNS", "2"))


async def generate(store: EventStore, n_events: int) -> float:
    started = time.perf_counter()
    tag = ev.TagCreated(name="team:0", at=datetime.now(UTC), max_budget=Decimal(10**6), budget_duration="1d")
    await store.append("tag:team:0", 0, [ev.to_new(tag)])
    base = datetime.now(UTC) - timedelta(days=30)
    written = 1
    i = 0
    while written < n_events:
        batch = []
        for _ in range(2500):
            at = base + timedelta(seconds=i * 2)
            rid = f"bench-{i}"
            tags = [f"team:{i % 10}", f"app:{i % 37}", f"env:{'prod' if i % 4 else 'dev'}"]
            if i % 50 == 0:
                denied = ev.RequestDenied(
                    request_id=rid,
                    at=at,
                    tag="team:0",
                    spent=Decimal(1),
                    reserved=Decimal(0),
                    estimate=Decimal("0.01"),
                    max_budget=Decimal(1),
                    tags=tags,
                    model="gpt-4o-mini",
                )
                batch.append((f"denied:{rid}", None, [ev.to_new(denied)]))
            else:
                admitted = ev.RequestAdmitted(
                    request_id=rid,
                    at=at,
                    estimate=Decimal("0.002"),
                    deadline=at + timedelta(minutes=10),
                    tags=tags,
                    budget_tags=["team:0"] if i % 10 == 0 else [],
                    model="gpt-4o-mini",
                )
                spend = ev.SpendRecorded(
                    request_id=rid,
                    admitted_at=at,
                    cost=Decimal("0.000123") + i % 7,
                    tags=tags,
                    budget_tags=admitted.budget_tags,
                    model="gpt-4o-mini",
                    provider="openai",
                    user_hash=f"{i % 997:064x}",
                    metadata={"customer": f"c{i % 13}", "feature": "chat"},
                    prompt_tokens=500 + i % 300,
                    completion_tokens=80 + i % 50,
                    latency_ms=420.0,
                    status=200,
                )
                batch.append((f"request:{rid}", 0, [ev.to_new(admitted), ev.to_new(spend)]))
            i += 1
        results = await store.append_batch(batch)
        written += sum(len(r) for r in results if isinstance(r, list))
    return time.perf_counter() - started


async def _scan(store: EventStore) -> float:
    started = time.perf_counter()
    after, n = 0, 0
    while batch := await store.read_all(after, 5000):
        n += len(batch)
        after = batch[-1].position
    return n / (time.perf_counter() - started)


async def _replay_all_cli(url: str) -> float:
    """`ledger replay --all` as an operator runs it: process start, every projection
    rebuilt and swapped in. Returns the wall seconds."""
    env = {**os.environ, "LEDGER_DATABASE_URL": url, "LEDGER_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ledger.run.cli", "replay", "--all"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stdout + done.stderr
    return wall


async def run(url: str) -> list[tuple[str, float]]:
    await migrate(url)
    store = await EventStore.open(Settings.from_dsn(url))
    try:
        gen_s = await generate(store, EVENTS)
        head = await store.head()
        rates: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        for _ in range(RUNS):
            scan = await _scan(store)
            rates.setdefault("read_all scan", []).append(scan)
            for name in PROJECTIONS:
                result = await replay(url, create(name))
                rate = result.events / result.seconds
                rates.setdefault(f"replay {name}", []).append(rate)
                ratios.setdefault(f"replay {name}", []).append(rate / scan)
            rate = head / await _replay_all_cli(url)
            rates.setdefault("`ledger replay --all`, end to end", []).append(rate)
            ratios.setdefault("`ledger replay --all`, end to end", []).append(rate / scan)
    finally:
        await store.close()
    rows: list[tuple[str, float]] = [
        (f"generated events (batch writer, {gen_s:.0f}s)", float(head)),
        ("generation events/s", head / gen_s),
    ]
    for label, values in rates.items():
        rows.append((f"{label}: events/s (median of {len(values)})", statistics.median(values)))
        if label in ratios:
            rows.append((f"{label}: ratio to the scan of its run", statistics.median(ratios[label])))
    return rows


def main() -> list[tuple[str, float]]:
    url = os.environ.get("LEDGER_BENCH_DATABASE_URL")
    if url:
        return asyncio.run(run(url))
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedPostgres(
            Path(tmp) / "pg", settings={"max_wal_size": "4GB", "checkpoint_timeout": "30min"}
        ) as pg,
    ):
        return asyncio.run(run(pg.url))


if __name__ == "__main__":
    for label, value in main():
        print(f"{label:70s} {value:14,.1f}")
