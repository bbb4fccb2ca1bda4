"""Scenario 4: PostgreSQL restarted under load: clear 503s while it is down,
nothing lost or duplicated after, views catch up.

Catches: an answered request whose ``SpendRecorded`` was lost, or an admission
left without an ending, in the outage (lost); a terminal event written twice by
a retried append (dups, any version); views or counters that drift from the log
(``ledger verify``)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import Cluster, http

pytestmark = pytest.mark.faults


async def test_postgres_restart_under_load(cluster: Cluster, report: list[Row]) -> None:
    url = await asyncio.to_thread(cluster.start_gateway, 0, connect_timeout_s="0.5", append_timeout_s="1")
    http("POST", f"{url}/tag/new", {"name": "pg", "max_budget": 5, "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
    answered: list[str] = []
    statuses: list[str] = []
    messages: set[str] = set()
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                raw = await sdk.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"{w}-{i}"}],
                    max_tokens=30,
                    extra_headers={"x-ledger-tags": "pg"},
                )
                raw.parse()
                answered.append(raw.headers["x-ledger-request-id"])
                statuses.append("200")
            except openai.APIStatusError as e:
                statuses.append(str(e.status_code))
                messages.add(e.response.json()["error"]["message"])
            await asyncio.sleep(0.02)

    workers = [asyncio.create_task(worker(w)) for w in range(8)]
    await asyncio.sleep(1.0)
    port = cluster.pg.port
    await asyncio.to_thread(cluster.pg.stop)
    await asyncio.sleep(2.0)
    assert http("GET", f"{url}/health/ready")[0] == 503
    cluster.pg.preferred_port = port
    await asyncio.to_thread(cluster.pg.start)
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.gather(*workers)
    await sdk.close()
    assert "503" in statuses
    assert any("(PostgreSQL) is unavailable" in m for m in messages), messages
    assert statuses[-1] == "200"  # it came back
    assert not [s for s in statuses if s not in ("200", "503")], set(statuses)

    # in-flight admissions are swept 4 s after their admission (0.5 s sweeps)
    facts = await ledger_facts(cluster.pg.url, answered, tag="pg", quiet_within_s=10)
    assert facts.lost == [], facts.lost[:5]
    assert facts.dups == [], facts.dups[:5]
    assert facts.admitted >= statuses.count("200")
    assert facts.peak <= 5
    await verify(cluster)
    report.append(
        Row.measured(
            "PostgreSQL restarted under load",
            len(statuses),
            facts,
            f"{facts.charged:.6f} / 5",
            sum(s.startswith("5") for s in statuses),
        )
    )
