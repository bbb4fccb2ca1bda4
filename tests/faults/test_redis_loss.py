"""Scenario 3: Redis flushed, and Redis restarted, under load — under both policies.

Every request costs exactly its estimate (tests/faults/harness.py FLAT_MODEL),
so each budget admits a number of requests fixed by arithmetic, and the budgets
are sized to bind in every row. Catches (planted once: counters rebuilt without
the log's spend after a flush or restart, i.e. a reset budget) any admission
past the budget: the exact admitted count and the log's peak commitment."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal

import openai
import pytest
import redis.asyncio as aioredis

from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts, verify
from tests.faults.harness import FLAT_MODEL, Cluster, http

pytestmark = pytest.mark.faults

MAX_TOKENS = 60
ESTIMATE = Decimal("0.0006")  # 60 output tokens at $10 per million, prompts free


@dataclass
class Load:
    """Client outcomes, and what is in flight right now."""

    results: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    in_flight: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, what: str) -> int:
        return self.results.count(what)


async def load(url: str, key: str, n: int, tag: str, out: Load | None = None, delay_ms: int = 0) -> Load:
    out = out or Load()
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)

    async def one(i: int) -> str:
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=FLAT_MODEL,
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=MAX_TOKENS,
                extra_headers={"x-ledger-tags": tag},
                extra_body={"mock": {"completion_tokens": MAX_TOKENS, "delay_ms": delay_ms}},
            )
            raw.parse()
            out.answered.append(raw.headers["x-ledger-request-id"])
            return "ok"
        except openai.RateLimitError:
            return "denied"
        except openai.APIStatusError as e:
            return str(e.status_code)
        except openai.APIConnectionError:
            return "conn"

    sem = asyncio.Semaphore(10)

    async def limited(i: int) -> None:
        async with sem:
            out.in_flight += 1
            try:
                out.results.append(await one(i))
            finally:
                out.in_flight -= 1
                out.progress.set()

    await asyncio.gather(*(limited(i) for i in range(n)))
    await sdk.close()
    return out


async def test_flushall_under_load_never_resets_a_budget(cluster: Cluster, report: list[Row]) -> None:
    """Three FLUSHALLs, each while requests are in flight and after some of the
    budget was spent: the budget still admits exactly 100."""
    url = await asyncio.to_thread(cluster.start_gateway, 0)
    budget = 100 * ESTIMATE + ESTIMATE / 2
    http("POST", f"{url}/tag/new", {"name": "flushy", "max_budget": str(budget), "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    client = aioredis.Redis.from_url(cluster.redis.url)
    state = Load()
    task = asyncio.create_task(load(url, key, 300, "flushy", state, delay_ms=100))
    flushes: list[tuple[int, int, int]] = []  # (answered before, in flight at the flush, answered after)
    for mark in (20, 45, 70):  # flush after this many answers: mid-way through the budget
        while state.count("ok") < mark:
            state.progress.clear()
            await state.progress.wait()
        flushes.append((state.count("ok"), state.in_flight, 0))
        await client.flushall()
    await task
    await client.aclose()
    for i, (before, in_flight, _) in enumerate(flushes):
        after = state.count("ok") - before
        flushes[i] = (before, in_flight, after)
        assert in_flight > 0, flushes  # the flush hit requests in flight
        assert after > 0, flushes  # and requests were admitted after it
    assert not [r for r in state.results if r not in ("ok", "denied")], set(state.results)
    facts = await ledger_facts(cluster.pg.url, state.answered, tag="flushy")
    assert facts.admitted == state.count("ok") == 100, flushes  # the budget never reset
    assert facts.peak <= budget
    assert facts.charged == 100 * ESTIMATE
    assert facts.lost == []
    assert facts.dups == []
    await verify(cluster)
    report.append(
        Row.measured(
            f"Redis FLUSHALL x3 under load (in flight: {'/'.join(str(f[1]) for f in flushes)})",
            300,
            facts,
            f"{facts.charged} / {budget}",
            sum(r.startswith("5") for r in state.results),
        )
    )


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_restart_under_load(cluster: Cluster, report: list[Row], policy: str) -> None:
    """30 requests before, 30 while Redis is down, 30 after. ``deny``: the budget
    (45 estimates) admits 15 of those after; ``allow``: the 30 admitted without
    Redis are counted once it is back, so the budget (75) again admits 15 after."""
    url = await asyncio.to_thread(cluster.start_gateway, 0, on_redis_down=policy, connect_timeout_s="0.5")
    room = 45 if policy == "deny" else 75
    budget = room * ESTIMATE + ESTIMATE / 2
    http("POST", f"{url}/tag/new", {"name": "steady", "max_budget": str(budget), "budget_duration": "1d"})
    key = http("POST", f"{url}/key/generate", {"allowed_tags": ["*"]})[1]["key"]
    before = await load(url, key, 30, "steady")
    assert set(before.results) == {"ok"}
    port = cluster.redis.port
    await asyncio.to_thread(cluster.redis.stop)
    during = await load(url, key, 30, "steady")
    if policy == "deny":
        assert set(during.results) == {"503"}, during.results
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
        assert set(during.results) == {"ok"}, during.results
    cluster.redis.preferred_port = port
    await asyncio.to_thread(cluster.redis.start)
    await asyncio.sleep(2.5)  # reconnect, and (allow) the reconcile from the log
    after = await load(url, key, 30, "steady")
    # the budget binds after the restart, at exactly the count the log leaves room for
    assert (after.count("ok"), after.count("denied")) == (15, 15), after.results
    answered = before.answered + during.answered + after.answered
    facts = await ledger_facts(cluster.pg.url, answered, tag="steady")
    assert facts.admitted == len(answered)
    assert facts.charged == len(answered) * ESTIMATE
    assert facts.peak <= budget
    assert facts.lost == []
    assert facts.dups == []
    if policy == "deny":
        assert facts.refused_redis_down >= 30  # every refusal is in the log
    else:
        assert facts.admitted - facts.reserved == 30  # every admission without Redis is in the log
    await verify(cluster)
    report.append(
        Row.measured(
            f"Redis restarted under load ({policy})",
            90,
            facts,
            f"{facts.charged} / {budget}",
            sum(r.startswith("5") for r in before.results + during.results + after.results),
        )
    )
