"""What the request path reads from the log is indexed: a counter rebuild, the
sweeper's search for expired reservations and the alert worker's window spend
read the budget view plus the log's tail, never the whole events table."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from ledger import events as ev
from ledger.counters.log import CHARGED_BEFORE_SQL, EXPIRED_SQL, WINDOW_STATE_SQL
from ledger.domain.windows import parse_duration, window_at
from ledger.postgres.store import EventStore
from projections.budgets import BudgetWindows
from projections.runtime import Worker

pytestmark = pytest.mark.slow

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


async def fill(store: EventStore, requests: int) -> None:
    """``requests`` finished requests over 20 tags, most of them long ago."""
    for start in range(0, requests, 2000):
        batch = []
        for i in range(start, min(start + 2000, requests)):
            at = NOW - timedelta(minutes=requests - i)
            tag = f"t{i % 20}"
            admitted = ev.RequestAdmitted(
                request_id=f"r{i}",
                at=at,
                estimate=Decimal("0.01"),
                deadline=at + timedelta(minutes=15),
                tags=[tag],
                budget_tags=[tag],
            )
            spent = ev.SpendRecorded(
                request_id=f"r{i}", admitted_at=at, cost=Decimal("0.001"), tags=[tag], budget_tags=[tag]
            )
            batch.append((f"request:r{i}", 0, [ev.to_new(admitted), ev.to_new(spent)]))
        await store.append_batch(batch)
    # and a few still open
    for i in range(5):
        admitted = ev.RequestAdmitted(
            request_id=f"open{i}",
            at=NOW,
            estimate=Decimal("0.02"),
            deadline=NOW + timedelta(minutes=15),
            tags=["t1"],
            budget_tags=["t1"],
        )
        await store.append(f"request:open{i}", 0, [ev.to_new(admitted)])


async def plan(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await conn.fetch("explain (analyze, format json) " + sql, *args)
    return json.dumps(json.loads(rows[0][0]))


def scans(plan_json: str) -> list[tuple[str, int]]:
    """Every relation the plan read, with how and how many rows it took from it."""
    found = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            rows = int(node["Actual Rows"]) * int(node["Actual Loops"])
            rows += int(node.get("Rows Removed by Filter", 0)) * int(node["Actual Loops"])
            found.append((f"{node['Node Type']} on {node['Relation Name']}", rows))
        for child in node.get("Plans", []):
            walk(child)

    walk(json.loads(plan_json)[0]["Plan"])
    return found


async def test_rebuild_and_sweeper_queries_never_scan_the_events_table(store: EventStore) -> None:
    await fill(store, 40_000)
    assert store.dsn is not None
    conn = await asyncpg.connect(store.dsn)
    try:
        worker = Worker(store, BudgetWindows())
        await conn.execute("insert into projection_checkpoints (name) values ('budget_windows')")
        while await worker.step(conn):
            pass
        # a tail the projection has not applied yet
        for i in range(50):
            spent = ev.SpendRecorded(
                request_id=f"open{i % 5}x{i}",
                admitted_at=NOW,
                cost=Decimal("0.001"),
                tags=["t1"],
                budget_tags=["t1"],
            )
            await store.append(f"request:tail{i}", None, [ev.to_new(spent)])
        await conn.execute("analyze")
        window = window_at(parse_duration("1d"), NOW, NOW)
        for name, sql, args in (
            ("rebuild", WINDOW_STATE_SQL, ("tag:t1", 1, window.start, window.end, "t1", window.start, 0)),
            (
                "rebuild (definition not applied yet)",
                WINDOW_STATE_SQL,
                ("tag:t1", 99, window.start, window.end, "t1", window.start, 0),
            ),
            ("sweeper", EXPIRED_SQL, (NOW + timedelta(hours=1), 200)),
            ("alerts", CHARGED_BEFORE_SQL, ("tag:t1", window.start, window.end, "t1", 10**9)),
        ):
            read = scans(await plan(conn, sql, *args))
            # the log is partitioned (sql/0050): its partitions are events_*
            on_events = [(how, rows) for how, rows in read if re.search(r" on events(_\w+)?$", how)]
            assert on_events, (name, read)  # it does read the tail
            # an empty partition (a month ahead, the default ones) may be seq-scanned: 0 rows
            assert all(not how.startswith("Seq Scan") or rows == 0 for how, rows in on_events), (name, read)
            # the 50 events of the tail (and a max()), never the 80,005 of the log
            assert sum(rows for _, rows in on_events) <= 200, (name, read)
        # and the answer is right: the view plus the tail
        row = await conn.fetchrow(
            WINDOW_STATE_SQL, "tag:t1", 1, window.start, window.end, "t1", window.start, 0
        )
        assert row is not None
    finally:
        await conn.close()
