"""Scenario 1: four gateway processes, one budget, 400 concurrent SDK requests."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pytest

from tests.faults.conftest import Row
from tests.faults.harness import Cluster, http

pytestmark = pytest.mark.faults


async def test_no_overshoot_across_four_gateway_processes(cluster: Cluster, report: list[Row]) -> None:
    urls = [await asyncio.to_thread(cluster.start_gateway, i) for i in range(4)]
    budget = Decimal("0.0015")  # about 50 of these requests at their actual cost
    status, _ = http(
        "POST", f"{urls[0]}/tag/new", {"name": "shared", "max_budget": str(budget), "budget_duration": "1d"}
    )
    assert status == 200  # LiteLLM's status for /tag/new and /key/generate
    status, made = http("POST", f"{urls[0]}/key/generate", {"tags": ["shared"]})
    assert status == 200  # LiteLLM's status for /tag/new and /key/generate
    await asyncio.sleep(1.2)  # every process has seen the new tag and key (NOTIFY, 1 s poll)
    clients = [
        openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=made["key"], max_retries=0, timeout=60) for u in urls
    ]

    async def one(i: int) -> str:
        try:
            await clients[i % 4].chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"request {i}: " + "words " * (i % 20)}],
                max_tokens=100,
                extra_body={"mock": {"completion_tokens": 20 + i % 40}},  # varies, within max_tokens
            )
            return "ok"
        except openai.RateLimitError:
            return "denied"
        except openai.APIStatusError as e:
            return f"status {e.status_code}"

    results = await asyncio.gather(*(one(i) for i in range(400)))
    for c in clients:
        await c.close()
    admitted = results.count("ok")
    errors = [r for r in results if r not in ("ok", "denied")]
    assert not errors, errors[:5]
    import asyncpg

    conn = await asyncpg.connect(cluster.pg.url)
    try:
        spent = await conn.fetchval(
            "select coalesce(sum((data->>'cost')::numeric), 0) from events "
            "where type = 'SpendRecorded' and data->'tags' ? 'shared'"
        )
        recorded = await conn.fetchval("select count(*) from events where type = 'SpendRecorded'")
    finally:
        await conn.close()
    assert 0 < admitted < 400
    assert recorded == admitted  # every answered request is in the log, once
    assert spent <= budget, f"overshoot: {spent} > {budget}"
    report.append(
        Row(
            "overshoot: 4 gateways, 400 concurrent",
            400,
            admitted,
            f"{spent:.7f} / {budget}",
            0,
            0,
            len(errors),
        )
    )
