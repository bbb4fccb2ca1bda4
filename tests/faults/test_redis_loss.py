"""Scenario 3: Redis flushed, and Redis restarted, under load — under both policies."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import openai
import pytest
import redis.asyncio as aioredis

from tests.faults.conftest import Row
from tests.faults.harness import Cluster, http

pytestmark = pytest.mark.faults


async def spend_and_counts(url: str, tag: str) -> tuple[Decimal, int, int]:
    conn = await asyncpg.connect(url)
    try:
        spent = await conn.fetchval(
            "select coalesce(sum((data->>'cost')::numeric), 0) from events "
            "where type in ('SpendRecorded', 'ReservationExpired') and data->'tags' ? $1",
            tag,
        )
        refusals = await conn.fetchval(
            "select count(*) from events "
            "where type = 'RequestDenied' and data->>'reason' = 'redis_unavailable'"
        )
        unreserved = await conn.fetchval(
            "select count(*) from events where type = 'RequestAdmitted' and (data->>'unreserved')::bool"
        )
    finally:
        await conn.close()
    return Decimal(spent), int(refusals), int(unreserved)


async def load(url: str, key: str, n: int, tag: str) -> list[str]:
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)

    async def one(i: int) -> str:
        try:
            await sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=60,
                extra_headers={"x-ledger-tags": tag},
            )
            return "ok"
        except openai.RateLimitError:
            return "denied"
        except openai.APIStatusError as e:
            return str(e.status_code)
        except openai.APIConnectionError:
            return "conn"

    sem = asyncio.Semaphore(10)

    async def limited(i: int) -> str:
        async with sem:
            await asyncio.sleep(0.01)
            return await one(i)

    results = await asyncio.gather(*(limited(i) for i in range(n)))
    await sdk.close()
    return results


async def test_flushall_under_load_never_resets_a_budget(cluster: Cluster, report: list[Row]) -> None:
    url = await asyncio.to_thread(cluster.start_gateway, 0)
    budget = Decimal("0.002")
    http("POST", f"{url}/tag/new", {"name": "flushy", "max_budget": str(budget), "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    client = aioredis.Redis.from_url(cluster.redis.url)
    task = asyncio.create_task(load(url, key, 300, "flushy"))
    for _ in range(3):
        await asyncio.sleep(0.4)
        await client.flushall()
    results = await task
    await client.aclose()
    spent, _, _ = await spend_and_counts(cluster.pg.url, "flushy")
    assert "ok" in results
    assert "denied" in results  # the budget filled up despite three flushes
    assert spent <= budget, f"overshoot after FLUSHALL: {spent} > {budget}"
    assert not [r for r in results if r not in ("ok", "denied")]
    report.append(
        Row("Redis FLUSHALL x3 under load", 300, results.count("ok"), f"{spent:.7f} / {budget}", 0, 0, 0)
    )


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_restart_under_load(cluster: Cluster, report: list[Row], policy: str) -> None:
    url = await asyncio.to_thread(cluster.start_gateway, 0, on_redis_down=policy, connect_timeout_s="0.5")
    budget = Decimal("5")
    http("POST", f"{url}/tag/new", {"name": "steady", "max_budget": str(budget), "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    before = await load(url, key, 30, "steady")
    assert set(before) == {"ok"}
    port = cluster.redis.port
    await asyncio.to_thread(cluster.redis.stop)
    during = await load(url, key, 30, "steady")
    if policy == "deny":
        assert set(during) == {"503"}, during
        status, body = http(
            "POST",
            f"{url}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "tags": ["steady"]},
            key=key,
        )
        assert status == 503
        assert "Redis" in body["error"]["message"]
        # a request with no budget needs no counter: it is served while Redis is down
        status, _ = http(
            "POST",
            f"{url}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
            key=key,
        )
        assert status == 200
    else:
        assert set(during) == {"ok"}, during
    cluster.redis.preferred_port = port
    await asyncio.to_thread(cluster.redis.start)
    await asyncio.sleep(2.5)  # reconnect, and (allow) the reconcile from the log
    after = await load(url, key, 30, "steady")
    assert set(after) == {"ok"}, after
    spent, refusals, unreserved = await spend_and_counts(cluster.pg.url, "steady")
    assert spent <= budget
    if policy == "deny":
        assert refusals >= 30  # every refusal is in the log
    else:
        assert unreserved == 30  # every admission without Redis is in the log
    await asyncio.sleep(2.5)  # projections catch up before verify
    verify = await asyncio.to_thread(cluster.ledger, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report.append(
        Row(
            f"Redis restarted under load ({policy})",
            90,
            before.count("ok") + during.count("ok") + after.count("ok"),
            f"{spent:.6f} / {budget}",
            0,
            0,
            during.count("503"),
        )
    )
