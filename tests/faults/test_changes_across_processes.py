"""Definitions changed in one gateway process take effect in another, and a
request settled after its budget window ended is charged to the window that
admitted it: behaviours no other test covered (issue 18).

Each waits for the change with a deadline (NOTIFY reaches the other process in
milliseconds; a 1 s poll covers a lost notification), never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from ledger.domain.money import to_nanos
from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import FLAT_MODEL, Cluster, http

pytestmark = pytest.mark.faults

ESTIMATE = Decimal("0.001")  # FLAT_MODEL, 100 output tokens: estimate = actual cost


def ask(url: str, key: str, tag: str | None = None, delay_ms: int = 0) -> tuple[int, Any]:
    body: dict[str, Any] = {
        "model": FLAT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "mock": {"completion_tokens": 100, "delay_ms": delay_ms},
    }
    if tag is not None:
        body["tags"] = [tag]
    return http("POST", f"{url}/v1/chat/completions", body, key=key, timeout=30)


async def until_status(url: str, key: str, want: int, tag: str | None = None, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        status, body = await asyncio.to_thread(ask, url, key, tag)
        if status == want:
            if want >= 400:
                assert set(body["error"]) >= {"message", "type", "param", "code"}, body
            return
        assert time.monotonic() < deadline, f"still {status} after {within_s} s, wanted {want}: {body}"
        await asyncio.sleep(0.1)


async def test_a_deleted_key_is_refused_by_another_process(cluster: Cluster) -> None:
    """Catches a key cache that never learns of a deletion made elsewhere."""
    a = await asyncio.to_thread(cluster.start_gateway, 0)
    b = await asyncio.to_thread(cluster.start_gateway, 1)
    key = http("POST", f"{a}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    await until_status(b, key, 200)
    assert http("POST", f"{a}/key/delete", {"keys": [key]})[0] == 200
    await until_status(b, key, 401)
    await asyncio.sleep(1.5)  # and it stays refused after the next poll
    assert (await asyncio.to_thread(ask, b, key))[0] == 401


async def test_a_lowered_budget_denies_in_another_process(cluster: Cluster) -> None:
    """Catches a budget whose limit, once lowered, is not what the counters check."""
    a = await asyncio.to_thread(cluster.start_gateway, 0)
    b = await asyncio.to_thread(cluster.start_gateway, 1)
    http("POST", f"{a}/tag/new", {"name": "shrinks", "max_budget": "1", "budget_duration": "1d"})
    key = http("POST", f"{a}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    await until_status(b, key, 200, "shrinks")
    for _ in range(4):
        assert (await asyncio.to_thread(ask, b, key, "shrinks"))[0] == 200
    # 5 spent; room for half a request more
    assert http("POST", f"{a}/tag/update", {"name": "shrinks", "max_budget": "0.0055"})[0] == 200
    await until_status(b, key, 429, "shrinks")
    facts = await ledger_facts(cluster.pg.url, tag="shrinks")
    assert (facts.admitted, facts.charged) == (5, 5 * ESTIMATE)
    await verify(cluster)


async def test_a_deleted_tag_is_no_longer_enforced(cluster: Cluster) -> None:
    """Catches a deleted tag's budget still refusing requests in another process."""
    a = await asyncio.to_thread(cluster.start_gateway, 0)
    b = await asyncio.to_thread(cluster.start_gateway, 1)
    http("POST", f"{a}/tag/new", {"name": "gone", "max_budget": "0.0015", "budget_duration": "1d"})
    key = http("POST", f"{a}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    await until_status(b, key, 200, "gone")
    assert (await asyncio.to_thread(ask, b, key, "gone"))[0] == 429  # the budget binds
    assert http("POST", f"{a}/tag/delete", {"name": "gone"})[0] == 200
    await until_status(b, key, 200, "gone")
    for _ in range(3):  # and keeps admitting: no budget is left to fill
        assert (await asyncio.to_thread(ask, b, key, "gone"))[0] == 200
    await verify(cluster, counters_at_least=0)


async def test_a_settle_after_the_window_ended_charges_the_admitting_window(cluster: Cluster) -> None:
    """A request admitted in one 6 s window and answered in the next: its cost
    belongs to the window that admitted it, so the next window's budget is whole.
    Catches a charge that misses the admitting window's counter or lands in the
    next one (the ended window's counter is read directly: ``ledger verify``
    compares only windows in force)."""
    url = await asyncio.to_thread(
        cluster.start_gateway,
        0,
        upstream_total_timeout_s="15",
        upstream_first_byte_timeout_s="15",
        reservation_ttl_s="30",
    )
    http("POST", f"{url}/tag/new", {"name": "tick", "max_budget": "0.0015", "budget_duration": "6s"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    while True:  # start early in a window, with time for what follows
        info = http("GET", f"{url}/tag/info?names=tick")[1]["tick"]
        reset_at = datetime.fromisoformat(info["reset_at"])
        left = (reset_at - datetime.now(UTC)).total_seconds()
        if left > 3.5:
            break
        await asyncio.sleep(0.2)
    # answered 1 s after the window ends
    slow = asyncio.create_task(asyncio.to_thread(ask, url, key, "tick", int((left + 1.0) * 1000)))
    while Decimal(str(http("GET", f"{url}/tag/info?names=tick")[1]["tick"]["reserved"])) == 0:
        await asyncio.sleep(0.05)  # admitted: now nothing else fits this window
    assert (await asyncio.to_thread(ask, url, key, "tick"))[0] == 429
    status, _ = await slow
    assert status == 200
    assert datetime.now(UTC) > reset_at
    # the next window: the slow request's cost is not here, so one more fits
    assert (await asyncio.to_thread(ask, url, key, "tick"))[0] == 200
    assert (await asyncio.to_thread(ask, url, key, "tick"))[0] == 429
    facts = await ledger_facts(cluster.pg.url, tag="tick")
    assert facts.lost == []
    assert facts.dups == []
    assert facts.charged == 2 * ESTIMATE
    # the ended window's counter holds the slow request's charge, nothing reserved
    # (ledger verify compares only the windows in force now)
    client = aioredis.Redis.from_url(cluster.redis.url)
    try:
        start = int(reset_at.timestamp()) - 6
        [old] = [
            k async for k in client.scan_iter(match="ledger:{tag:tick}:w:*") if k.endswith(b":%d" % start)
        ]
        spent, reserved = await client.hmget(old, "spent", "reserved")
    finally:
        await client.aclose()
    assert (int(spent or 0), int(reserved or 0)) == (to_nanos(ESTIMATE), 0)
    await verify(cluster, counters_at_least=0)
