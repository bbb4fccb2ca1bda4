"""Scenario 2: a gateway SIGKILLed under load loses nothing it answered; what it
admitted and never settled is swept by another process within the deadline.

Catches (each planted once): a lost ``SpendRecorded`` (an answered request with
no charge in the log), a second terminal event at version 3 (the sweeper not
checking for an ending), a 5xx during the kill, and a sweep slower than the
README's 4 s reservation deadline (plus one 0.5 s sweep interval)."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts, verify
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
        except openai.APIStatusError as e:
            return str(e.status_code)  # an answer: a 5xx here is the gateway's fault
        except (openai.APIConnectionError, openai.APIError):
            return "cut"  # the connection died with the process

    tasks = [asyncio.create_task(guarded(unary(i) if i % 2 else stream(i))) for i in range(120)]
    # some answered, some mid-flight
    while len(completed) < 20 and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    await asyncio.to_thread(cluster.kill_gateway, 0)  # SIGKILL, mid-flight
    killed_at = time.monotonic()
    outcomes = await asyncio.gather(*tasks)
    await sdk.close()
    assert "cut" in outcomes  # the kill really interrupted requests
    errors_5xx = sum(o.startswith("5") for o in outcomes)
    # The README's deadline: a reservation is swept 4 s after its admission (all of
    # them were admitted before the kill), found by a sweep every 0.5 s; 1 s to spare.
    facts = await ledger_facts(cluster.pg.url, completed, quiet_within_s=killed_at + 5.5 - time.monotonic())
    assert facts.lost == [], f"answered but not charged, or never settled: {facts.lost[:5]}"
    assert facts.dups == [], f"settled twice: {facts.dups[:5]}"
    assert facts.expired > 0  # the victim's in-flight requests were swept, charged at their estimate
    assert facts.admitted == facts.spends + facts.expired + facts.released
    assert errors_5xx == 0, outcomes
    await verify(cluster)
    report.append(
        Row.measured(
            "gateway SIGKILLed under load (swept within 4 s + 1 sweep)",
            120,
            facts,
            f"{facts.expired} swept at estimate",
            errors_5xx,
        )
    )
