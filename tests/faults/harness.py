"""A cluster of real processes for fault tests: its own PostgreSQL and Redis,
a mock upstream, and N gateway processes — all on loopback, all started,
killed and restarted here (never the machine's shared services)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from ledger.run.embedded import EmbeddedPostgres, EmbeddedRedis

ADMIN = "fault-admin-key-0123456789"
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# A model whose estimate is its actual cost when the mock reports completion_tokens
# == max_tokens: prompts are free, every output token costs $0.00001. Settling
# such a request frees no room, so how many requests a budget admits is fixed by
# arithmetic alone (budget // estimate), however the requests interleave.
FLAT_MODEL = "flat-fault-model"
FLAT_OVERRIDE = {"model": FLAT_MODEL, "input_per_mtok": "0", "output_per_mtok": "10"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None, key: str = ADMIN, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 (loopback http)
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@dataclass
class Cluster:
    root: Path
    pg: EmbeddedPostgres = field(init=False)
    redis: EmbeddedRedis | None = field(init=False)
    mock_port: int = field(init=False)
    gateways: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    _mock: subprocess.Popen[bytes] | None = None

    def start(self, *, durable: bool = False, redis_cluster: str | None = None, **settings: str) -> Cluster:
        """``durable``: PostgreSQL as shipped (fsync on), for benchmarks; fault
        scenarios trade durability for speed (their crashes are processes, not
        power cuts). ``redis_cluster``: a Redis Cluster node's URL (the caller owns
        the cluster) instead of an embedded Redis of its own."""
        self.pg = EmbeddedPostgres(self.root / "pg", settings={} if durable else FAST_PG).start()
        self.redis = None if redis_cluster else EmbeddedRedis(self.root / "redis").start()
        redis_settings = (
            {"LEDGER_REDIS_URL": redis_cluster, "LEDGER_REDIS_CLUSTER": "true"} if redis_cluster else {}
        )
        self.mock_port = free_port()
        self._mock = subprocess.Popen(
            [sys.executable, "-m", "ledger.run.cli", "mock-upstream", "--port", str(self.mock_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.env = {
            **os.environ,
            "LEDGER_DATABASE_URL": self.pg.url,
            "LEDGER_REDIS_URL": self.redis.url if self.redis else "",
            **redis_settings,
            "LEDGER_ADMIN_KEY": ADMIN,
            "LEDGER_LOG_LEVEL": "warning",
            "LEDGER_PROVIDERS": json.dumps(
                [
                    {
                        "name": "mock",
                        "base_url": f"http://127.0.0.1:{self.mock_port}/v1",
                        "price_provider": "openai",
                    }
                ]
            ),
            "LEDGER_PRICE_OVERRIDES": json.dumps([FLAT_OVERRIDE]),
            **{f"LEDGER_{k.upper()}": v for k, v in settings.items()},
        }
        subprocess.run(
            [sys.executable, "-m", "ledger.run.cli", "migrate"],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def start_gateway(self, i: int, **settings: str) -> str:
        port = self.ports.get(i) or free_port()
        self.ports[i] = port
        env = {**self.env, **{f"LEDGER_{k.upper()}": v for k, v in settings.items()}}
        log = open(self.root / f"gateway-{i}.log", "ab")  # noqa: SIM115 - the child writes to it
        self.gateways[i] = subprocess.Popen(
            [sys.executable, "-m", "ledger.run.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.wait_ready(i)
        return self.url(i)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def wait_ready(self, i: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.gateways[i]
            assert proc.poll() is None, (self.root / f"gateway-{i}.log").read_text()[-3000:]
            try:
                status, _ = http("GET", f"{self.url(i)}/health/ready", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway {i} never became ready")

    def kill_gateway(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.gateways.pop(i)
        proc.send_signal(sig)
        proc.wait(30)

    def log_of(self, i: int) -> str:
        return (self.root / f"gateway-{i}.log").read_text()

    def stop(self) -> None:
        for i in list(self.gateways):
            proc = self.gateways.pop(i)
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._mock is not None:
            self._mock.terminate()
            self._mock.wait(10)
        if self.redis is not None:
            self.redis.stop()
        self.pg.stop()

    def ledger(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ledger.run.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


async def ask(client: openai.AsyncOpenAI, i: int, answered: list[str], *, words: int = 0) -> str:
    """Request ``i``: one chat completion of 100 output tokens on the flat-priced
    model (it costs exactly its estimate). "ok" (its request id appended to
    ``answered``), "denied" (429) or "status <code>"."""
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=FLAT_MODEL,
            messages=[{"role": "user", "content": f"request {i}: " + "words " * words}],
            max_tokens=100,
            extra_body={"mock": {"completion_tokens": 100, "delay_ms": i % 7 * 20}},
        )
        raw.parse()
        answered.append(raw.headers["x-ledger-request-id"])
        return "ok"
    except openai.RateLimitError:
        return "denied"
    except openai.APIStatusError as e:
        return f"status {e.status_code}"
