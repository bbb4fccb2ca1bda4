"""``ledger replay --all`` swapping every view in while the live projection
workers follow new traffic and readers query the views (issue 18).

Catches: a reader seeing an error or a half-built view during the swap (the
spend it reads never goes backwards), a live worker that loses events applied
around the swap (views = log afterwards, ``ledger verify``)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import aiohttp
import pytest

from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import ADMIN, FLAT_MODEL, Cluster, http

pytestmark = pytest.mark.faults


async def test_replay_swaps_views_under_live_traffic_and_readers(cluster: Cluster) -> None:
    url = await asyncio.to_thread(cluster.start_gateway, 0, poll_interval_s="0.2")
    http("POST", f"{url}/tag/new", {"name": "live", "max_budget": "1000", "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    stop = asyncio.Event()
    answered: list[str] = []
    problems: list[str] = []
    seen: list[Decimal] = []

    async def writer(session: aiohttp.ClientSession) -> None:
        body = {
            "model": FLAT_MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10,
            "tags": ["live"],
            "mock": {"completion_tokens": 10},
        }
        while not stop.is_set():
            async with session.post(
                f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                if r.status != 200:
                    problems.append(f"write {r.status}: {await r.text()}")
                else:
                    answered.append(r.headers["x-ledger-request-id"])

    async def reader(session: aiohttp.ClientSession) -> None:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        while not stop.is_set():
            for path in ("/tag/info?names=live", "/spend/tags", "/spend/logs?limit=5"):
                async with session.get(f"{url}{path}", headers=admin) as r:
                    if r.status != 200:
                        problems.append(f"read {path} {r.status}: {await r.text()}")
                        continue
                    if path.startswith("/tag/info"):
                        spend = Decimal(str((await r.json())["live"]["total_spend"]))
                        if seen and spend < seen[-1]:
                            problems.append(f"total spend went back from {seen[-1]} to {spend}")
                        seen.append(spend)

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(writer(session)) for _ in range(4)]
        tasks += [asyncio.create_task(reader(session)) for _ in range(2)]
        while len(answered) < 50:  # traffic is flowing before the replay starts
            await asyncio.sleep(0.05)
        before, reads = len(answered), len(seen)
        done = await asyncio.to_thread(cluster.ledger, "replay", "--all")
        during, reads = len(answered) - before, len(seen) - reads
        while len(answered) < before + during + 50:  # and keeps flowing after the swap
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
    assert done.returncode == 0, done.stdout + done.stderr
    assert during > 0  # requests were answered while the replay ran
    assert reads > 0  # and the views were read while it swapped them
    assert problems == [], problems[:5]
    facts = await ledger_facts(cluster.pg.url, answered, tag="live")
    assert facts.lost == []
    assert facts.dups == []
    await verify(cluster)  # the views after the swap = a replay of the whole log
