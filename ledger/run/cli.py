"""The `ledger` command: the composition root that wires servers, gateway and workers.

Nothing imports this module; it is the one place that knows every package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from ledger.errors import LedgerError, SettingsError
from ledger.postgres.migrations import migrate
from ledger.run import logs
from ledger.run.embedded import DataDirBusy, DataDirLock, EmbeddedPostgres, EmbeddedRedis, Owner
from ledger.settings import ProviderConfig, Settings, redact_url

log = structlog.get_logger("ledger")

DESCRIPTION = """\
budget-ledger: a gateway and budget ledger for OpenAI-compatible LLM traffic.
Every request is attributed to tags, users and metadata, priced, checked
against per-tag budgets and recorded in an event log.

Start here:
  ledger dev                      run everything locally (http://127.0.0.1:4000,
                                  dashboard at /ui, keys in .data/)
  ledger report --by tag          spend per tag over the last 7 days

The operator commands (projections, replay, verify, counters, report, export, asof,
archive, migrate) work on the servers of the `ledger dev` that runs on --data-dir
(default .data), or on LEDGER_DATABASE_URL / LEDGER_REDIS_URL when set.
"""

EPILOG = "`ledger COMMAND --help` describes a command. Configuration: LEDGER_* variables (see README)."

# Commands that do one thing and exit: their info logs (migrations, pools) are noise.
_ONE_SHOT = ("migrate", "projections", "replay", "verify", "counters", "report", "asof", "export", "archive")
_DEV_PORTS = (54329, 63799)  # preferred embedded ports; free ones are chosen when taken
_READY_WAIT_S = 90.0  # how long a command waits for a `ledger dev` that is still starting


class UsageError(LedgerError):
    """A bad flag or argument: reported like argparse's own errors, exit 2."""


# ------------------------------------------------------------------ argument types


