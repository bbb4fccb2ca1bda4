"""A read replica: with LEDGER_DATABASE_READ_URL the spend reports and the
dashboard read a PostgreSQL streaming replica; the request path and the admin
writes stay on the primary; the replica's lag is in /metrics and in
`projections status`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.appkeys import ADMISSION, BUDGET_BOOK, TAGS
from ledger import events as ev
from ledger.admission import Admitted
from ledger.postgres.migrations import migrate
from ledger.run.embedded import EmbeddedPostgres
from ledger.settings import Settings
from tests.conftest import gateway_app, projected

ADMIN = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

pytestmark = pytest.mark.slow


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary = EmbeddedPostgres(tmp_path / "primary").start()
    replica: EmbeddedPostgres | None = None
    try:
        asyncio.run(migrate(primary.url))
        replica = primary.clone_as_replica(tmp_path / "replica").start()
        yield primary, replica
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()


async def caught_up(primary: str, replica: str, timeout: float = 20) -> None:
    p, r = await asyncpg.connect(primary), await asyncpg.connect(replica)
    try:
        target = await p.fetchval("select pg_current_wal_lsn()::text")
        deadline = time.monotonic() + timeout
        while (
            await r.fetchval("select pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn())", target) > 0
        ):
            assert time.monotonic() < deadline, "the replica never caught up"
            await asyncio.sleep(0.05)
    finally:
        await p.close()
        await r.close()


async def test_reports_read_the_replica_and_the_request_path_writes_the_primary(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], redis_url: str, aiohttp_client: AiohttpClient
) -> None:
    primary, replica = servers
    settings = Settings.from_dsn(primary.url, redis_url, admin_key=ADMIN, database_read_url=replica.url)
    app: web.Application = gateway_app(msgspec.structs.replace(settings, log_format="console"))
    client: TestClient = await aiohttp_client(app)
    await app[TAGS].create("team:a", ev.TagFields(max_budget=Decimal(10), budget_duration="1d"))
    await app[BUDGET_BOOK].refresh()
    for i in range(5):
        admitted = await app[ADMISSION].admit(f"r{i}", ["team:a"], Decimal("0.01"), model="m")
        assert isinstance(admitted, Admitted)
        await app[ADMISSION].record_spend(admitted, Decimal("0.002"), model="m", status=200)
    await projected(app)
    await caught_up(primary.url, replica.url)
    # the replica follows the primary's WAL: the report converges on what was spent
    deadline = time.monotonic() + 20
    while True:
        r = await client.get("/spend/tags", headers=AUTH)
        assert r.status == 200
        rows = [row for row in await r.json() if row["tag"] == "team:a"]
        got = (Decimal(str(rows[0]["spend"])), rows[0]["requests"]) if rows else None
        if got == (Decimal("0.010"), 5):
            break
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.1)
    r = await client.get("/metrics", headers=AUTH)
    text = await r.text()
    assert "ledger_replica_lag_bytes" in text
    # The replica goes away: reports fail over HTTP as unavailable, the request
    # path (primary) does not notice.
    replica.stop()
    r = await client.get("/spend/tags", headers=AUTH)
    assert r.status == 503, await r.text()
    admitted = await app[ADMISSION].admit("after", ["team:a"], Decimal("0.01"), model="m")
    assert isinstance(admitted, Admitted)
    await app[ADMISSION].record_spend(admitted, Decimal("0.002"), model="m", status=200)
    r = await client.post("/tag/new", json={"name": "team:b", "max_budget": 1}, headers=AUTH)
    assert r.status in (200, 201)
