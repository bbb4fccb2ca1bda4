"""Rate limits (rpm, tpm, parallel requests) checked with the budgets in the
reserve script: all or nothing, given back when a request ends, across
gateways (ledger/counters/limits.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from ledger import events as ev
from ledger.admission import Admitted, BudgetExceeded, RateLimited
from ledger.apikeys import KeyBook, KeyFields
from ledger.counters.limits import minute_of
from ledger.errors import StoreUnavailable
from tests.faults.harness import ADMIN, Cluster, http
from tests.test_counters import WED, Clock, Gateway, GatewayFactory, gateways, with_budget

__all__ = ["gateways"]  # the fixture, used by name


async def with_limits(gw: Gateway, tag: str, **limits: int | str) -> None:
    fields: dict[str, Any] = {k: v for k, v in limits.items() if k != "max_budget"}
    if "max_budget" in limits:
        fields["max_budget"] = Decimal(str(limits["max_budget"]))
        fields["budget_duration"] = "1d"
    await gw.tags.create(tag, ev.TagFields(**fields))
    await gw.refresh()


async def admit(gw: Gateway, rid: str, tags: list[str], est: str = "0.001", tokens: int = 0) -> Any:
    return await gw.admission.admit(rid, tags, Decimal(est), tokens=tokens)


async def denials(gw: Gateway) -> list[ev.RequestDenied]:
    out = []
    for r in await gw.store.read_types(["RequestDenied"], 0, 10_000):
        e = ev.decode(r)
        assert isinstance(e, ev.RequestDenied)
        out.append(e)
    return out


async def test_rpm_admits_the_limit_per_minute_and_says_when_the_minute_ends(
    gateways: GatewayFactory,
) -> None:
    clock = Clock(WED.replace(minute=7, second=10, microsecond=500_000))
    gw = await gateways(clock)
    await with_limits(gw, "slow", rpm_limit=2)
    assert isinstance(await admit(gw, "a", ["slow"]), Admitted)
    assert isinstance(await admit(gw, "b", ["slow"]), Admitted)
    refused = await admit(gw, "c", ["slow"])
    assert isinstance(refused, RateLimited)
    assert (refused.limit.kind, refused.limit.maximum, refused.used) == ("rpm", 2, 2)
    assert refused.retry_after_s == 50  # 49.5 s to the minute's end, rounded up
    [denied] = await denials(gw)
    assert (denied.request_id, denied.reason, denied.subject) == ("c", "rpm_limit", "tag:slow")
    # the next minute admits again
    clock.now = clock.now.replace(minute=8, second=0, microsecond=0)
    assert isinstance(await admit(gw, "d", ["slow"]), Admitted)


async def test_tpm_counts_the_prompt_bound_then_the_actual_tokens(gateways: GatewayFactory) -> None:
    clock = Clock(WED.replace(minute=20, second=0))
    gw = await gateways(clock)
    await with_limits(gw, "t", tpm_limit=100)
    first = await admit(gw, "a", ["t"], tokens=60)
    assert isinstance(first, Admitted)
    second = await admit(gw, "b", ["t"], tokens=60)
    assert isinstance(second, Admitted)  # 60 used < 100: LiteLLM admits below the limit
    refused = await admit(gw, "c", ["t"], tokens=1)
    assert isinstance(refused, RateLimited)
    assert refused.used == 120
    # both end having used 10 tokens each: their bounds are taken back
    await gw.admission.record_spend(first, Decimal("0.001"), prompt_tokens=4, completion_tokens=6)
    await gw.admission.record_spend(second, Decimal("0.001"), prompt_tokens=4, completion_tokens=6)
    await gw.admission.drain()
    key = first.holding.limits[0].key(minute_of(clock.now))  # type: ignore[union-attr]
    assert int(await gw.client.get(key)) == 20
    assert isinstance(await admit(gw, "d", ["t"], tokens=70), Admitted)


async def test_a_request_ending_in_a_later_minute_counts_its_tokens_there(gateways: GatewayFactory) -> None:
    clock = Clock(WED.replace(minute=30, second=59))
    gw = await gateways(clock)
    await with_limits(gw, "t", tpm_limit=1000)
    admitted = await admit(gw, "a", ["t"], tokens=300)
    assert isinstance(admitted, Admitted)
    assert admitted.holding is not None
    [limit] = admitted.holding.limits
    before = limit.key(minute_of(clock.now))
    clock.now += timedelta(seconds=2)
    await gw.admission.record_spend(admitted, Decimal("0.001"), prompt_tokens=100, completion_tokens=400)
    await gw.admission.drain()
    assert int(await gw.client.get(before)) == 0
    assert int(await gw.client.get(limit.key(minute_of(clock.now)))) == 500


async def test_parallel_slots_free_when_requests_end_and_at_a_dead_gateways_deadline(
    gateways: GatewayFactory,
) -> None:
    clock = Clock(WED)
    gw = await gateways(clock, ttl=timedelta(seconds=60))
    await with_limits(gw, "p", max_parallel_requests=2)
    a = await admit(gw, "a", ["p"])
    b = await admit(gw, "b", ["p"])
    assert isinstance(a, Admitted)
    assert isinstance(b, Admitted)
    refused = await admit(gw, "c", ["p"])
    assert isinstance(refused, RateLimited)
    assert (refused.limit.kind, refused.retry_after_s) == ("parallel", 1)
    await gw.admission.release(a, "client_gone")
    await gw.admission.drain()
    c = await admit(gw, "c2", ["p"])
    assert isinstance(c, Admitted)
    # b and c2 never end (their gateway died): their slots free at the deadline
    assert isinstance(await admit(gw, "d", ["p"]), RateLimited)
    clock.now += timedelta(seconds=61)
    assert isinstance(await admit(gw, "e", ["p"]), Admitted)


async def test_limits_and_budgets_admit_all_or_nothing(gateways: GatewayFactory) -> None:
    clock = Clock(WED.replace(minute=40))
    gw = await gateways(clock)
    await with_limits(gw, "slow", rpm_limit=1)
    await with_budget(gw, "money", "0.0015")
    # the budget admits, the limit refuses: nothing reserved on the budget
    assert isinstance(await admit(gw, "a", ["slow"]), Admitted)
    assert isinstance(await admit(gw, "b", ["slow", "money"]), RateLimited)
    assert await gw.counter("money") == (0, 0)
    # the budget refuses, a limit that would admit counts nothing
    await with_limits(gw, "fast", rpm_limit=1)
    assert isinstance(await admit(gw, "c", ["fast", "money"], est="0.002"), BudgetExceeded)
    assert isinstance(await admit(gw, "d", ["fast", "money"], est="0.001"), Admitted)


async def test_limits_of_a_key_a_template_and_a_model(gateways: GatewayFactory) -> None:
    clock = Clock(WED.replace(minute=45))
    gw = await gateways(clock)
    _, made = await KeyBook(gw.store).generate(settings=KeyFields(rpm_limit=1))
    await gw.refresh()
    kh = made.key_hash
    assert isinstance(await gw.admission.admit("k1", [], Decimal("0.001"), key_hash=kh), Admitted)
    assert isinstance(await gw.admission.admit("k2", [], Decimal("0.001"), key_hash=kh), RateLimited)
    # a template gives each tag under it a limit of its own
    await with_limits(gw, "customer:*", rpm_limit=1)
    assert isinstance(await admit(gw, "t1", ["customer:a"]), Admitted)
    assert isinstance(await admit(gw, "t2", ["customer:b"]), Admitted)
    refused = await admit(gw, "t3", ["customer:a"])
    assert isinstance(refused, RateLimited)
    assert refused.limit.subject == "tag:customer:a"


async def test_per_model_settings_alone_are_enforced_under_either_model_name(
    gateways: GatewayFactory,
) -> None:
    """Review finding: a tag, key or end user with model_max_budget and nothing
    else had no spec, so its per-model budgets and limits were never enforced;
    and `mock/gpt-4o-mini` (gpt-4o-mini upstream) missed a budget set under
    `gpt-4o-mini`."""
    clock = Clock(WED.replace(minute=10))
    gw = await gateways(clock)
    per_model = {"gpt-4o-mini": ev.ModelBudget(rpm_limit=1)}
    await gw.tags.create("only-models", ev.TagFields(model_max_budget=per_model))
    await gw.refresh()

    async def go(rid: str, model: str, **kw: Any) -> Any:
        return await gw.admission.admit(
            rid, kw.pop("tags", ["only-models"]), Decimal("0.001"), model=model, **kw
        )

    assert isinstance(await go("m1", "gpt-4o-mini"), Admitted)
    assert isinstance(await go("m2", "gpt-4o-mini"), RateLimited)
    # the provider-prefixed name reaches the same upstream model: same budget
    assert isinstance(await go("m3", "mock/gpt-4o-mini", model_aliases=("gpt-4o-mini",)), RateLimited)
    assert isinstance(await go("m4", "gpt-4o"), Admitted)  # another model: no limit
    # a key with a per-model budget only
    tight = {"gpt-4o": ev.ModelBudget(max_budget=Decimal("0.0015"), budget_duration="1d")}
    _, made = await KeyBook(gw.store).generate(settings=KeyFields(model_max_budget=tight))
    await gw.refresh()
    kh = made.key_hash
    assert isinstance(await go("k1", "gpt-4o", tags=[], key_hash=kh), Admitted)
    assert isinstance(await go("k2", "gpt-4o", tags=[], key_hash=kh), BudgetExceeded)
    assert isinstance(await go("k3", "gpt-4o-mini", tags=[], key_hash=kh), Admitted)


async def test_a_slot_frees_when_the_record_fails_and_an_estimate_charge_keeps_its_tokens(
    gateways: GatewayFactory,
) -> None:
    """Review findings: a terminal append that failed (PostgreSQL away) kept the
    parallel slot until the reservation's deadline (15 min by default); a request
    charged at its estimate (no usage known) counted 0 tokens against tpm."""
    clock = Clock(WED.replace(minute=20))
    gw = await gateways(clock)
    await with_limits(gw, "p", max_parallel_requests=1, tpm_limit=90)
    first = await admit(gw, "a", ["p"], tokens=60)
    assert isinstance(first, Admitted)
    real_append = gw.store.append

    async def away(*args: Any, **kw: Any) -> Any:
        raise StoreUnavailable("PostgreSQL went away")

    gw.store.append = away  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await gw.admission.record_spend(first, Decimal("0.0001"))
    gw.store.append = real_append  # type: ignore[method-assign]
    await gw.admission.drain()
    second = await admit(gw, "b", ["p"], tokens=30)
    assert isinstance(second, Admitted)  # the slot came back at once
    # charged at its estimate: the prompt's bound (30) stays counted, with a's 60
    await gw.admission.record_spend(second, Decimal("0.0001"), usage_source="estimate")
    await gw.admission.drain()
    refused = await admit(gw, "c", ["p"], tokens=20)
    assert isinstance(refused, RateLimited)
    assert refused.limit.kind == "tpm"


async def test_one_request_id_twice_does_not_share_a_slot(gateways: GatewayFactory) -> None:
    """Two attempts under one request id take two slots: the refused duplicate's
    give-back must not free the first attempt's slot."""
    clock = Clock(WED)
    gw = await gateways(clock)
    await with_limits(gw, "p", max_parallel_requests=2)
    first = await admit(gw, "same", ["p"])
    assert isinstance(first, Admitted)
    with pytest.raises(Exception, match="already used"):
        await admit(gw, "same", ["p"])
    await gw.admission.drain()
    assert isinstance(await admit(gw, "other", ["p"]), Admitted)
    assert isinstance(await admit(gw, "third", ["p"]), RateLimited)  # "same" still holds its slot


