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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from ledger import logs
from ledger.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger.errors import LedgerError, SettingsError
from ledger.migrations import migrate
from ledger.settings import Settings, redact_url

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
    dev.add_argument(
        "--data-dir", help="where embedded servers keep data (LEDGER_DATA_DIR, default .data)"
    )

    mig = sub.add_parser("migrate", help="apply pending SQL migrations")
    mig.add_argument("--data-dir", help="use the embedded PostgreSQL of this data dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {
            k: v
            for k, v in vars(args).items()
            if k in {"host", "port", "data_dir"} and v is not None
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
    except SettingsError as e:
        print(f"ledger: configuration error: {e}", file=sys.stderr)
        return 2
    except LedgerError as e:
        print(f"ledger: {e}", file=sys.stderr)
        return 1
    return 2


def _migrate_cmd(settings: Settings) -> int:
    with contextlib.ExitStack() as stack:
        if settings.database_url is None:
            pg = EmbeddedPostgres(settings.data_dir / "pg").start()
            if not pg.adopted:
                stack.callback(pg.stop)
            settings = dataclasses.replace(settings, database_url=pg.url)
        assert settings.database_url is not None
        applied = asyncio.run(migrate(settings.database_url))
        print(
            f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
        )
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
        asyncio.run(_serve(settings, banner=True))
        print("stopping embedded servers ...", flush=True)
    print("stopped.", flush=True)
    return 0


async def _serve(settings: Settings, *, banner: bool = False) -> int:
    from gateway.app import create_app  # the composition root may know every package

    if settings.database_url is None or settings.redis_url is None:
        raise SettingsError("`ledger serve` needs LEDGER_DATABASE_URL and LEDGER_REDIS_URL")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(settings), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=10)
        await site.start()
        url = f"http://{settings.host}:{settings.port}"
        log.info("listening", url=url, database=redact_url(settings.database_url))
        if banner:
            _print_banner(settings, url)
        await stop.wait()
        log.info("shutting_down")
    finally:
        await runner.cleanup()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _print_banner(settings: Settings, url: str) -> None:
    assert settings.database_url is not None
    assert settings.redis_url is not None
    print(
        "\n".join(
            [
                "",
                f"  budget-ledger is listening on {url}",
                f"  admin key:  {settings.admin_key}",
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
