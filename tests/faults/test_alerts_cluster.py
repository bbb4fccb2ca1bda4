"""Threshold alerts exactly once with four gateway processes (each running the
alert workers, one active at a time) and the active one killed mid-way.

The victim is the holder of the alerts projection's own advisory lock (not of
any projection lock, which need not run alerts). Catches (planted once: a
standby that never retries the alerts lock) a standby that does not take the
alerts over, thresholds the victim left unannounced, and a threshold announced
twice across the takeover."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import asyncpg
import openai
import pytest

from projections.runtime import lock_key
from tests.faults.conftest import Row
from tests.faults.facts import caught_up, ledger_facts, verify
from tests.faults.harness import Cluster, http

pytestmark = pytest.mark.faults


async def test_thresholds_once_across_four_processes(cluster: Cluster, report: list[Row]) -> None:
    urls = [await asyncio.to_thread(cluster.start_gateway, i, poll_interval_s="0.2") for i in range(4)]
    http(
        "POST",
        f"{urls[0]}/tag/new",
        {
            "name": "alerted",
            "max_budget": "0.0004",
            "budget_duration": "1d",
            "soft_budget": "0.0001",
            "alert_thresholds": [0.25, 0.5, 0.75, 1.0],
        },
    )
    key = http("POST", f"{urls[0]}/key/generate", {"tags": ["alerted"]})[1]["key"]
    await asyncio.sleep(1.2)
    clients = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=key, max_retries=0) for u in urls]

    async def one(i: int) -> str:
        try:
            await clients[i % 4].chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"a{i}"}], max_tokens=30
            )
            return "ok"
        except openai.RateLimitError:
            return "denied"

    for i in range(12):
        await one(i)
    # kill whichever process holds the alert worker's lock: another takes over
    conn = await asyncpg.connect(cluster.pg.url)
    try:
        # the process holding the alerts projection's own lock (not just any
        # projection's): killing it is what forces a standby to take alerts over
        deadline = time.monotonic() + 30
        while not (
            holder := await conn.fetchval(
                """select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid
                   where l.locktype = 'advisory' and l.classid = 4243 and l.objid = $1 and l.granted
                   and a.application_name like 'ledger-projection-%' limit 1""",
                lock_key("alerts"),
            )
        ):
            assert time.monotonic() < deadline, "no process runs the alerts worker"
            await asyncio.sleep(0.1)
        pids = {p.pid: i for i, p in cluster.gateways.items()}
        holder_pid = int(holder.rsplit("-", 1)[1])
        victim = pids[holder_pid]
        await caught_up(cluster.pg.url)
        before_kill = await conn.fetchval("select count(*) from events where type = 'BudgetThresholdCrossed'")
        await asyncio.to_thread(cluster.kill_gateway, victim)
        survivors_pids = set(pids) - {holder_pid}
        survivors = [c for i, c in enumerate(clients) if i != victim]
        rest = []
        for i in range(40):
            try:
                await survivors[i % len(survivors)].chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"b{i}"}], max_tokens=30
                )
                rest.append("ok")
            except openai.RateLimitError:
                rest.append("denied")
        # a survivor now holds the alerts lock
        deadline = time.monotonic() + 30
        while True:
            new_holder = await conn.fetchval(
                """select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid
                   where l.locktype = 'advisory' and l.classid = 4243 and l.objid = $1 and l.granted
                   and a.application_name like 'ledger-projection-%' limit 1""",
                lock_key("alerts"),
            )
            if new_holder and int(new_holder.rsplit("-", 1)[1]) in survivors_pids:
                break
            assert time.monotonic() < deadline, "no survivor took the alerts worker over"
            await asyncio.sleep(0.1)
        await caught_up(cluster.pg.url)
        rows = await conn.fetch(
            "select stream, count(*) n from events where type = 'BudgetThresholdCrossed' group by stream"
        )
    finally:
        await conn.close()
        for c in clients:
            await c.close()
    streams = {r["stream"]: r["n"] for r in rows}
    assert 0 < before_kill < len(streams)  # the survivor announced what the victim had not
    assert all(n == 1 for n in streams.values())
    suffixes = {s.rsplit(":", 1)[1] for s in streams}
    # reservations stop requests before the last cents are spent, so 1.0 may not be reached
    assert {"soft", "0.25", "0.5", "0.75"} <= suffixes <= {"soft", "0.25", "0.5", "0.75", "1.0"}, suffixes
    facts = await ledger_facts(cluster.pg.url, tag="alerted")
    assert facts.lost == []
    assert facts.dups == []
    assert facts.peak <= Decimal("0.0004")
    await verify(cluster)
    report.append(
        Row.measured(
            "alerts: 4 gateways, active alerts worker killed",
            52,
            facts,
            f"{len(streams)} alerts, each once",
            0,
        )
    )
