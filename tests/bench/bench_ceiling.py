"""The single writer's ceiling: 1, 2 and 4 processes against one PostgreSQL.

One durable embedded PostgreSQL (fsync on), one embedded Redis, the mock
upstream, and two measurements:

* appends: 1, 2 and 4 OS processes, each an EventStore whose group-commit
  writer is fed by APPEND_CONCURRENCY tasks, append to the same database for
  DURATION seconds. Total events/s, its ratio to one process, and the mean
  batch (events per commit, from each writer's own counters).
* gateway: `ledger serve --workers N` (N processes on one port, SO_REUSEPORT)
  for N = 1, 2, 4, loaded at GATEWAY_CONCURRENCY by bench_gateway's load
  generator. Requests/s, its ratio to one process, and where the CPU goes
  (gateway, PostgreSQL, Redis, mock upstream, projections, load generator).

During both, pg_stat_activity is sampled every SAMPLE_S: the mean number of
backends waiting on the append lock (wait_event 'advisory'), waiting on the WAL
(write/fsync), and running (active, no wait event: on a CPU or queued for one).
Figures are medians of ``repeats`` runs, the process counts interleaved in each
run so the machine's noise hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from ledger.events import NewEvent
from ledger.postgres.store import EventStore
from ledger.run import logs
from ledger.run.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger.settings import Settings
from tests.bench.bench_gateway import ADMIN, DURATION, _admin, _cpu_s, _load, _port, _wait
from tests.bench.bench_store import PAYLOAD, _reset

PROCESSES = (1, 2, 4)
APPEND_CONCURRENCY = 256  # per process
GATEWAY_CONCURRENCY = 64
SAMPLE_S = 0.025
WARMUP_S = 1.0


# ------------------------------------------------------------------ sampling


class _Waits:
    """Mean backends per pg_stat_activity sample, by what they were doing."""

    def __init__(self) -> None:
        self.samples = 0
        self.advisory = 0
        self.wal = 0
        self.running = 0

    def means(self) -> dict[str, float]:
        n = max(1, self.samples)
        return {"advisory": self.advisory / n, "wal": self.wal / n, "running": self.running / n}


@contextlib.asynccontextmanager
async def _sampling(url: str) -> AsyncIterator[_Waits]:
    waits = _Waits()
    conn = await asyncpg.connect(url)

    async def sample() -> None:
        while True:
            rows = await conn.fetch(
                "select wait_event_type, wait_event from pg_stat_activity"
                " where backend_type = 'client backend' and state = 'active'"
                " and pid <> pg_backend_pid()"
            )
            waits.samples += 1
            for kind, event in rows:
                if kind is None:
                    waits.running += 1
                elif kind == "Lock" and event == "advisory":
                    waits.advisory += 1
                elif kind in ("IO", "LWLock") and event.lower().startswith("wal"):
                    waits.wal += 1  # WalSync / WalWrite (IO), WALWrite (LWLock)
            await asyncio.sleep(SAMPLE_S)

    task = asyncio.create_task(sample())
    try:
        yield waits
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await conn.close()


class _Machine:
    """The whole machine over a window, everyone's processes included: CPU busy
    (cores, from /proc/stat) and CPU pressure (the share of time some runnable
    task waited for a CPU, from /proc/pressure/cpu; 0 where the kernel has none)."""

    def __init__(self) -> None:
        self._busy, self._total, self._stall = self._read()
        self._started = time.perf_counter()

    @staticmethod
    def _read() -> tuple[int, int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        stall = 0
        with contextlib.suppress(OSError):
            some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
            stall = int(some.rsplit("total=", 1)[1])  # microseconds
        return sum(ticks[:8]) - idle, sum(ticks[:8]), stall

    def done(self) -> dict[str, float]:
        busy, total, stall = self._read()
        elapsed = time.perf_counter() - self._started
        return {
            "machine_cores_busy": (os.cpu_count() or 1) * (busy - self._busy) / max(1, total - self._total),
            "cpu_pressure": (stall - self._stall) / 1e6 / elapsed,
        }


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ appends


async def _append_worker(url: str, concurrency: int) -> None:
    """One appending process (a child): append until told to stop.

    Protocol on stdin/stdout: prints "ready" once loading; on "go" measures
    DURATION seconds and prints one JSON line; keeps loading until "stop", so
    every process's window is fully loaded by all the others.
    """
    logs.configure("console", "warning")
    store = await EventStore.open(Settings.from_dsn(url, pool_max_size=4))
    loop = asyncio.get_running_loop()
    event = [NewEvent("SpendRecorded", PAYLOAD)]
    stopping = False

    async def worker(w: int) -> None:
        i = 0
        while not stopping:
            await store.append(f"request:{os.getpid()}-{w}-{i}", 0, event)
            i += 1

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    try:
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        events, commits, cpu = store.stats.events, store.stats.commits, time.process_time()
        started = time.perf_counter()
        await asyncio.sleep(DURATION)
        elapsed = time.perf_counter() - started
        result = {
            "events_per_s": (store.stats.events - events) / elapsed,
            "commits_per_s": (store.stats.commits - commits) / elapsed,
            "cpu_s_per_s": (time.process_time() - cpu) / elapsed,
        }
        print(json.dumps(result), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    finally:
        stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


async def _appends_once(url: str, pg_pid: int, processes: int) -> dict[str, float]:
    argv = [sys.executable, "-m", "tests.bench.bench_ceiling", "append-worker", "--url", url]
    argv += ["--concurrency", str(APPEND_CONCURRENCY)]
    procs = [
        await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(processes)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"append worker did not start: {line!r}")
        await asyncio.sleep(WARMUP_S)  # every process loading before any measures
        pg_cpu = _cpu_s(pg_pid)
        machine = _Machine()
        started = time.perf_counter()
        async with _sampling(url) as waits:
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                await p.stdin.drain()
            results = []
            for p in procs:
                assert p.stdout is not None
                results.append(json.loads(await asyncio.wait_for(p.stdout.readline(), DURATION + 30)))
        elapsed = time.perf_counter() - started
        pg_cores = (_cpu_s(pg_pid) - pg_cpu) / elapsed
        whole = machine.done()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"stop\n")
            await p.stdin.drain()
        for p in procs:
            await asyncio.wait_for(p.wait(), 30)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    events = sum(r["events_per_s"] for r in results)
    commits = sum(r["commits_per_s"] for r in results)
    return {
        "events_per_s": events,
        "batch": events / max(1.0, commits),
        "commits_per_s": commits,
        "appender_cpu": sum(r["cpu_s_per_s"] for r in results),
        "pg_cpu": pg_cores,
        **whole,
        **waits.means(),
    }


async def _appends(url: str, pg_pid: int, repeats: int) -> list[tuple[str, float]]:
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in PROCESSES}
    for _ in range(repeats):
        bench_url = await _reset(url)  # a fresh events table each run
        for n in PROCESSES:
            runs[n].append(await _appends_once(bench_url, pg_pid, n))
    rows: list[tuple[str, float]] = []
    base = statistics.median(r["events_per_s"] for r in runs[1])
    for n, results in runs.items():

        def med(field: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[field] for r in results)

        head = f"appends, {n} proc:"
        rows += [
            (f"{head} events/s", med("events_per_s")),
            (f"{head} % of 1 process", 100 * med("events_per_s") / base),
            (f"{head} mean batch (events/commit)", med("batch")),
            (f"{head} commits/s", med("commits_per_s")),
            (f"{head} CPU % of a core, appenders", 100 * med("appender_cpu")),
            (f"{head} CPU % of a core, postgres", 100 * med("pg_cpu")),
            (f"{head} CPU % of a core, whole machine (everyone's)", 100 * med("machine_cores_busy")),
            (f"{head} CPU pressure (% of time a task waited for a CPU)", 100 * med("cpu_pressure")),
            (f"{head} backends waiting on append lock (x100)", 100 * med("advisory")),
            (f"{head} backends waiting on WAL write/fsync (x100)", 100 * med("wal")),
            (f"{head} backends running/runnable (x100)", 100 * med("running")),
        ]
    return rows


# ------------------------------------------------------------------ gateway


async def _gateway_once(url: str, port: int, key: str, pids: dict[str, int]) -> dict[str, float]:
    before = {name: _cpu_s(pid) for name, pid in pids.items()}
    loader = _children_cpu_s()
    machine = _Machine()
    started = time.perf_counter()
    async with _sampling(url) as waits:
        result = await asyncio.to_thread(
            _load, f"http://127.0.0.1:{port}/v1/chat/completions", key, "bench", GATEWAY_CONCURRENCY
        )
    elapsed = time.perf_counter() - started
    # The CPU window is the load generator's whole life (its warm-up included),
    # so these are cores busy under the same load, not totals for the requests.
    cores = {f"cpu:{name}": (_cpu_s(pid) - before[name]) / elapsed for name, pid in pids.items()}
    cores["cpu:load generator"] = (_children_cpu_s() - loader) / elapsed
    return {**result, **cores, **machine.done(), **waits.means()}


def _gateway(pg: EmbeddedPostgres, redis: EmbeddedRedis, repeats: int) -> list[tuple[str, float]]:
    assert pg.pid is not None
    assert redis.pid is not None
    procs: list[subprocess.Popen[bytes]] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    try:
        mock_port = _port()
        mock = subprocess.Popen(
            [sys.executable, "-m", "ledger.run.cli", "mock-upstream", "--port", str(mock_port)], **quiet
        )
        procs.append(mock)
        env = {
            **os.environ,
            "LEDGER_DATABASE_URL": pg.url,
            "LEDGER_REDIS_URL": redis.url,
            "LEDGER_ADMIN_KEY": ADMIN,
            "LEDGER_LOG_LEVEL": "info",  # the shipped per-request log line, as bench_gateway
            # the projections run once, in a process of their own, as in production:
            # their CPU is the log's cost, counted apart from the request path's
            "LEDGER_RUN_PROJECTIONS": "false",
            "LEDGER_PROVIDERS": json.dumps(
                [{"name": "mock", "base_url": f"http://127.0.0.1:{mock_port}/v1", "price_provider": "openai"}]
            ),
        }
        subprocess.run([sys.executable, "-m", "ledger.run.cli", "migrate"], check=True, env=env, **quiet)
        projections = subprocess.Popen(
            [sys.executable, "-m", "ledger.run.cli", "projections", "run"], env=env, **quiet
        )
        procs.append(projections)
        gateways: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        for n in PROCESSES:
            port = _port()
            serve = [
                sys.executable,
                "-m",
                "ledger.run.cli",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(n),
            ]
            gateways[n] = (subprocess.Popen(serve, env=env, **quiet), port)
            procs.append(gateways[n][0])
        for _, port in gateways.values():
            _wait(f"http://127.0.0.1:{port}/health/ready")
        _wait(f"http://127.0.0.1:{mock_port}/v1/models")
        first = f"http://127.0.0.1:{gateways[1][1]}"
        _admin(first, "/tag/new", {"name": "bench", "max_budget": 100000000, "budget_duration": "1d"})
        made = _admin(
            first, "/key/generate", {"tags": ["team:bench"], "allowed_tags": ["team:bench", "bench"]}
        )
        key = str(made["key"])
        time.sleep(1.5)  # the other gateways learn the key and the tag (NOTIFY, 1 s poll)
        others = {"postgres": pg.pid, "redis": redis.pid, "mock upstream": mock.pid}
        others["projections"] = projections.pid
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in PROCESSES}
        for _ in range(repeats):
            for n, (proc, port) in gateways.items():
                pids = {"gateway": proc.pid, **others}
                runs[n].append(asyncio.run(_gateway_once(pg.url, port, key, pids)))
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
    rows: list[tuple[str, float]] = []
    base = statistics.median(r["rps"] for r in runs[1])
    for n, results in runs.items():

        def med(field: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[field] for r in results)

        head = f"gateway, {n} proc:"
        rps = med("rps")
        cpu = [f for f in results[0] if f.startswith("cpu:")]
        rows += [
            (f"{head} requests/s", rps),
            (f"{head} % of 1 process", 100 * rps / base),
            (f"{head} p50 latency (ms)", med("p50_ms")),
            (f"{head} p99 latency (ms)", med("p99_ms")),
            (f"{head} errors", sum(r["errors"] for r in results)),
            *((f"{head} CPU % of a core, {f[4:]}", 100 * med(f)) for f in cpu),
            (
                f"{head} CPU % of a core, all",
                100 * statistics.median(sum(r[f] for f in cpu) for r in results),
            ),
            (f"{head} CPU % of a core, whole machine (everyone's)", 100 * med("machine_cores_busy")),
            (f"{head} CPU pressure (% of time a task waited for a CPU)", 100 * med("cpu_pressure")),
            (f"{head} gateway CPU ms per request", 1000 * med("cpu:gateway") / rps),
            (f"{head} postgres CPU ms per request", 1000 * med("cpu:postgres") / rps),
            (f"{head} backends waiting on append lock (x100)", 100 * med("advisory")),
            (f"{head} backends waiting on WAL write/fsync (x100)", 100 * med("wal")),
            (f"{head} backends running/runnable (x100)", 100 * med("running")),
        ]
    return rows


# ------------------------------------------------------------------ entry points


def main(repeats: int = 3) -> list[tuple[str, float]]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedPostgres(Path(tmp) / "pg") as pg,
        EmbeddedRedis(Path(tmp) / "redis") as redis,
    ):
        assert pg.pid is not None
        rows = asyncio.run(_appends(pg.url, pg.pid, repeats))
        rows += _gateway(pg, redis, repeats)
        return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("append-worker", help="one appending process (the benchmark starts these)")
    worker.add_argument("--url", required=True)
    worker.add_argument("--concurrency", type=int, default=APPEND_CONCURRENCY)
    args = parser.parse_args()
    if args.command == "append-worker":
        asyncio.run(_append_worker(args.url, args.concurrency))
    else:
        for name, value in main():
            print(f"{name:70s} {value:12,.1f}")
