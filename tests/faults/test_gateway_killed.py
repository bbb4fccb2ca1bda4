"""Scenario 2: a gateway SIGKILLed under load loses nothing it answered; what it
admitted and never settled is swept by another process within the deadline."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import openai
import pytest

from tests.faults.conftest import Row
from tests.faults.harness import Cluster, http

pytestmark = pytest.mark.faults


async def test_gateway_killed_under_load(cluster: Cluster, report: list[Row]) -> None:
    victim = await asyncio.to_thread(cluster.start_gateway, 0)
    survivor = await asyncio.to_thread(cluster.start_gateway, 1)
    assert (
        http("POST", f"{survivor}/tag/new", {"name": "load", "max_budget": 100, "budget_duration": "1d"})[0]
        == 200  # LiteLLM's /tag/new answers 200
    )
    key = http("POST", f"{survivor}/key/generate", {"tags": ["load"]})[1]["key"]
    await asyncio.sleep(1.2)
    sdk = openai.AsyncOpenAI(base_url=f"{victim}/v1", api_key=key, max_retries=0, timeout=30)
    completed: list[str] = []

    async def unary(i: int) -> None:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"u{i}"}],
            max_tokens=50,
            extra_body={"mock": {"delay_ms": 100 + (i % 10) * 150}},
        )
        raw.parse()
        completed.append(raw.headers["x-ledger-request-id"])

    async def stream(i: int) -> None:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"s{i}"}],
            max_tokens=50,
            stream=True,
            extra_body={"mock": {"completion_tokens": 30, "chunk_delay_ms": 20 + (i % 5) * 20}},
        )
        request_id = raw.headers["x-ledger-request-id"]
        async for _ in raw.parse():
            pass
        completed.append(request_id)

    async def guarded(coro: object) -> str:
        try:
            await coro  # type: ignore[misc]
            return "ok"
        except (openai.APIConnectionError, openai.APIStatusError, openai.APIError):
            return "cut"

    tasks = [asyncio.create_task(guarded(unary(i) if i % 2 else stream(i))) for i in range(120)]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(cluster.kill_gateway, 0)  # SIGKILL, mid-flight
    outcomes = await asyncio.gather(*tasks)
    await sdk.close()
    assert "cut" in outcomes  # the kill really interrupted requests

    conn = await asyncpg.connect(cluster.pg.url)
    try:
        # within the reservation deadline (4 s) plus a sweep, every admission has its ending
        deadline = time.monotonic() + 20
        while True:
            open_ones = await conn.fetchval(
                """select count(*) from events a where a.type = 'RequestAdmitted' and not exists
                   (select 1 from events t where t.stream = a.stream and t.version = 2)"""
            )
            if open_ones == 0:
                break
            assert time.monotonic() < deadline, f"{open_ones} admitted requests never settled"
            await asyncio.sleep(0.5)
        spends = {
            r["rid"]
            for r in await conn.fetch(
                "select data->>'request_id' as rid from events where type = 'SpendRecorded'"
            )
        }
        expired = await conn.fetchval("select count(*) from events where type = 'ReservationExpired'")
        duplicates = await conn.fetchval(
            "select count(*) - count(distinct stream) from events "
            "where version = 2 and stream like 'request:%'"
        )
    finally:
        await conn.close()
    lost = [rid for rid in completed if rid not in spends]
    assert lost == [], f"answered but not recorded: {lost[:5]}"
    assert expired > 0  # the victim's in-flight requests were swept, charged at their estimate
    assert duplicates == 0
    await asyncio.sleep(2.5)  # the survivor's projections catch up
    verify = await asyncio.to_thread(cluster.ledger, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report.append(
        Row(
            "gateway SIGKILLed under load",
            120,
            outcomes.count("ok"),
            f"{expired} swept at estimate",
            len(lost),
            duplicates,
            0,
        )
    )
