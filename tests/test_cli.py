"""`ledger dev` and the operator commands as subprocesses: dev serves, stops cleanly,
survives a kill -9, refuses a second start on its data dir; commands say whose
servers they use, refuse to invent an empty database, and report usage errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
import structlog

from gateway.appkeys import SETTINGS
from ledger.run.cli import main
from tests.conftest import projected
from tests.test_embedded import _cmd, alive, wait_dead
from tests.test_proxy import CHAT, Gateway, gateway

__all__ = ["gateway"]  # the fixture, imported for this module

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dev_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_LOG_FORMAT"] = "json"
    return env


def ledger(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a ledger command to the end (wide rich tables: nothing wraps)."""
    return subprocess.run(
        [sys.executable, "-m", "ledger.run.cli", *args],
        env={**dev_env(), "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ledger_here(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """A ledger command run in this process through ``main(argv)`` (as a program
    embedding the CLI would): (exit code, stdout, stderr). The environment, the
    standard streams and the log configuration are restored afterwards."""
    saved_env = dict(os.environ)
    saved_logs = structlog.get_config()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update({**dev_env(), "COLUMNS": "200", **(env or {})})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        structlog.configure(**saved_logs)
    return code, out.getvalue(), err.getvalue()


def start_dev(data_dir: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ledger.run.cli",
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
    # the banner says where the dashboard is and where the keys are kept
    assert f"dashboard:  http://127.0.0.1:{port}/ui" in out
    assert f"(kept in {data_dir / 'admin_key'})" in out
    assert f"(kept in {data_dir / 'demo_key'};" in out
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


def test_second_dev_on_the_same_data_dir_refuses_and_leaves_the_first_alone(tmp_path: Path) -> None:
    data_dir, port = (tmp_path / "data").resolve(), free_port()
    first = start_dev(data_dir, port)
    try:
        wait_ready(port, first)
        pids = server_pids(data_dir)
        # the same command again, as a second `make run` would: same dir, same port
        second = start_dev(data_dir, port)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 2, out
        assert (
            f"ledger: a ledger dev already runs on this data dir (pid {first.pid}, http://127.0.0.1:{port})"
            in out
        )
        assert "Traceback" not in out
        # it touched nothing: the first one's servers and gateway answer as before
        assert server_pids(data_dir) == pids
        assert all(alive(p) for p in pids)
        for _ in range(10):
            status, _ = get(f"http://127.0.0.1:{port}/health/ready")
            assert status == 200
            time.sleep(0.1)
        # an operator command uses the running dev's servers and says so
        verify = ledger("verify", "--data-dir", str(data_dir))
        assert verify.returncode == 0, verify.stderr
        assert (
            f"ledger: using the servers of the ledger dev on {data_dir} "
            f"(pid {first.pid}, http://127.0.0.1:{port})" in verify.stderr
        )
        assert "migration" not in verify.stderr  # no log lines on the operator's terminal
        assert "agree with the event log" in verify.stdout
        first.send_signal(signal.SIGINT)
        log, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log
    assert "Traceback" not in log
    assert '"level": "error"' not in log
    assert all(wait_dead(p) for p in pids)
    assert processes_of(data_dir) == []
    assert not (data_dir / "ledger.json").exists()  # the owner record goes with its owner

    # No dev runs now: commands refuse rather than start an empty instance ...
    refused = ledger("report", "--data-dir", str(data_dir))
    assert refused.returncode == 2
    assert f"ledger: no ledger dev runs on {data_dir}" in refused.stderr
    assert "--start-servers" in refused.stderr
    # ... unless asked to, and then say loudly what they did, and clean up after.
    started = ledger("verify", "--data-dir", str(data_dir), "--start-servers")
    assert started.returncode == 0, started.stderr
    assert "NOTE: no ledger dev runs on" in started.stderr
    assert "not a running instance" in started.stderr
    assert processes_of(data_dir) == []


def test_two_devs_on_different_data_dirs_both_serve(tmp_path: Path) -> None:
    dirs = [(tmp_path / f"data{i}").resolve() for i in range(2)]
    ports = [free_port(), free_port()]
    procs = [start_dev(dirs[0], ports[0]), start_dev(dirs[1], ports[1])]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(port, proc)
        owners = [json.loads((d / "ledger.json").read_text()) for d in dirs]
        assert owners[0]["database_url"] != owners[1]["database_url"]
        assert owners[0]["redis_url"] != owners[1]["redis_url"]
        for port in ports:
            assert get(f"http://127.0.0.1:{port}/health/ready")[0] == 200
        # the gateway port is checked before anything starts: a clear usage error
        clash = start_dev((tmp_path / "data2").resolve(), ports[0])
        out, _ = clash.communicate(timeout=60)
        assert clash.returncode == 2, out
        assert f"ledger: port {ports[0]} on 127.0.0.1 is already in use" in out
        assert processes_of((tmp_path / "data2").resolve()) == []
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for d in dirs:
        assert processes_of(d) == []


def test_help_and_usage_errors() -> None:
    top = ledger("--help")
    assert top.returncode == 0
    assert "budget-ledger: a gateway and budget ledger" in top.stdout
    assert "composition root" not in top.stdout  # not the module's docstring
    replay = ledger("replay", "--help")
    assert "{spend_logs,spend_rollups,budget_windows,spend_allocations}" in replay.stdout
    for args, fragment in [
        (("replay", "--projection", "nope"), "argument --projection: invalid choice: 'nope'"),
        (("replay", "--until", "yesterday"), "argument --until: must be an ISO 8601 timestamp"),
        (("report", "--by", "colour"), "argument --by: must be tag, tag:<dimension>, user, model"),
        (("report", "--since", "3x"), "argument --since: must be a number of days, weeks or hours"),
        (("report", "--since", "999h"), "(at most 168h)"),
        (("dev", "--port", "99999"), "argument --port: must be a port number"),
        (("asof", "drop"), "ledger: asof drop needs the names of asof_* schemas, or --all"),
    ]:
        proc = ledger(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert fragment in proc.stderr, (args, proc.stderr)
        assert "configuration error" not in proc.stderr
        assert proc.stderr.rstrip().splitlines()[-1].startswith("ledger"), proc.stderr


def table_rows(out: str) -> dict[str, list[str]]:
    """Rows of a rich table, by first cell: {"team:a": ["0.000123", "2", "█"], ...}."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


async def test_report_counts_each_request_once_and_marks_unpriced_models(gateway: Gateway) -> None:
    sdk = gateway.sdk()  # its key binds the tag "key-tag" to every request
    for tags, user, model in [
        (["team:a", "team:b"], "ana@example.com", "gpt-4o-mini"),
        (["team:a"], "bo@example.com", "gpt-4o"),
        (["team:c"], "bo@example.com", "house-model-x"),  # no known price: recorded at 0
    ]:
        await sdk.chat.completions.create(
            model=model, messages=CHAT["messages"], max_tokens=20, user=user, extra_body={"tags": tags}
        )
    await projected(gateway.app)
    spends = await gateway.spends()
    assert len(spends) == 3
    env = {"LEDGER_DATABASE_URL": gateway.app[SETTINGS].database_url or ""}

    by_tag = await asyncio.to_thread(ledger, "report", "--by", "tag", "--since", "1d", env=env)
    assert by_tag.returncode == 0, by_tag.stderr
    rows = table_rows(by_tag.stdout)
    total = sum((s.cost for s in spends), Decimal(0))
    # each request once, not once per tag; 3 requests, one of them unpriced
    assert rows["total"][:3] == [f"{total:.7f}", "3", "1"]
    assert rows["total"][1] == "3"
    assert rows["key-tag"][1] == "3"
    assert rows["team:a"][1] == "2"
    a = sum((s.cost for s in spends if "team:a" in s.tags), Decimal(0))
    assert Decimal(rows["team:a"][0]) == a
    assert rows["team:c"][:3] == ["—", "1", "1"]  # not a bare 0
    assert "tag rows overlap" in by_tag.stdout
    # one mark per day asked, and amounts with one number of decimals (they line up)
    assert all(len(r[3]) == 1 for name, r in rows.items() if name != "total")
    priced = [r[0] for r in rows.values() if r[0] != "—"]
    assert len({len(p) for p in priced}) == 1, priced

    week = await asyncio.to_thread(ledger, "report", "--since", "2w", env=env)
    assert all(len(r[3]) == 14 for name, r in table_rows(week.stdout).items() if name != "total")
    hours = await asyncio.to_thread(ledger, "report", "--since", "6h", env=env)
    assert all(len(r[3]) == 6 for name, r in table_rows(hours.stdout).items() if name != "total")

    by_model = table_rows((await asyncio.to_thread(ledger, "report", "--by", "model", env=env)).stdout)
    assert by_model["house-model-x"][0] == "—"
    assert Decimal(by_model["gpt-4o"][0]) > 0

    by_user = table_rows((await asyncio.to_thread(ledger, "report", "--by", "user", env=env)).stdout)
    users = [name for name in by_user if name != "total"]
    assert len(users) == 2
    assert all(len(u) == 13 and u.endswith("…") for u in users)  # 12 characters of the hash
    mixed = next(u for u in users if by_user[u][1] == "2")  # bo: one priced, one unpriced
    assert Decimal(by_user[mixed][0]) > 0
    assert by_user[mixed][2] == "1"

    # replay --until: before the log began is an error that says so; later ones leave a schema
    early = await asyncio.to_thread(ledger, "replay", "--until", "2001-01-01", env=env)
    assert early.returncode == 2
    assert "is before the log's first event" in early.stderr
    asof = await asyncio.to_thread(ledger, "replay", "--until", "2099-01-01T00:00:00Z", env=env)
    assert asof.returncode == 0, asof.stderr
    listed = await asyncio.to_thread(ledger, "asof", "list", env=env)
    assert "asof_20990101000000" in listed.stdout
    bad = await asyncio.to_thread(ledger, "asof", "drop", "public", env=env)
    assert bad.returncode == 2
    assert "only asof_<14 digits> schemas" in bad.stderr
    dropped = await asyncio.to_thread(ledger, "asof", "drop", "asof_20990101000000", env=env)
    assert dropped.returncode == 0, dropped.stderr
    assert "no asof_* schemas" in (await asyncio.to_thread(ledger, "asof", "list", env=env)).stdout


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p))
    return sorted(out)


