"""Test services: real PostgreSQL and Redis, found in this order:

1. ``LEDGER_TEST_DATABASE_URL`` / ``LEDGER_TEST_REDIS_URL`` (each on its own);
2. testcontainers, when a Docker engine answers;
3. the embedded servers ``ledger dev`` uses, started once per session in a temp dir.

Every test that asks for ``database_url`` gets a fresh database cloned from a
migrated template; every test that asks for ``redis_url`` gets a flushed
database of its own server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from ledger.postgres.migrations import migrate
from ledger.postgres.store import EventStore
from ledger.run.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger.settings import Settings
from tests.redis_cluster import LocalRedisCluster, missing_binaries

# Speed over durability for throwaway test clusters.
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@dataclass(frozen=True)
class Server:
    url: str
    kind: str  # "env", "container" or "embedded"


def _docker_answers() -> bool:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        # Probe the socket ourselves: the docker client leaks its socket when
        # the engine is not there, which filterwarnings=error turns into a failure.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect(host.removeprefix("unix://"))
        except OSError:
            return False
        finally:
            sock.close()
    try:
        import docker  # type: ignore[import-untyped]
        from docker.errors import DockerException  # type: ignore[import-untyped]
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=2)
    except (DockerException, OSError):
        return False
    try:
        client.ping()
    except (DockerException, OSError):
        return False
    finally:
        client.close()
    return True


@pytest.fixture(scope="session")
def docker_available() -> bool:
    return _docker_answers()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory, docker_available: bool) -> Iterator[Server]:
    url = os.environ.get("LEDGER_TEST_DATABASE_URL")
    if url:
        yield Server(url, "env")
        return
    if docker_available:
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17-alpine", driver=None) as pg:
            yield Server(pg.get_connection_url(), "container")
        return
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg"), settings=FAST_PG) as pg:
        yield Server(pg.url, "embedded")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory, docker_available: bool) -> Iterator[Server]:
    url = os.environ.get("LEDGER_TEST_REDIS_URL")
    if url:
        yield Server(url, "env")
        return
    if docker_available:
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as rc:
            host, port = rc.get_container_host_ip(), rc.get_exposed_port(6379)
            yield Server(f"redis://{host}:{port}/0", "container")
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as rd:
        yield Server(rd.url, "embedded")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A real 3-master, 3-replica Redis Cluster, one per test module (tests kill
    and restart its nodes, so modules do not share one). Skipped when Debian's
    redis-server / redis-cli are missing, except under CI, where that fails."""
    if missing := missing_binaries():
        reason = (
            f"Redis Cluster tests need {' and '.join(missing)} on PATH "
            "(Debian packages redis-server, redis-tools)"
        )
        if _ci():
            pytest.fail(f"{reason}; CI must have them (.ci/run installs them)")
        pytest.skip(reason)
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10)


@pytest.fixture(scope="session")
def template_database(postgres_server: Server) -> Iterator[str]:
    """A migrated database that every test's database is cloned from."""
    name = f"ledger_tpl_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await _admin(postgres_server.url)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        await migrate(with_database(postgres_server.url, name))

    async def drop() -> None:
        conn = await _admin(postgres_server.url)
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


async def _fresh_database(server_url: str, template: str) -> str:
    name = f"ledger_t_{uuid.uuid4().hex[:12]}"
    conn = await _admin(server_url)
    try:
        await conn.execute(f'create database "{name}" template "{template}"')
    finally:
        await conn.close()
    return name


async def _drop_database(server_url: str, name: str) -> None:
    conn = await _admin(server_url)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await conn.close()


@pytest.fixture
async def database_url(postgres_server: Server, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    name = await _fresh_database(postgres_server.url, template_database)
    yield with_database(postgres_server.url, name)
    await _drop_database(postgres_server.url, name)


@pytest.fixture
async def empty_database_url(postgres_server: Server) -> AsyncIterator[str]:
    """A fresh database with no migrations applied."""
    name = await _fresh_database(postgres_server.url, "template0")
    yield with_database(postgres_server.url, name)
    await _drop_database(postgres_server.url, name)


@pytest.fixture
async def redis_url(redis_server: Server) -> str:
    """The test Redis, flushed before the test (only its own database index)."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    await client.aclose()
    return redis_server.url


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings.from_dsn(database_url, redis_url, data_dir=str(tmp_path), log_format="console")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[EventStore]:
    store = await EventStore.open(Settings.from_dsn(database_url, pool_max_size=20))
    yield store
    await store.close()


async def projected(app: Any, timeout: float = 10.0) -> None:
    """Wait until the app's projection workers have applied everything in the log."""
    from gateway.appkeys import STORE
    from ledger.postgres.queries import projection_lag

    pool = app[STORE].pool
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = await projection_lag(pool)
        if len(rows) >= 3 and all(r.events_behind == 0 for r in rows):  # views and alerts
            return
        assert asyncio.get_running_loop().time() < deadline, f"projections did not catch up: {rows}"
        await asyncio.sleep(0.02)


def gateway_app(settings: Settings) -> Any:
    """The gateway app as `ledger serve` builds it, projection workers included."""
    from gateway.app import create_app
    from gateway.appkeys import STORE
    from projections.runtime import workers_context

    return create_app(settings, [workers_context(lambda a: a[STORE], settings.poll_interval_s)])
