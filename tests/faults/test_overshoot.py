"""Scenario 1: four gateway processes, one budget, 400 concurrent SDK requests.

Catches (planted once: the counter script admitting at twice the budget) any
admission past the budget: every request costs exactly its estimate, so the
budget admits exactly ``budget // estimate`` of them, and the log's peak
commitment never passes the budget."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pytest

from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import Cluster, ask, http

pytestmark = pytest.mark.faults

ESTIMATE = Decimal("0.001")  # 100 output tokens at $10 per million, prompts free


async def test_no_overshoot_across_four_gateway_processes(cluster: Cluster, report: list[Row]) -> None:
    urls = [await asyncio.to_thread(cluster.start_gateway, i) for i in range(4)]
    budget = 50 * ESTIMATE + ESTIMATE / 2  # room for exactly 50
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
    answered: list[str] = []

    async def one(i: int) -> str:
        return await ask(clients[i % 4], i, answered, words=i % 20)

    results = await asyncio.gather(*(one(i) for i in range(400)))
    for c in clients:
        await c.close()
    errors = [r for r in results if r not in ("ok", "denied")]
    assert not errors, errors[:5]
    facts = await ledger_facts(cluster.pg.url, answered, tag="shared")
    assert facts.admitted == results.count("ok") == 50  # the arithmetic fixes it
    assert facts.peak <= budget, f"committed {facts.peak} of {budget}"
    assert facts.charged == 50 * ESTIMATE
    assert facts.denied == results.count("denied") == 350
    assert facts.lost == []
    assert facts.dups == []
    await verify(cluster)
    report.append(
        Row.measured(
            "overshoot: 4 gateways, 400 concurrent",
            400,
            facts,
            f"{facts.charged} / {budget}",
            sum(r.startswith("status 5") for r in results),
        )
    )