def _port(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number between 1 and 65535, got {raw!r}")
    return int(raw)


def _group(raw: str) -> str:
    from ledger.postgres.queries import dimension_group, valid_group

    if not valid_group(raw) and dimension_group(raw) is None:
        raise argparse.ArgumentTypeError(
            f"must be tag, tag:<dimension>, user, model or metadata.<key>, got {raw!r}"
        )
    return raw


def _since(raw: str) -> str:
    from projections.cli_commands import parse_since

    try:
        parse_since(raw, datetime.now(UTC))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return raw


def _month(raw: str) -> str:
    from ledger.postgres.focus import month_bounds

    try:
        month_bounds(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a month like 2026-10, got {raw!r}") from None
    return raw


def _date(raw: str) -> date:
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date like 2026-01-01, got {raw!r}") from None


def _timestamp(raw: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an ISO 8601 timestamp like 2026-11-27T12:00:00Z or a date, got {raw!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    from projections.spend import PROJECTIONS

    parser = argparse.ArgumentParser(
        prog="ledger",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev",
        help="run everything locally (embedded PostgreSQL and Redis when none is configured)",
        description="Run the gateway, its workers, a mock upstream and, unless LEDGER_DATABASE_URL / "
        "LEDGER_REDIS_URL are set, embedded PostgreSQL and Redis in --data-dir. One `ledger dev` "
        "per data dir: a second one refuses to start.",
    )
    serve = sub.add_parser("serve", help="run the gateway against configured PostgreSQL and Redis")
    for p in (dev, serve):
        p.add_argument("--host", help="address to listen on (LEDGER_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=_port, help="port to listen on (LEDGER_PORT, default 4000)")
    dev.add_argument("--data-dir", help="where embedded servers keep data (LEDGER_DATA_DIR, default .data)")
    serve.add_argument(
        "--workers",
        type=int,
        help="HTTP worker processes sharing the port (LEDGER_WORKERS, default 1); "
        "projection and alert workers run in the first",
    )

    mock = sub.add_parser("mock-upstream", help="run the built-in OpenAI-compatible mock upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=_port, default=4010)
    mock.add_argument("--delay-ms", type=float, default=0.0, help="wait before every first byte")
    mock.add_argument("--chunk-delay-ms", type=float, default=0.0, help="wait between stream chunks")
    mock.add_argument("--fail-status", type=int, help="answer every request with this status")
    mock.add_argument("--api-key", help="require this bearer key")
    mock.add_argument(
        "--admin-key",
        default=os.environ.get("LEDGER_ADMIN_KEY"),
        help="the bearer key /mock/requests asks for (default: LEDGER_ADMIN_KEY; none: it is off)",
    )

    mig = sub.add_parser("migrate", help="apply pending SQL migrations")
    ops = [mig]

    proj = sub.add_parser("projections", help="projection workers: run them, or show their lag")
    proj.add_argument("action", choices=("run", "status"))
    ops.append(proj)

    rep = sub.add_parser(
        "replay",
        help="rebuild projections from the event log",
        description="Rebuild projections from the event log and swap them in; with --until, build "
        "spend per tag as of a moment into a schema asof_<timestamp> (list and drop those "
        "with `ledger asof`).",
    )
    which = rep.add_mutually_exclusive_group()
    which.add_argument(
        "--projection", choices=tuple(PROJECTIONS), help="one projection: " + ", ".join(PROJECTIONS)
    )
    which.add_argument("--all", action="store_true", help="every projection (the default)")
    rep.add_argument(
        "--until",
        type=_timestamp,
        metavar="TIMESTAMP",
        help="only events recorded up to this ISO timestamp (UTC unless it says otherwise), "
        "into a schema of its own",
    )
    ops.append(rep)

    ver = sub.add_parser("verify", help="check views and counters against the event log")
    ops.append(ver)
    for p in (rep, ver):
        p.add_argument(
            "--archive",
            metavar="DIR",
            type=Path,
            help="read the months `ledger archive` wrote to DIR with the live log (LEDGER_ARCHIVE_DIR)",
        )
    arc = sub.add_parser(
        "archive",
        help="move old months of the event log to Parquet files and detach them",
        description="Write every month partition of request and denial events whose whole month is "
        "before --before to DIR/events_YYYY_MM.parquet, list it in DIR/manifest.json (range, "
        "positions, rows, sha256), verify the file, then detach and drop the partition. "
        "Definitions (tags, keys, customers) and alerts are never archived. Safe to rerun.",
    )
    arc.add_argument(
        "--before", type=_date, required=True, metavar="DATE", help="archive months ending by this date"
    )
    arc.add_argument("--to", type=Path, required=True, metavar="DIR", help="the archive directory")
    ops.append(arc)
    ops.append(sub.add_parser("notify", help="raise budget alerts and deliver them to the webhooks"))
    rpt = sub.add_parser("report", help="spend per tag, user, model or metadata key, with sparklines")
    rpt.add_argument(
        "--by", default="tag", type=_group, help="tag | tag:<dimension> | user | model | metadata.<key>"
    )
    rpt.add_argument(
        "--allocation",
        choices=("split", "full"),
        help="split: a request's cost divided among its tags in the dimension, rows sum to the total "
        "(default for tag:<dimension>); full: its whole cost under each tag",
    )
    rpt.add_argument(
        "--compare", action="store_true", help="each row against the period of the same length just before"
    )
    rpt.add_argument(
        "--since",
        default="7d",
        type=_since,
        help="how far back: Nd (the last N UTC days, today included), Nw, or Nh (default 7d)",
    )
    ops.append(rpt)
    exp = sub.add_parser("export", help="the charges of a period as a FOCUS 1.2 dataset (CSV)")
    exp.add_argument("--focus", action="store_true", required=True, help="FOCUS 1.2 (the only format)")
    when = exp.add_mutually_exclusive_group()
    when.add_argument("--month", type=_month, help="a calendar month, YYYY-MM (UTC), e.g. last month's bill")
    when.add_argument("--since", type=_since, help="how far back, as for report: Nd, Nw or Nh (default 30d)")
    exp.add_argument("--output", "-o", default="-", help="a file to write (default -: standard output)")
    exp.add_argument("--parquet", action="store_true", help="write Parquet (needs --output and pyarrow)")
    ops.append(exp)
    cnt = sub.add_parser("counters", help="budget counters in Redis")
    cnt.add_argument("action", choices=("rebuild",))
    ops.append(cnt)
    asof = sub.add_parser("asof", help="list or drop the asof_* schemas `replay --until` leaves")
    asof.add_argument("action", choices=("list", "drop"))
    asof.add_argument("schemas", nargs="*", metavar="SCHEMA", help="drop: the asof_* schemas to drop")
    asof.add_argument("--all", action="store_true", help="drop: every asof_* schema")
    ops.append(asof)
    for p in ops:
        p.add_argument(
            "--data-dir",
            help="the data dir of the running `ledger dev` whose servers to use "
            "(LEDGER_DATA_DIR, default .data)",
        )
        p.add_argument(
            "--start-servers",
            action="store_true",
            help="when no `ledger dev` runs on the data dir, start its embedded servers for this "
            "command alone (stopped when it ends)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {
            k: v
            for k, v in vars(args).items()
            if k in {"host", "port", "data_dir", "workers"} and v is not None
        }
        if getattr(args, "archive", None) is not None:  # replay/verify --archive
            overrides["archive_dir"] = args.archive
        if "LEDGER_LOG_FORMAT" not in os.environ and args.command not in ("serve", "mock-upstream"):
            # People read these on a terminal; machines (pipes, files) get JSON lines.
            overrides["log_format"] = "console" if sys.stderr.isatty() else "json"
        if "LEDGER_LOG_LEVEL" not in os.environ and args.command in _ONE_SHOT:
            overrides["log_level"] = "warning"
        if args.command == "projections" and args.action == "run" and "LEDGER_LOG_LEVEL" not in os.environ:
            overrides.pop("log_level", None)
        settings = Settings.from_env(**overrides)
        logs.configure(settings.log_format, settings.log_level)
        if args.command == "dev":
            return _dev(settings)
        if args.command == "serve":
            if settings.workers > 1 and _WORKER_INDEX not in os.environ:
                return _supervise(settings)
            return _run(_serve(settings, reuse_port=_WORKER_INDEX in os.environ))
        if args.command == "migrate":
            return _migrate_cmd(settings, args)
        if args.command == "mock-upstream":
            return _mock_upstream(args)
        if args.command == "asof":
            return _asof(settings, args)
        if args.command in (
            "projections",
            "replay",
            "verify",
            "counters",
            "notify",
            "report",
            "export",
            "archive",
        ):
            return _operate(settings, args)
    except SettingsError as e:
        print(f"ledger: configuration error: {e}", file=sys.stderr)
        return 2
    except (UsageError, DataDirBusy) as e:
        print(f"ledger: {e}", file=sys.stderr)
        return 2
    except LedgerError as e:
        print(f"ledger: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("LEDGER_LOG_LEVEL", "").lower() == "debug":
            raise
        print(
            f"ledger: {type(e).__name__}: {e} (LEDGER_LOG_LEVEL=debug shows the traceback)", file=sys.stderr
        )
        return 1
    return 2


def _say(message: str) -> None:
    """One line for the operator, on stderr so that stdout stays the command's answer."""
    print(f"ledger: {message}", file=sys.stderr, flush=True)


def _wait_for_owner(lock: DataDirLock) -> Owner | None:
    """The owner of the data dir, once it is ready (a `ledger dev` may still be starting)."""
    deadline = time.monotonic() + _READY_WAIT_S
    owner = lock.holder()
    while owner is not None and owner.command == "dev" and not owner.ready:
        if time.monotonic() > deadline:
            raise UsageError(
                f"the ledger dev on {lock.data_dir} (pid {owner.pid}) did not finish starting "
                f"within {_READY_WAIT_S:g}s"
            )
        time.sleep(0.2)
        owner = lock.holder()
    return owner


@contextlib.contextmanager
def _servers(settings: Settings, args: argparse.Namespace, *, redis: bool) -> Iterator[Settings]:
    """Settings with server URLs, and one line saying where they come from:

    * LEDGER_DATABASE_URL / LEDGER_REDIS_URL when set;
    * else the servers of the `ledger dev` that runs on the data dir (left running);
    * else, with --start-servers only, the data dir's embedded servers started for
      this command (and stopped after it); without it, a usage error that says so.
    """
    need_pg = settings.database_url is None
    need_redis = redis and settings.redis_url is None
    if not need_pg and not need_redis:
        _say(f"using {redact_url(settings.database_url or '')} (LEDGER_DATABASE_URL)")
        yield settings
        return
    data_dir = settings.data_dir.resolve()
    lock = DataDirLock(data_dir)
    owner = _wait_for_owner(lock)
    if owner is not None:
        if owner.command != "dev":
            raise DataDirBusy(data_dir, owner)
        missing = [
            var
            for var, needed, url in (
                ("LEDGER_DATABASE_URL", need_pg, owner.database_url),
                ("LEDGER_REDIS_URL", need_redis, owner.redis_url),
            )
            if needed and url is None
        ]
        if missing:
            raise UsageError(
                f"the ledger dev on {data_dir} (pid {owner.pid}) uses configured servers, not embedded "
                f"ones: set {' and '.join(missing)} for this command too"
            )
        _say(f"using the servers of the ledger dev on {data_dir} (pid {owner.pid}, {owner.url})")
        yield msgspec.structs.replace(
            settings,
            database_url=settings.database_url or owner.database_url,
            redis_url=(settings.redis_url or owner.redis_url) if redis else settings.redis_url,
        )
        return
    if not args.start_servers:
        raise UsageError(
            f"no ledger dev runs on {data_dir}, and LEDGER_DATABASE_URL is not set. Start one "
            "(`make run` or `ledger dev`), point --data-dir at the data dir of the one that runs, "
            "set LEDGER_DATABASE_URL (and LEDGER_REDIS_URL), or add --start-servers to start this "
            "data dir's embedded servers for this command alone"
        )
    with contextlib.ExitStack() as stack:
        lock.acquire(args.command)
        stack.callback(lock.release)
        _say(
            f"NOTE: no ledger dev runs on {data_dir}; starting its embedded servers for this command "
            "alone (not a running instance: no gateway, stopped when the command ends)"
        )
        if need_pg:
            pg = EmbeddedPostgres(data_dir / "pg").start()
            if not pg.adopted:  # adopted: left running by a killed ledger; not ours to stop
                stack.callback(pg.stop)
            settings = msgspec.structs.replace(settings, database_url=pg.url)
        if need_redis:
            rd = EmbeddedRedis(data_dir / "redis").start()
            if not rd.adopted:
                stack.callback(rd.stop)
            settings = msgspec.structs.replace(settings, redis_url=rd.url)
        lock.publish(Owner(os.getpid(), args.command, None, settings.database_url, settings.redis_url, True))
        yield settings


def _operate(settings: Settings, args: argparse.Namespace) -> int:
    from projections import cli_commands as commands

    with _servers(settings, args, redis=args.command in ("verify", "counters")) as s:
        assert s.database_url is not None
        asyncio.run(migrate(s.database_url))
        if args.command == "projections":
            if args.action == "status":
                return asyncio.run(commands.status(s))
            with contextlib.suppress(KeyboardInterrupt):
                _run(commands.run_workers(s))
            return 0
        if args.command == "replay":
            names = [args.projection] if args.projection else None
            return asyncio.run(commands.replay_command(s, names, args.until))
        if args.command == "verify":
            return asyncio.run(commands.verify(s))
        if args.command == "notify":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(commands.notify(s))
            return 0
        if args.command == "report":
            if args.compare or args.allocation or args.by.startswith("tag:"):
                return asyncio.run(
                    commands.report_command(s, args.by, args.since, args.allocation, args.compare)
                )
            return asyncio.run(commands.report(s, args.by, args.since))
        if args.command == "export":
            return _export(s, args)
        if args.command == "archive":
            return _archive(s, args)
        return asyncio.run(commands.counters_rebuild(s))


def _archive(settings: Settings, args: argparse.Namespace) -> int:
    from ledger.postgres.archive import archive

    assert settings.database_url is not None
    report = asyncio.run(archive(settings.database_url, args.before, args.to))
    for entry in report.archived:
        print(
            f"{entry.partition}: {entry.rows} events (positions {entry.first_position}.."
            f"{entry.last_position}) -> {args.to / entry.file}, detached"
        )
    if report.already:
        print(f"already archived in {args.to}: {', '.join(report.already)}")
    if not report.archived:
        print(f"nothing to archive before {args.before}")
    return 0


def _export(settings: Settings, args: argparse.Namespace) -> int:
    from ledger.postgres import focus
    from projections.cli_commands import parse_since

    if args.month:
        start, end = focus.month_bounds(args.month)
    else:
        span = parse_since(args.since or "30d", datetime.now(UTC))
        start, end = span.start, span.end
    if args.parquet and args.output == "-":
        raise UsageError("export --parquet needs --output FILE (Parquet is binary)")
    if args.output == "-":
        count = asyncio.run(focus.write_csv(settings, start, end, sys.stdout))
    else:
        try:
            count = asyncio.run(focus.write_file(settings, start, end, args.output, parquet=args.parquet))
        except focus.ParquetUnavailable as e:
            raise UsageError(str(e)) from None
    print(f"{count} charges from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    return 0


def _asof(settings: Settings, args: argparse.Namespace) -> int:
    from projections import cli_commands as commands

    if args.action == "list" and (args.schemas or args.all):
        raise UsageError("asof list takes no schema names and no --all")
    if args.action == "drop" and not args.schemas and not args.all:
        raise UsageError("asof drop needs the names of asof_* schemas, or --all (see `ledger asof list`)")
    if args.schemas and args.all:
        raise UsageError("asof drop takes schema names or --all, not both")
    with _servers(settings, args, redis=False) as s:
        assert s.database_url is not None
        if args.action == "list":
            return asyncio.run(commands.asof_list(s))
        return asyncio.run(commands.asof_drop(s, args.schemas, every=args.all))


def _mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockConfig, create_mock_app

    config = MockConfig(args.delay_ms, args.chunk_delay_ms, args.fail_status, args.api_key, args.admin_key)
    print(f"mock upstream on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    web.run_app(create_mock_app(config), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def _migrate_cmd(settings: Settings, args: argparse.Namespace) -> int:
    with _servers(settings, args, redis=False) as settings:
        assert settings.database_url is not None
        applied = asyncio.run(migrate(settings.database_url))
        print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def _admin_key(settings: Settings) -> str:
    """LEDGER_ADMIN_KEY when set, else a key generated once and kept in the data dir."""
    if settings.admin_key:
        return settings.admin_key
    path = settings.data_dir / "admin_key"
    if path.exists():
        return path.read_text().strip()
    key = "ledger-admin-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _check_port(host: str, port: int) -> None:
    """Fail before starting anything when the gateway's port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UsageError(f"cannot listen on {host!r}: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(_port_taken(host, port)) from None
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _port_taken(host: str, port: int) -> str:
    return (
        f"port {port} on {host} is already in use (another ledger dev on another data dir?); "
        "choose another with --port"
    )


def _dev(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    data_dir = settings.data_dir.resolve()
    # One ledger per data dir: a second one must not adopt, and later stop, the
    # servers of the first (DataDirBusy, exit 2, before anything is touched).
    lock = DataDirLock(data_dir).acquire("dev")
    try:
        _check_port(settings.host, settings.port)
        settings = msgspec.structs.replace(settings, admin_key=_admin_key(settings))
        url = f"http://{settings.host}:{settings.port}"
        pg_url: str | None = None  # of the servers started here
        redis_url: str | None = None
        # Servers are stopped in reverse order by the ExitStack, whatever happens.
        with contextlib.ExitStack() as stack:
            if settings.database_url is None:
                print(f"starting embedded PostgreSQL in {data_dir / 'pg'} ...", flush=True)
                pg = EmbeddedPostgres(data_dir / "pg", port=_DEV_PORTS[0])
                stack.callback(pg.stop)
                pg.start()
                settings = msgspec.structs.replace(settings, database_url=pg.url)
                pg_url = pg.url
            if settings.redis_url is None:
                print(f"starting embedded Redis in {data_dir / 'redis'} ...", flush=True)
                rd = EmbeddedRedis(data_dir / "redis", port=_DEV_PORTS[1])
                stack.callback(rd.stop)
                rd.start()
                settings = msgspec.structs.replace(settings, redis_url=rd.url)
                redis_url = rd.url
            # Where the servers listen, for the operator commands (only embedded
            # servers: a configured URL may hold a password and is in their environment too).
            lock.publish(Owner(os.getpid(), "dev", url, pg_url, redis_url))
            assert settings.database_url is not None
            asyncio.run(migrate(settings.database_url))
            _run(
                _serve(
                    settings,
                    dev=True,
                    on_listening=lambda: lock.publish(
                        Owner(os.getpid(), "dev", url, pg_url, redis_url, True)
                    ),
                )
            )
            print("stopping embedded servers ...", flush=True)
    finally:
        lock.release()
    print("stopped.", flush=True)
    return 0


_T = TypeVar("_T")
_WORKER_INDEX = "LEDGER_WORKER_INDEX"  # set in the processes `_supervise` starts
_QUICK_DEATH_S = 10.0  # a worker dying this soon after its start died "quickly"
_QUICK_DEATHS = 3  # this many quick deaths in a row: stop everything
_STOP_GRACE_S = 20.0  # a worker's graceful shutdown (10 s) and its pools' close


def _run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop where it is installed: the event loop is a large share of a
    proxied request's CPU time."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """A worker gets SIGTERM when its supervisor dies (Linux), so none is orphaned."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _supervise(settings: Settings) -> int:
    """`ledger serve --workers N`: N processes of `ledger serve` on one port
    (SO_REUSEPORT: the kernel spreads connections), each with its own pools. The
    first runs the projection and alert workers; the others only serve HTTP.
    A worker that dies is started again, with a growing delay; one that keeps
    dying within seconds of its start stops them all (exit 1), as a single
    `ledger serve` would. SIGINT/SIGTERM/SIGHUP stop them all."""
    stopping = False
    failed = False
    children: dict[int, subprocess.Popen[bytes]] = {}
    started_at: dict[int, float] = {}
    quick_deaths: dict[int, int] = {}

    def start(index: int) -> None:
        env = {**os.environ, _WORKER_INDEX: str(index), "LEDGER_WORKERS": "1"}
        if index > 0:
            env["LEDGER_RUN_PROJECTIONS"] = "false"
        argv = [
            sys.executable,
            "-m",
            "ledger.run.cli",
            "serve",
            "--host",
            settings.host,
            "--port",
            str(settings.port),
        ]
        children[index] = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)
        started_at[index] = time.monotonic()

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for index in range(settings.workers):
            start(index)
        log.info("workers_started", workers=settings.workers, port=settings.port)
        while not stopping:
            time.sleep(0.2)
            for index, child in list(children.items()):
                code = child.poll()
                if code is None or stopping:
                    continue
                quick = time.monotonic() - started_at[index] < _QUICK_DEATH_S
                quick_deaths[index] = quick_deaths.get(index, 0) + 1 if quick else 0
                if code == 2 or quick_deaths[index] >= _QUICK_DEATHS:
                    # a usage or configuration error, or a worker that cannot stay
                    # up (its database gone, say): restarting cannot help
                    log.error("worker_failed_stopping_all", worker=index, exit_code=code)
                    failed = stopping = True
                    break
                delay = min(2.0 ** quick_deaths[index], 10.0)
                log.warning("worker_died_restarting", worker=index, exit_code=code, delay_s=delay)
                deadline = time.monotonic() + delay
                while not stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not stopping:
                    start(index)
        # Stop whatever runs now, including a worker started while the signal
        # arrived; give each the gateway's graceful shutdown, then kill.
        running = [child for child in children.values() if child.poll() is None]
        for child in running:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        codes = []  # of the workers that were running: did they stop cleanly?
        for child in running:
            try:
                codes.append(child.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                child.kill()
                codes.append(child.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children.values():
            if child.poll() is None:
                child.kill()
    if failed:
        return 1
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


async def _serve(
    settings: Settings,
    *,
    dev: bool = False,
    on_listening: Callable[[], None] | None = None,
    reuse_port: bool = False,
) -> int:
    from gateway.app import create_app, server_options  # the composition root may know every package
    from gateway.appkeys import KEY_BOOK
    from gateway.mock_upstream import MockConfig, create_mock_app

    if settings.database_url is None or settings.redis_url is None:
        raise SettingsError("`ledger serve` needs LEDGER_DATABASE_URL and LEDGER_REDIS_URL")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        if dev and not settings.providers:
            # No provider configured: serve the built-in mock upstream next to the gateway.
            mock = web.AppRunner(
                create_mock_app(MockConfig(admin_key=settings.admin_key)),
                handle_signals=False,
                access_log=None,
            )
            await mock.setup()
            runners.append(mock)
            mock_site = web.TCPSite(mock, "127.0.0.1", 0)
            await mock_site.start()
            port = mock.addresses[0][1]
            provider = ProviderConfig("mock", f"http://127.0.0.1:{port}/v1", price_provider="openai")
            settings = msgspec.structs.replace(settings, providers=(provider,))
        contexts = []
        if settings.run_projections:
            from gateway.appkeys import STORE
            from projections.runtime import workers_context

            contexts.append(
                workers_context(
                    lambda a: a[STORE],
                    settings.poll_interval_s,
                    webhooks=settings.webhooks,
                    webhook_secret=settings.webhook_secret,
                )
            )
        if not dev and settings.user_hash_secret is None:
            # A dump of the database then holds both the hashes and their key.
            log.warning(
                "user_hash_secret_in_database",
                message="end-user ids are hashed with a secret kept in the database; "
                "set LEDGER_USER_HASH_SECRET or LEDGER_USER_HASH_SECRET_FILE",
            )
        app = create_app(settings, contexts)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, **server_options(settings))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(
            runner, settings.host, settings.port, shutdown_timeout=10, reuse_port=reuse_port or None
        )
        try:
            await site.start()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(_port_taken(settings.host, settings.port)) from None
            raise
        # The cyclic collector was ~5% of a request's CPU under load. Everything built
        # at startup (price tables, caches, modules) lives as long as the process:
        # frozen, full collections no longer walk it. And a young generation of 10,000
        # (not 700) lets in-flight requests' objects die before a collection sees them,
        # rather than be walked and promoted while they wait on I/O.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        url = f"http://{settings.host}:{settings.port}"
        log.info("listening", url=url, database=redact_url(settings.database_url or ""))
        if dev:
            demo_key = await _demo_key(settings, app[KEY_BOOK])
            _print_banner(settings, url, demo_key)
        if on_listening is not None:
            on_listening()
        await stop.wait()
        log.info("shutting_down")
    finally:
        for r in reversed(runners):
            await r.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


async def _demo_key(settings: Settings, keys: Any) -> str:
    """A client key for trying the proxy, made once and kept in the data dir."""
    path = settings.data_dir / "demo_key"
    if path.exists():
        secret = path.read_text().strip()
        if keys.authenticate(secret) is not None:
            return secret
        path.unlink()  # the database was reset: make a new one
    secret, _ = await keys.generate(key_alias="demo", tags=["demo"])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return str(secret)


def _print_banner(settings: Settings, url: str, demo_key: str) -> None:
    upstreams = ", ".join(f"{p.name} -> {p.base_url}" for p in settings.providers)
    assert settings.database_url is not None
    assert settings.redis_url is not None
    data_dir = Path(settings.data_dir).resolve()
    key_file = data_dir / "admin_key"
    in_file = key_file.exists() and key_file.read_text().strip() == settings.admin_key
    admin_where = f"(kept in {key_file})" if in_file else "(set by LEDGER_ADMIN_KEY)"
    print(
        "\n".join(
            [
                "",
                f"  budget-ledger is listening on {url}",
                f"  dashboard:  {url}/ui   (sign in with the admin key)",
                f"  admin key:  {settings.admin_key}   {admin_where}",
                f"  demo key:   {demo_key}   (kept in {data_dir / 'demo_key'}; a client key with tag 'demo')",
                f"  upstreams:  {upstreams}",
                f"  PostgreSQL: {redact_url(settings.database_url)}",
                f"  Redis:      {redact_url(settings.redis_url)}",
                f"  data dir:   {data_dir}",
                f"  try:        curl {url}/health/ready",
                "  stop:       Ctrl-C (stops the gateway and the embedded servers)",
                "",
            ]
        ),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
