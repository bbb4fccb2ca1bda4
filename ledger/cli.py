"""The `ledger` command: the composition root that wires servers, gateway and workers.

Nothing imports this module; it is the one place that knows every package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from ledger import logs
from ledger.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger.errors import LedgerError, SettingsError
from ledger.migrations import migrate
from ledger.settings import ProviderConfig, Settings, redact_url

log = structlog.get_logger("ledger")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = sub.add_parser(
        "dev", help="run everything locally (embedded PostgreSQL and Redis when none is configured)"
    )
    serve = sub.add_parser("serve", help="run the gateway against configured PostgreSQL and Redis")
    for p in (dev, serve):
        p.add_argument("--host", help="address to listen on (LEDGER_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port to listen on (LEDGER_PORT, default 4000)")
    dev.add_argument("--data-dir", help="where embedded servers keep data (LEDGER_DATA_DIR, default .data)")

    mock = sub.add_parser("mock-upstream", help="run the built-in OpenAI-compatible mock upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=4010)
    mock.add_argument("--delay-ms", type=float, default=0.0, help="wait before every first byte")
    mock.add_argument("--chunk-delay-ms", type=float, default=0.0, help="wait between stream chunks")
    mock.add_argument("--fail-status", type=int, help="answer every request with this status")
    mock.add_argument("--api-key", help="require this bearer key")

    mig = sub.add_parser("migrate", help="apply pending SQL migrations")
    ops = [mig]

    proj = sub.add_parser("projections", help="projection workers: run them, or show their lag")
    proj.add_argument("action", choices=("run", "status"))
    ops.append(proj)

    rep = sub.add_parser("replay", help="rebuild projections from the event log")
    which = rep.add_mutually_exclusive_group()
    which.add_argument("--projection", help="one projection by name")
    which.add_argument("--all", action="store_true", help="every projection (the default)")
    rep.add_argument(
        "--until", help="only events recorded up to this ISO timestamp, into a schema of its own"
    )
    ops.append(rep)

    ops.append(sub.add_parser("verify", help="check views and counters against the event log"))
    ops.append(sub.add_parser("notify", help="raise budget alerts and deliver them to the webhooks"))
    rpt = sub.add_parser("report", help="spend per tag, user, model or metadata key, with sparklines")
    rpt.add_argument("--by", default="tag", help="tag | user | model | metadata.<key>")
    rpt.add_argument("--since", default="7d", help="how far back: Nd, Nh or Nw (default 7d)")
    ops.append(rpt)
    cnt = sub.add_parser("counters", help="budget counters in Redis")
    cnt.add_argument("action", choices=("rebuild",))
    ops.append(cnt)
    for p in ops:
        p.add_argument(
            "--data-dir", help="use the embedded servers of this data dir (e.g. a running `ledger dev`)"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {
            k: v for k, v in vars(args).items() if k in {"host", "port", "data_dir"} and v is not None
        }
        if args.command == "dev" and "LEDGER_LOG_FORMAT" not in os.environ:
            overrides["log_format"] = "console" if sys.stderr.isatty() else "json"
        settings = Settings.from_env(**overrides)
        logs.configure(settings.log_format, settings.log_level)
        if args.command == "dev":
            return _dev(settings)
        if args.command == "serve":
            return asyncio.run(_serve(settings))
        if args.command == "migrate":
            return _migrate_cmd(settings)
        if args.command == "mock-upstream":
            return _mock_upstream(args)
        if args.command in ("projections", "replay", "verify", "counters", "notify", "report"):
            return _operate(settings, args)
    except SettingsError as e:
        print(f"ledger: configuration error: {e}", file=sys.stderr)
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


@contextlib.contextmanager
def _servers(settings: Settings, *, redis: bool) -> Iterator[Settings]:
    """Settings with server URLs: configured ones, or the embedded servers of the
    data dir — adopted when a `ledger dev` runs them (and left running), started
    for the command otherwise (and stopped after it)."""
    with contextlib.ExitStack() as stack:
        if settings.database_url is None:
            pg = EmbeddedPostgres(settings.data_dir / "pg").start()
            if not pg.adopted:
                stack.callback(pg.stop)
            settings = dataclasses.replace(settings, database_url=pg.url)
        if redis and settings.redis_url is None:
            rd = EmbeddedRedis(settings.data_dir / "redis").start()
            if not rd.adopted:
                stack.callback(rd.stop)
            settings = dataclasses.replace(settings, redis_url=rd.url)
        yield settings


def _operate(settings: Settings, args: argparse.Namespace) -> int:
    from projections import commands
    from projections.spend import PROJECTIONS

    with _servers(settings, redis=args.command in ("verify", "counters")) as s:
        assert s.database_url is not None
        asyncio.run(migrate(s.database_url))
        if args.command == "projections":
            if args.action == "status":
                return asyncio.run(commands.status(s))
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(commands.run_workers(s))
            return 0
        if args.command == "replay":
            if args.projection is not None and args.projection not in PROJECTIONS:
                raise SettingsError(
                    f"--projection must be one of {', '.join(PROJECTIONS)}; got {args.projection!r}"
                )
            names = [args.projection] if args.projection else list(PROJECTIONS)
            until = None
            if args.until:
                try:
                    until = datetime.fromisoformat(args.until.replace("Z", "+00:00"))
                except ValueError:
                    raise SettingsError(
                        f"--until must be an ISO 8601 timestamp; got {args.until!r}"
                    ) from None
                if until.tzinfo is None:
                    until = until.replace(tzinfo=UTC)
            return asyncio.run(commands.replay_command(s, names, until))
        if args.command == "verify":
            return asyncio.run(commands.verify(s))
        if args.command == "notify":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(commands.notify(s))
            return 0
        if args.command == "report":
            return asyncio.run(commands.report(s, args.by, args.since))
        return asyncio.run(commands.counters_rebuild(s))


def _mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockConfig, create_mock_app

    config = MockConfig(args.delay_ms, args.chunk_delay_ms, args.fail_status, args.api_key)
    print(f"mock upstream on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    web.run_app(create_mock_app(config), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def _migrate_cmd(settings: Settings) -> int:
    with _servers(settings, redis=False) as settings:
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


def _dev(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, admin_key=_admin_key(settings))
    # Servers are stopped in reverse order by the ExitStack, whatever happens.
    with contextlib.ExitStack() as stack:
        if settings.database_url is None:
            print(f"starting embedded PostgreSQL in {settings.data_dir / 'pg'} ...", flush=True)
            pg = EmbeddedPostgres(settings.data_dir / "pg", port=54329)
            stack.callback(pg.stop)
            pg.start()
            settings = dataclasses.replace(settings, database_url=pg.url)
        if settings.redis_url is None:
            print(f"starting embedded Redis in {settings.data_dir / 'redis'} ...", flush=True)
            rd = EmbeddedRedis(settings.data_dir / "redis", port=63799)
            stack.callback(rd.stop)
            rd.start()
            settings = dataclasses.replace(settings, redis_url=rd.url)
        assert settings.database_url is not None
        asyncio.run(migrate(settings.database_url))
        asyncio.run(_serve(settings, dev=True))
        print("stopping embedded servers ...", flush=True)
    print("stopped.", flush=True)
    return 0


async def _serve(settings: Settings, *, dev: bool = False) -> int:
    from gateway.app import create_app  # the composition root may know every package
    from gateway.keys import KEY_BOOK
    from gateway.mock_upstream import create_mock_app

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
            mock = web.AppRunner(create_mock_app(), handle_signals=False, access_log=None)
            await mock.setup()
            runners.append(mock)
            mock_site = web.TCPSite(mock, "127.0.0.1", 0)
            await mock_site.start()
            port = mock.addresses[0][1]
            provider = ProviderConfig("mock", f"http://127.0.0.1:{port}/v1", price_provider="openai")
            settings = dataclasses.replace(settings, providers=(provider,))
        contexts = []
        if settings.run_projections:
            from gateway.keys import STORE
            from projections.runtime import workers_context

            contexts.append(
                workers_context(
                    lambda a: a[STORE],
                    settings.poll_interval_s,
                    webhooks=settings.webhooks,
                    webhook_secret=settings.webhook_secret,
                )
            )
        app = create_app(settings, contexts)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=10)
        await site.start()
        url = f"http://{settings.host}:{settings.port}"
        log.info("listening", url=url, database=redact_url(settings.database_url or ""))
        if dev:
            demo_key = await _demo_key(settings, app[KEY_BOOK])
            _print_banner(settings, url, demo_key)
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
    print(
        "\n".join(
            [
                "",
                f"  budget-ledger is listening on {url}",
                f"  admin key:  {settings.admin_key}",
                f"  demo key:   {demo_key}   (a client key with tag 'demo')",
                f"  upstreams:  {upstreams}",
                f"  PostgreSQL: {redact_url(settings.database_url)}",
                f"  Redis:      {redact_url(settings.redis_url)}",
                f"  data dir:   {Path(settings.data_dir).resolve()}",
                f"  try:        curl {url}/health/ready",
                "  stop:       Ctrl-C (stops the gateway and the embedded servers)",
                "",
            ]
        ),
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