async def test_serve_with_two_workers_shares_the_port_and_restarts_a_dead_worker(
    database_url: str, redis_url: str
) -> None:
    port = free_port()
    env = {
        **dev_env(),
        "LEDGER_DATABASE_URL": database_url,
        "LEDGER_REDIS_URL": redis_url,
        "LEDGER_ADMIN_KEY": "test-admin-key-0123456789",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger.run.cli", "serve", "--workers", "2", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await asyncio.to_thread(wait_ready, port, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2
        # only the first worker runs the projection and alert workers
        environs = [Path(f"/proc/{w}/environ").read_bytes().split(b"\0") for w in workers]
        assert sum(b"LEDGER_RUN_PROJECTIONS=false" in e for e in environs) == 1
        os.kill(workers[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _children(proc.pid)
            if len(now) == 2 and workers[1] not in now:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the dead worker was not started again: {now}")
        await asyncio.to_thread(wait_ready, port, proc)
        # a stop that arrives while a dead worker waits to be started again
        # stops everything, the waiting worker included
        os.kill(now[0], signal.SIGKILL)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "worker_died_restarting" in err
    assert all(not alive(w) for w in now)


def test_serve_workers_that_cannot_stay_up_stop_the_supervisor() -> None:
    """A worker that dies right after each start (PostgreSQL unreachable) is not
    restarted forever: the supervisor exits 1, as one `ledger serve` would."""
    env = {
        **dev_env(),
        "LEDGER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        "LEDGER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "LEDGER_ADMIN_KEY": "test-admin-key-0123456789",
        "LEDGER_CONNECT_TIMEOUT_S": "0.5",
    }
    run = subprocess.run(
        [sys.executable, "-m", "ledger.run.cli", "serve", "--workers", "2", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert "worker_failed_stopping_all" in run.stderr
