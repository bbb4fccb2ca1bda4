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
    mig.add_argument("--data-dir", help="use the embedded PostgreSQL of this data dir")
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
    except SettingsError as e:
        print(f"ledger: configuration error: {e}", file=sys.stderr)
        return 2
    except LedgerError as e:
        print(f"ledger: {e}", file=sys.stderr)
        return 1
    return 2


def _mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockConfig, create_mock_app

    config = MockConfig(args.delay_ms, args.chunk_delay_ms, args.fail_status, args.api_key)
    print(f"mock upstream on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    web.run_app(create_mock_app(config), host=args.host, port=args.port, print=None, access_log=None)
    return 0


def _migrate_cmd(settings: Settings) -> int:
    with contextlib.ExitStack() as stack:
        if settings.database_url is None:
            pg = EmbeddedPostgres(settings.data_dir / "pg").start()
            if not pg.adopted:
                stack.callback(pg.stop)
            settings = dataclasses.replace(settings, database_url=pg.url)
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
        app = create_app(settings)
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