# ---------------------------------------------------------------- several gateway processes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path).start()
    try:
        for i in range(3):
            c.start_gateway(i)
        yield c
    finally:
        c.stop()


def _clients(cluster: Cluster) -> list[openai.AsyncOpenAI]:
    # max_retries=0: the SDK would otherwise wait out Retry-After and try again
    return [
        openai.AsyncOpenAI(base_url=f"{cluster.url(i)}/v1", api_key=ADMIN, max_retries=0) for i in range(3)
    ]


async def _chat(client: openai.AsyncOpenAI, tag: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            extra_body={"metadata": {"tags": [tag]}},
        )
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return e.status_code, body, dict(e.response.headers)
    return raw.status_code, {}, dict(raw.headers)


def _at_least_seconds_left_in_minute(seconds: int) -> None:
    """A precondition, not a timing assertion: start a burst where one minute holds it."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.2)


async def test_rpm_holds_across_three_gateway_processes(cluster: Cluster) -> None:
    status, _ = http("POST", f"{cluster.url(0)}/tag/new", {"name": "shared", "rpm_limit": 5})
    assert status in (200, 201)
    clients = _clients(cluster)
    _at_least_seconds_left_in_minute(20)
    results = await asyncio.gather(*(_chat(clients[i % 3], "shared") for i in range(30)))
    ok = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    assert (len(ok), len(limited)) == (5, 25), [r[0] for r in results]
    for _, body, headers in limited:
        assert (body.get("type"), body.get("code")) == ("rate_limit_exceeded", "rpm_limit")
        assert "rpm_limit allows 5 requests per minute" in body["message"]
        assert 1 <= int(headers["retry-after"]) <= 60
    for c in clients:
        await c.close()


async def test_parallel_requests_hold_across_three_gateway_processes(cluster: Cluster) -> None:
    """Three streams held open on three gateways fill max_parallel_requests=3; every
    other request, on any gateway, is refused until one of them ends."""
    status, _ = http("POST", f"{cluster.url(0)}/tag/new", {"name": "busy", "max_parallel_requests": 3})
    assert status in (200, 201)
    started = [asyncio.Event() for _ in range(3)]
    stop = asyncio.Event()

    async def hold_stream(session: aiohttp.ClientSession, i: int) -> None:
        body = {
            "model": "gpt-4o-mini",
            "stream": True,
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"tags": ["busy"]},
            "mock": {"chunk_delay_ms": 500},
        }
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with session.post(f"{cluster.url(i)}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            await r.content.readany()
            started[i].set()
            await stop.wait()  # then leave mid-stream: the request is released

    clients = _clients(cluster)
    async with aiohttp.ClientSession() as session:
        holders = [asyncio.ensure_future(hold_stream(session, i)) for i in range(3)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            results = await asyncio.gather(*(_chat(clients[i % 3], "busy") for i in range(9)))
            assert [r[0] for r in results] == [429] * 9
            assert {r[1]["code"] for r in results} == {"max_parallel_requests"}
        finally:
            stop.set()
            await asyncio.gather(*holders, return_exceptions=True)
    # the streams ended: their slots free once each release is recorded
    deadline = time.monotonic() + 10
    while True:
        status, _body, _ = await _chat(clients[1], "busy")
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    for c in clients:
        await c.close()


async def test_a_template_budget_holds_per_customer_across_three_gateway_processes(cluster: Cluster) -> None:
    """`customer:*` gives every customer its own window counter: under 60 concurrent
    requests over three processes, each customer gets exactly what its budget
    reserves; an explicit tag budget overrides the template. The upstream holds
    each answer 3 s, so every reservation is still open when the last one is
    asked for and the arithmetic fixes the admitted count."""
    url = cluster.url(0)
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "metadata": {"tags": ["probe"]},
    }
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200
        rid = r.headers["x-ledger-request-id"]
    conn = await asyncpg.connect(cluster.pg.url)
    try:
        raw = await conn.fetchval(
            "select data->>'estimate' from events where type = 'RequestAdmitted' and stream = $1",
            f"request:{rid}",
        )
    finally:
        await conn.close()
    estimate = Decimal(raw)
    # 4.5 estimates: 4 fit, the fifth does not
    template = {"name": "customer:*", "max_budget": str(estimate * Decimal("4.5")), "budget_duration": "30d"}
    vip = {"name": "customer:vip", "max_budget": str(estimate * Decimal("8.5")), "budget_duration": "30d"}
    for definition in (template, vip):
        status, answer = http("POST", f"{url}/tag/new", definition)
        assert status in (200, 201), answer
    customers = ["customer:a", "customer:b", "customer:vip"]

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[str, int]:
        tag = customers[i % 3]
        payload = {**body, "metadata": {"tags": [tag]}, "mock": {"delay_ms": 3000}}
        async with session.post(
            f"{cluster.url(i % 3)}/v1/chat/completions", json=payload, headers=headers
        ) as r:
            await r.read()
            return tag, r.status

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i) for i in range(60)))
    admitted = {c: sum(1 for t, s in results if t == c and s == 200) for c in customers}
    refused = {c: sum(1 for t, s in results if t == c and s == 429) for c in customers}
    assert admitted == {"customer:a": 4, "customer:b": 4, "customer:vip": 8}, results
    assert refused == {"customer:a": 16, "customer:b": 16, "customer:vip": 12}
    status, info = http("GET", f"{url}/tag/info?names=customer:a,customer:vip")
    assert status == 200
    assert info["customer:a"]["budget_source"] == "customer:*"
    assert info["customer:vip"].get("budget_source") is None
