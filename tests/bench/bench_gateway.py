"""The gateway (full ledger) against a bare aiohttp pass-through proxy.

Both sit in front of the same mock upstream, each in its own process, loaded by
a client in a third process at concurrency 1, 32 and 128. The gateway does the
whole job on every request: key check, attribution, pricing, a budget reserve
in Redis, RequestAdmitted and SpendRecorded made durable in PostgreSQL (fsync
on), and the settle. Figures are medians over ``repeats`` runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ledger.run.embedded import EmbeddedPostgres, EmbeddedRedis

ADMIN = "bench-admin-key-0123456789"
DURATION = float(os.environ.get("LEDGER_BENCH_DURATION", "5"))
# Knobs for iterating on one figure (the defaults are the published run):
# LEDGER_BENCH_REPEATS (3), LEDGER_BENCH_CONCURRENCY ("1,32,128"),
# LEDGER_BENCH_WORKERS2=0 skips the `--workers 2` gateway, LEDGER_BENCH_UPSTREAM_DELAY_MS
# (0) delays the mock upstream's answers, and
# LEDGER_BENCH_PROFILE=<file> attaches py-spy to the one-process gateway once it
# is ready (raw collapsed stacks to <file>, extra py-spy flags in
# LEDGER_BENCH_PROFILE_ARGS); its figures are then not comparable.
REPEATS = int(os.environ.get("LEDGER_BENCH_REPEATS", "3"))
CONCURRENCY = tuple(int(c) for c in os.environ.get("LEDGER_BENCH_CONCURRENCY", "1,32,128").split(","))
WORKERS2 = os.environ.get("LEDGER_BENCH_WORKERS2", "1") != "0"
PROFILE = os.environ.get("LEDGER_BENCH_PROFILE", "")
# The mock upstream's wait before its first byte (the second table: 20 ms).
UPSTREAM_DELAY_MS = float(os.environ.get("LEDGER_BENCH_UPSTREAM_DELAY_MS", "0"))
MOCK = [sys.executable, "-m", "ledger.run.cli", "mock-upstream"]
# A LiteLLM proxy to compare with (the third row): the path of its `litellm`
# command, from a virtualenv of its own (`pip install 'litellm[proxy]'`); it runs
# with 2 workers, a master key and no database, in front of the same mock.
LITELLM = os.environ.get("LEDGER_BENCH_LITELLM", "")
LITELLM_KEY = "sk-litellm-bench"  # it refuses to start without a master key


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback http)
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} never answered")


def _admin(url: str, path: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(  # noqa: S310 (loopback http)
        url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        result: dict[str, object] = json.loads(r.read())
        return result


def _load(url: str, key: str, tags: str, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.load",
            "--url",
            url,
            "--key",
            key,
            "--tags",
            tags,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(DURATION),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _cpu_s(root: int) -> float:
    """User + system CPU seconds of a process and its children (the workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [root]
    for task in Path("/proc").iterdir():
        if task.name.isdigit():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == root:
                pids.append(int(task.name))
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main(repeats: int = REPEATS) -> list[tuple[str, float]]:
    procs: list[subprocess.Popen[bytes]] = []
    profiler: subprocess.Popen[bytes] | None = None
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedPostgres(Path(tmp) / "pg") as pg,
        EmbeddedRedis(Path(tmp) / "redis") as redis,
    ):
        try:
            mock_port, bare_port, one_port, two_port = _port(), _port(), _port(), _port()
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            procs.append(
                subprocess.Popen(
                    [*MOCK, "--port", str(mock_port), "--delay-ms", str(UPSTREAM_DELAY_MS)],
                    **quiet,
                )
            )
            bare_proxy = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.bench.bare_proxy",
                    "--port",
                    str(bare_port),
                    "--upstream",
                    f"http://127.0.0.1:{mock_port}",
                ],
                **quiet,
            )
            procs.append(bare_proxy)
            subprocess.run(
                [sys.executable, "-m", "ledger.run.cli", "migrate"],
                check=True,
                **quiet,
                env={**os.environ, "LEDGER_DATABASE_URL": pg.url},
            )
            env = {
                **os.environ,
                "LEDGER_DATABASE_URL": pg.url,
                "LEDGER_REDIS_URL": redis.url,
                "LEDGER_ADMIN_KEY": ADMIN,
                "LEDGER_LOG_LEVEL": "info",  # the default: the shipped per-request log line is measured
                # the projection workers run in a process of their own, so a gateway's
                # CPU is the request path's alone
                "LEDGER_RUN_PROJECTIONS": "false",
                "LEDGER_PROVIDERS": json.dumps(
                    [
                        {
                            "name": "mock",
                            "base_url": f"http://127.0.0.1:{mock_port}/v1",
                            "price_provider": "openai",
                        }
                    ]
                ),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ledger.run.cli", "projections", "run"], env=env, **quiet
                )
            )
            serve = [sys.executable, "-m", "ledger.run.cli", "serve"]
            one = subprocess.Popen([*serve, "--port", str(one_port)], env=env, **quiet)
            procs.append(one)
            gateways = {"1 process": (one, one_port)}
            if WORKERS2:
                two = subprocess.Popen([*serve, "--port", str(two_port), "--workers", "2"], env=env, **quiet)
                procs.append(two)
                gateways["--workers 2"] = (two, two_port)
            ready = dict.fromkeys(gateways, "/health/ready")
            if LITELLM:
                litellm_port = _port()
                config = Path(tmp) / "litellm.yaml"
                config.write_text(
                    "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n"
                    f"      model: openai/gpt-4o-mini\n      api_base: http://127.0.0.1:{mock_port}/v1\n"
                    "      api_key: sk-mock\n"
                    f"general_settings:\n  master_key: {LITELLM_KEY}\n"
                )
                litellm = subprocess.Popen(
                    [LITELLM, "--config", str(config), "--port", str(litellm_port), "--num_workers", "2"],
                    env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"},
                    **quiet,
                )
                procs.append(litellm)
                gateways["LiteLLM, 2 workers"] = (litellm, litellm_port)
                ready["LiteLLM, 2 workers"] = "/health/liveliness"
            for name, (_, port) in gateways.items():
                _wait(f"http://127.0.0.1:{port}{ready[name]}", timeout=180)
            _wait(f"http://127.0.0.1:{mock_port}/v1/models")
            gw = f"http://127.0.0.1:{one_port}"
            _admin(gw, "/tag/new", {"name": "bench", "max_budget": 1000000, "budget_duration": "1d"})
            made = _admin(
                gw, "/key/generate", {"tags": ["team:bench"], "allowed_tags": ["team:bench", "bench"]}
            )
            key = str(made["key"])
            time.sleep(1.5)  # the other gateway learns the key and the tag (NOTIFY, 1 s poll)
            if PROFILE:  # attached once ready: the profile is the load's alone
                spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw"]
                spy += ["--rate", "250", "-o", PROFILE, "--pid", str(one.pid)]
                spy += os.environ.get("LEDGER_BENCH_PROFILE_ARGS", "").split()
                profiler = subprocess.Popen(spy, **quiet)
                procs.append(profiler)
            rows: list[tuple[str, float]] = []
            for concurrency in CONCURRENCY:
                bare: list[dict[str, float]] = []
                bare_cpu: list[float] = []
                full: dict[str, list[dict[str, float]]] = {name: [] for name in gateways}
                cpu: dict[str, list[float]] = {name: [] for name in gateways}
                for _ in range(repeats):  # interleaved: the machine's noise hits all alike
                    before = _cpu_s(bare_proxy.pid)
                    bare.append(
                        _load(f"http://127.0.0.1:{bare_port}/v1/chat/completions", "none", "", concurrency)
                    )
                    used = _cpu_s(bare_proxy.pid) - before
                    bare_cpu.append(used * 1000 / max(1.0, bare[-1]["requests"]))
                    for name, (proc, port) in gateways.items():
                        before = _cpu_s(proc.pid)
                        litellm_target = name.startswith("LiteLLM")
                        result = _load(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            LITELLM_KEY if litellm_target else key,
                            "" if litellm_target else "bench",
                            concurrency,
                        )
                        used = _cpu_s(proc.pid) - before
                        full[name].append(result)
                        cpu[name].append(used * 1000 / max(1.0, result["requests"]))
                b_rps = statistics.median(r["rps"] for r in bare)
                b50 = statistics.median(r["p50_ms"] for r in bare)
                b99 = statistics.median(r["p99_ms"] for r in bare)
                rows.append((f"c={concurrency}: bare proxy requests/s", b_rps))
                rows.append((f"c={concurrency}: bare proxy CPU ms per request", statistics.median(bare_cpu)))
                for name, results in full.items():
                    g_rps = statistics.median(r["rps"] for r in results)
                    rows += [
                        (f"c={concurrency}: gateway ({name}) requests/s", g_rps),
                        (f"c={concurrency}: gateway ({name}) throughput ratio to bare", g_rps / b_rps),
                        (
                            f"c={concurrency}: gateway ({name}) added p50 latency (ms)",
                            statistics.median(r["p50_ms"] for r in results) - b50,
                        ),
                        (
                            f"c={concurrency}: gateway ({name}) added p99 latency (ms)",
                            statistics.median(r["p99_ms"] for r in results) - b99,
                        ),
                        (
                            f"c={concurrency}: gateway ({name}) CPU ms per request",
                            statistics.median(cpu[name]),
                        ),
                        (f"c={concurrency}: gateway ({name}) errors", sum(r["errors"] for r in results)),
                    ]
            return rows
        finally:
            for p in reversed(procs):
                if p is profiler:
                    p.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
                else:
                    p.terminate()
                p.wait(30)


if __name__ == "__main__":
    for name, value in main():
        print(f"{name:70s} {value:12,.3f}")
