"""`ledger dev` as a subprocess: it serves, stops cleanly, and survives a kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_embedded import _cmd, alive, wait_dead

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_LOG_FORMAT"] = "json"
    return env


def start_dev(data_dir: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ledger.cli",
            "dev",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
        ],
        env=dev_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (http only)
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ledger dev exited early:\n{proc.stdout.read() if proc.stdout else ''}"
        try:
            status, _ = get(f"http://127.0.0.1:{port}/health/ready")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("ledger dev never became ready")


def server_pids(data_dir: Path) -> list[int]:
    pids = []
    pg = data_dir / "pg" / "data" / "postmaster.pid"
    if pg.exists():
        pids.append(int(pg.read_text().splitlines()[0]))
    rd = data_dir / "redis" / "redis.pid"
    if rd.exists():
        pids.append(int(rd.read_text().strip()))
    return pids


def processes_of(data_dir: Path) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and str(data_dir) in _cmd(int(p))]


def test_dev_serves_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir, port = (tmp_path / "data").resolve(), free_port()
    proc = start_dev(data_dir, port)
    try:
        wait_ready(port, proc)
        status, body = get(f"http://127.0.0.1:{port}/health/live")
        assert status == 200
        assert b"ok" in body
        pids = server_pids(data_dir)
        assert len(pids) == 2
        assert all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"listening on http://127.0.0.1:{port}" in out
    assert "admin key:" in out
    assert "Ctrl-C" in out
    assert (data_dir / "admin_key").read_text().strip() in out
    assert all(wait_dead(p) for p in pids)
    assert processes_of(data_dir) == []


def test_dev_recovers_after_kill_9(tmp_path: Path) -> None:
    data_dir, port = (tmp_path / "data").resolve(), free_port()
    first = start_dev(data_dir, port)
    try:
        wait_ready(port, first)
        first.kill()  # SIGKILL: no cleanup at all, servers left running
        first.communicate(timeout=10)
        second = start_dev(data_dir, port)
        try:
            wait_ready(port, second)
            pids = server_pids(data_dir)
            second.send_signal(signal.SIGINT)
            out, _ = second.communicate(timeout=60)
            assert second.returncode == 0, out
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
    assert all(wait_dead(p) for p in pids)
    assert processes_of(data_dir) == []
