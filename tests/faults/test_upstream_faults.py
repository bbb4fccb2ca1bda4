"""Scenario 5: upstream faults — slow first byte, mid-stream cut, 5xx, malformed
JSON, huge response. The upstream's own errors release the reservation, the
rest are charged (never free); the client gets a clear error,
and the gateway's memory stays bounded over 1,000 such requests.

Catches: a fault answered with the wrong status or without an error envelope;
an answered (200) request without its ``SpendRecorded``; a request settled twice;
a leak of more than ~8 KB a request (measured growth is 1.6-2.7 MB over 1,000)."""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import Cluster, http

pytestmark = pytest.mark.faults

FAULTS = [
    ({"delay_ms": 1500}, False, 504),  # first byte later than the gateway waits
    ({"cut_after": 3}, True, 200),  # stream cut: an SSE error event after the headers
    ({"cut_after": 40}, False, 502),  # body cut short
    ({"status": 500}, False, 500),  # the upstream's own error, passed through
    ({"status": 503}, True, 503),
    ({"malformed": True}, False, 502),
    ({"huge_bytes": 3_000_000}, False, 502),  # over LEDGER_MAX_RESPONSE_BYTES
]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_upstream_faults_keep_the_books_and_the_memory(cluster: Cluster, report: list[Row]) -> None:
    url = await asyncio.to_thread(
        cluster.start_gateway, 0, upstream_first_byte_timeout_s="0.5", max_response_bytes="1000000"
    )
    http("POST", f"{url}/tag/new", {"name": "faulty", "max_budget": 100, "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"tags": ["faulty"]})[1]["key"]
    pid = cluster.gateways[0].pid
    headers = {"Authorization": f"Bearer {key}"}
    outcomes: Counter[str] = Counter()
    bad: list[str] = []
    answered: list[str] = []

    async def one(http_: aiohttp.ClientSession, i: int) -> None:
        mock, stream, expected = FAULTS[i % len(FAULTS)]
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"f{i}"}],
            "max_tokens": 20,
            "stream": stream,
            "mock": mock,
        }
        async with http_.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            text = await r.text()
            outcomes[str(r.status)] += 1
            if r.status == 200:
                answered.append(r.headers["x-ledger-request-id"])
            if r.status != expected:
                bad.append(f"{mock}: {r.status} {text[:200]}")
            elif stream and r.status == 200:
                if '"error"' not in text:
                    bad.append(f"{mock}: cut stream without an error event")
            elif r.status != 200 and '"error"' not in text:
                bad.append(f"{mock}: {r.status} without an error envelope")

    async def batch(n: int) -> None:
        sem = asyncio.Semaphore(25)
        async with aiohttp.ClientSession() as http_:

            async def guarded(i: int) -> None:
                async with sem:
                    await one(http_, i)

            await asyncio.gather(*(guarded(i) for i in range(n)))

    await batch(140)  # warm up: caches, pools, code paths
    before = rss_kb(pid)
    await batch(1000)
    after = rss_kb(pid)
    assert not bad, bad[:5]
    # every fault kind answered with its own status, in equal shares
    per_kind = 1140 // len(FAULTS)
    assert outcomes["504"] >= per_kind
    assert outcomes["502"] >= 3 * per_kind
    growth_mb = (after - before) / 1024
    assert growth_mb < 8, f"RSS grew {growth_mb:.1f} MB over 1,000 faulty requests"

    # The upstream's own 5xx, or no first byte before the deadline: released. A
    # cut, a malformed or an oversized answer may have been billed upstream:
    # charged (what was counted, else the reserved bound), never free.
    sent = Counter(FAULTS[i % len(FAULTS)][2] for n in (140, 1000) for i in range(n))
    conn = await asyncpg.connect(cluster.pg.url)
    try:
        charged = await conn.fetch(
            "select data->>'usage_source' as source, count(*) as n from events"
            " where type = 'SpendRecorded' group by 1"
        )
    finally:
        await conn.close()
    facts = await ledger_facts(cluster.pg.url, answered, tag="faulty")
    assert facts.admitted == 1140
    assert facts.released == sent[500] + sent[503] + sent[504]
    assert facts.spends == 1140 - facts.released  # every request settled exactly once
    assert facts.lost == []
    assert facts.dups == []
    assert {r["source"] for r in charged} <= {"estimate", "counted_tokenizer", "counted_bytes", "partial"}
    assert facts.charged > 0
    status, info = http("GET", f"{url}/tag/info?names=faulty")
    assert status == 200
    assert (Decimal(str(info["faulty"]["spend"])), info["faulty"]["reserved"]) == (facts.charged, 0)
    await verify(cluster)
    report.append(
        Row.measured(
            f"upstream faults (RSS +{growth_mb:.1f} MB)",
            1140,
            facts,
            f"{facts.charged} / 100",
            sum(v for k, v in outcomes.items() if k.startswith("5")),
        )
    )
