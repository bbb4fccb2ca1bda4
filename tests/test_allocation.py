"""Bills that add up: split allocation by tag dimension, over real HTTP and the real views."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import msgspec
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from gateway.appkeys import ADMISSION, STORE
from ledger.admission import Admitted
from ledger.domain.allocation import UNTAGGED, allocate, split
from ledger.postgres import focus
from ledger.settings import Settings
from projections.replay import replay
from projections.spend import create
from tests.conftest import gateway_app, projected
from tests.test_cli import ledger, table_rows

ADMIN = "test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
_ids = itertools.count()

# Costs as the gateway records them: up to 12 decimal places, from nothing to dollars.
costs = st.decimals(min_value=0, max_value=Decimal(50), places=12, allow_nan=False, allow_infinity=False)
tags = st.lists(
    st.one_of(
        st.sampled_from(["team:a", "team:b", "team:c", "app:x", "app:y", "env:prod", "plain", "vip"]),
        st.builds(lambda v: f"customer:{v}", st.text("abcdef", min_size=1, max_size=3)),
    ),
    max_size=6,
    unique=True,
)
requests = st.lists(st.tuples(costs, tags), max_size=25)


def dimensions(batch: list[tuple[Decimal, list[str]]]) -> set[str]:
    return {t.split(":", 1)[0] for _, ts in batch for t in ts if ":" in t}


# ------------------------------------------------------------------ the arithmetic


@settings(max_examples=500, deadline=None)
@given(costs, st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=9))
def test_shares_sum_exactly_and_differ_by_one_unit_at_most(cost: Decimal, values: list[str]) -> None:
    shares = split(cost, values)
    assert set(shares) == set(values)
    assert sum(shares.values(), Decimal(0)) == cost
    assert max(shares.values()) - min(shares.values()) <= Decimal("1e-9")
    assert split(cost, list(reversed(values))) == shares  # the order tags came in does not matter


@settings(max_examples=300, deadline=None)
@given(requests)
def test_every_dimension_sums_to_the_total(batch: list[tuple[Decimal, list[str]]]) -> None:
    total = sum((c for c, _ in batch), Decimal(0))
    for dimension in dimensions(batch) | {""}:
        rows: dict[str, Decimal] = {}
        for cost, ts in batch:
            shares = {v: s for (d, v), s in allocate(cost, ts).items() if d == dimension}
            for value, share in (shares or {UNTAGGED: cost}).items():
                rows[value] = rows.get(value, Decimal(0)) + share
        assert sum(rows.values(), Decimal(0)) == total


# ------------------------------------------------------------------ through the gateway


@pytest.fixture
async def app(settings: Settings) -> web.Application:
    return gateway_app(msgspec.structs.replace(settings, admin_key=ADMIN))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, app: web.Application) -> TestClient:
    return await aiohttp_client(app)


async def charge(app: web.Application, cost: Decimal, tag_list: list[str], **details: Any) -> None:
    a = await app[ADMISSION].admit(f"alloc-{next(_ids)}", tag_list, Decimal("0.01"), model="m")
    assert isinstance(a, Admitted)
    await app[ADMISSION].record_spend(a, cost, model="m", provider="mock", status=200, **details)


async def db_now(app: web.Application) -> datetime:
    pool: asyncpg.Pool = app[STORE].pool
    moment: datetime = await pool.fetchval("select clock_timestamp()")
    return moment


async def report(client: TestClient, query: str) -> dict[str, Any]:
    r = await client.get(f"/spend/report?{query}", headers=AUTH)
    body: dict[str, Any] = await r.json()
    assert r.status == 200, body
    return body


def q(moment: datetime) -> str:
    return quote(moment.isoformat())


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=requests)
async def test_split_rows_of_every_dimension_sum_to_the_total_spend(
    client: TestClient, app: web.Application, batch: list[tuple[Decimal, list[str]]]
) -> None:
    start = await db_now(app)
    for cost, tag_list in batch:
        await charge(app, cost, tag_list)
    await projected(app)
    end = await db_now(app) + timedelta(microseconds=1)
    span = f"start_date={q(start)}&end_date={q(end)}&interval=month"
    total = sum((c for c, _ in batch), Decimal(0))
    for group_by in [f"tag:{d}" for d in sorted(dimensions(batch) | {"nothing"})] + ["tag&allocation=split"]:
        body = await report(client, f"group_by={group_by}&{span}")
        assert body["allocation"] == "split"
        assert Decimal(str(body["total"])) == total
        assert sum((Decimal(str(r["spend"])) for r in body["rows"]), Decimal(0)) == total, group_by
        assert sum(r["requests"] for r in body["rows"]) >= len(batch)


async def test_split_full_untagged_and_csv(
    client: TestClient, app: web.Application, database_url: str
) -> None:
    start = await db_now(app)
    await charge(app, Decimal("0.000000010"), ["team:a", "team:b", "team:c", "env:prod"])  # 10 nano / 3
    await charge(app, Decimal("0.3"), ["team:a", "app:x"])
    await charge(app, Decimal("0.05"), ["app:x"])
    await charge(app, Decimal("0.007"), [])
    await projected(app)
    span = f"start_date={q(start)}&end_date={q(await db_now(app) + timedelta(seconds=1))}&interval=month"

    body = await report(client, f"group_by=tag:team&{span}")
    rows = {r["group"]: Decimal(str(r["spend"])) for r in body["rows"]}
    # 10 nano-dollars among three teams: 4, 3, 3, the extra unit to the first in order
    assert rows == {
        "a": Decimal("0.3") + Decimal("4e-9"),
        "b": Decimal("3e-9"),
        "c": Decimal("3e-9"),
        UNTAGGED: Decimal("0.057"),
    }
    assert sum(rows.values()) == Decimal(str(body["total"])) == Decimal("0.357000010")

    full = await report(client, f"group_by=tag:team&allocation=full&{span}")
    rows = {r["group"]: Decimal(str(r["spend"])) for r in full["rows"]}
    assert rows == {
        "a": Decimal("0.30000001"),
        "b": Decimal("1e-8"),
        "c": Decimal("1e-8"),
        UNTAGGED: Decimal("0.057"),
    }
    assert sum(rows.values()) > Decimal(str(full["total"]))  # full counts overlap: not a bill

    r = await client.get(f"/spend/report?group_by=tag:app&format=csv&{span}", headers=AUTH)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(await r.text())))
    assert {row["group"]: Decimal(row["spend"]) for row in lines} == {
        "x": Decimal("0.35"),
        UNTAGGED: Decimal("0.007000010"),
    }

    # a replay rebuilds the allocation view to the same rows
    conn = await asyncpg.connect(database_url)
    try:
        query = "select position, dimension, value, share from spend_allocations order by 1, 2, 3"
        before = [tuple(r) for r in await conn.fetch(query)]
        await replay(database_url, create("spend_allocations"))
        assert [tuple(r) for r in await conn.fetch(query)] == before
        assert before
    finally:
        await conn.close()


async def test_trends_compare_with_the_period_before(client: TestClient, app: web.Application) -> None:
    await charge(app, Decimal("0.25"), ["team:a"])
    await charge(app, Decimal("0.5"), ["team:b"])
    await projected(app)
    pool: asyncpg.Pool = app[STORE].pool
    # Move the first charge one day back: the previous period of the same length.
    await pool.execute(
        "update spend_logs set recorded_at = recorded_at - interval '1 day' where 'team:a' = any(tags)"
    )
    await pool.execute(
        "update spend_allocations a set recorded_at = s.recorded_at "
        "from spend_logs s where s.position = a.position"
    )
    now = await db_now(app)
    start, end = now - timedelta(hours=12), now + timedelta(hours=12)
    body = await report(client, f"group_by=tag:team&start_date={q(start)}&end_date={q(end)}")
    groups = {g["group"]: g for g in body["groups"]}
    assert Decimal(str(groups["b"]["spend"])) == Decimal("0.5")
    assert Decimal(str(groups["b"]["previous_spend"])) == 0
    assert groups["b"]["change_pct"] is None
    assert Decimal(str(groups["a"]["spend"])) == 0
    assert Decimal(str(groups["a"]["previous_spend"])) == Decimal("0.25")
    assert Decimal(str(groups["a"]["change"])) == Decimal("-0.25")
    assert Decimal(str(groups["a"]["change_pct"])) == Decimal(-100)
    assert Decimal(str(body["previous_total"])) == Decimal("0.25")
    assert datetime.fromisoformat(body["previous_start"]) == (start - timedelta(days=1)).astimezone(UTC)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("group_by=tag:", "group_by"),
        ("group_by=tag:a:b", "group_by"),
        ("group_by=tag:team&allocation=half", "allocation"),
        ("group_by=tag:team&format=xml", "format"),
    ],
)
async def test_bad_report_parameters_are_400s(client: TestClient, query: str, param: str) -> None:
    r = await client.get(f"/spend/report?{query}", headers=AUTH)
    body = await r.json()
    assert r.status == 400, body
    assert body["error"]["param"] == param


# ------------------------------------------------------------------ FOCUS export and the CLI


async def test_focus_export_sums_to_the_report_and_carries_tags_and_splits(
    client: TestClient, app: web.Application, database_url: str, tmp_path: Path
) -> None:
    start = await db_now(app)
    await charge(app, Decimal("0.000000010"), ["team:a", "team:b", "team:c", "vip"], metadata={"order": 7})
    await charge(app, Decimal("0.3"), ["team:a", "app:x"], metadata={"customer": "=cmd"})
    await charge(app, Decimal("0.007"), [])
    await projected(app)
    end = await db_now(app) + timedelta(seconds=1)
    span = f"start_date={q(start)}&end_date={q(end)}"
    r = await client.get(f"/spend/export?format=focus&{span}", headers=AUTH)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert len(rows) == 3
    assert set(focus.MANDATORY) <= set(rows[0])
    assert {"x_Split_team", "x_Split_app"} <= set(rows[0])
    billed = sum((Decimal(row["BilledCost"]) for row in rows), Decimal(0))
    assert billed == Decimal(str((await report(client, f"group_by=tag:team&{span}"))["total"]))
    assert billed == Decimal("0.307000010")
    for row in rows:
        assert row["BilledCost"] == row["EffectiveCost"] == row["ListCost"] == row["ContractedCost"]
        assert (row["BillingCurrency"], row["ChargeCategory"], row["ServiceName"]) == ("USD", "Usage", "m")
        assert row["BillingPeriodStart"] < row["ChargePeriodStart"] < row["ChargePeriodEnd"]
        assert row["ChargePeriodEnd"] <= row["BillingPeriodEnd"]
        assert row["PricingUnit"] == "Tokens"
    first = next(row for row in rows if row["BilledCost"] == "0.000000010")
    assert json.loads(first["Tags"]) == {"team": "a,b,c", "vip": "", "metadata.order": "7"}
    assert json.loads(first["x_Split_team"]) == {"a": "0.000000004", "b": "0.000000003", "c": "0.000000003"}
    assert json.loads(first["x_Split_app"]) == {UNTAGGED: "0.000000010"}
    second = next(row for row in rows if row["BilledCost"] == "0.3")
    assert json.loads(second["Tags"])["metadata.customer"] == "=cmd"  # JSON inside: not a formula cell
    # each dimension's split columns sum to the same total
    for column in ("x_Split_team", "x_Split_app"):
        shares = [Decimal(v) for row in rows for v in json.loads(row[column]).values()]
        assert sum(shares, Decimal(0)) == billed

    bad = await client.get(f"/spend/export?format=parquet&{span}", headers=AUTH)
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "format"

    # the same dataset as Parquet: typed columns, exact decimals
    r = await client.get(f"/spend/export?format=focus&file=parquet&{span}", headers=AUTH)
    assert r.status == 200, await r.text()
    table = pq.read_table(io.BytesIO(await r.read()))
    assert table.num_rows == 3
    assert str(table.schema.field("BilledCost").type) == "decimal128(38, 18)"
    assert str(table.schema.field("ChargePeriodStart").type) == "timestamp[ms, tz=UTC]"
    assert sum(table.column("BilledCost").to_pylist(), Decimal(0)) == billed
    assert sorted(table.column("x_Split_team").to_pylist()) == sorted(row["x_Split_team"] for row in rows)
    bad = await client.get(f"/spend/export?format=focus&file=xlsx&{span}", headers=AUTH)
    assert (bad.status, (await bad.json())["error"]["param"]) == (400, "file")

    # the CLI writes the same dataset, and reports a dimension with trends
    env = {"LEDGER_DATABASE_URL": database_url}
    out = await asyncio.to_thread(ledger, "export", "--focus", "--since", "1d", env=env)
    assert out.returncode == 0, out.stderr
    cli_rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert sorted(row["BilledCost"] for row in cli_rows) == sorted(row["BilledCost"] for row in rows)
    path = tmp_path / "focus.parquet"
    out = await asyncio.to_thread(
        ledger, "export", "--focus", "--parquet", "--since", "1d", "-o", str(path), env=env
    )
    assert out.returncode == 0, out.stderr
    assert sum(pq.read_table(path).column("BilledCost").to_pylist(), Decimal(0)) == billed
    assert "3 charges" in out.stderr
    shown = await asyncio.to_thread(
        ledger, "report", "--by", "tag:team", "--since", "1d", "--compare", env=env
    )
    assert shown.returncode == 0, shown.stderr
    table = table_rows(shown.stdout)
    assert table["a"][:2] == ["0.300000004", "2"]
    assert table[UNTAGGED][:2] == ["0.007", "1"]
    assert table["total"][0] == "0.307000010"
    assert table["a"][2:] == ["0", "+0.300000004", "—"]  # nothing the day before: no percentage
    assert "rows sum to the total" in shown.stdout
    bad_by = await asyncio.to_thread(ledger, "report", "--by", "tag:", env=env)
    assert bad_by.returncode == 2
