"""The proxy, driven by the official openai SDK (sync, async, streaming) and raw
aiohttp, against the mock upstream, with real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import httpx2 as httpx
import msgspec
import openai
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from gateway.appkeys import BUDGET_BOOK, COUNTERS, KEY_BOOK, SETTINGS, STORE, TAGS, USER_SECRET
from gateway.mock_upstream import REQUESTS, MockConfig, create_mock_app
from ledger import events as ev
from ledger.apikeys import KeyFields
from ledger.domain.money import to_nanos
from ledger.postgres.store import EventStore
from ledger.settings import ProviderConfig, Settings
from tests.conftest import gateway_app
from tests.faults.facts import ledger_facts

ADMIN_KEY = "test-admin-key-0123456789"


@dataclass
class Gateway:
    url: str
    app: web.Application
    mock: web.Application
    key: str  # a client key with tag "key-tag"

    @property
    def store(self) -> EventStore:
        return self.app[STORE]

    clients: list[Any] = dataclasses.field(default_factory=list)

    def sdk(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        key = kw.pop("api_key", self.key)
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, **kw)
        self.clients.append(client)
        return client

    def sync_sdk(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        key = kw.pop("api_key", self.key)
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, **kw)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()

    async def budget(self, tag: str, usd: str, **fields: Any) -> None:
        await self.app[TAGS].create(
            tag, ev.TagFields(max_budget=Decimal(usd), budget_duration="1d", **fields)
        )
        await self.app[BUDGET_BOOK].refresh()

    async def request_events(self, request_id: str) -> list[ev.Event]:
        return [ev.decode(r) for r in await self.store.read_stream(f"request:{request_id}")]

    async def spends(self) -> list[ev.SpendRecorded]:
        out = []
        after = 0
        while batch := await self.store.read_types(["SpendRecorded"], after, 1000):
            out += [e for e in (ev.decode(r) for r in batch) if isinstance(e, ev.SpendRecorded)]
            after = batch[-1].position
        return out

    async def released(self) -> list[ev.RequestReleased]:
        rows = await self.store.read_types(["RequestReleased"], 0, 1000)
        return [e for e in (ev.decode(r) for r in rows) if isinstance(e, ev.RequestReleased)]

    def upstream_requests(self) -> list[dict[str, Any]]:
        return list(self.mock[REQUESTS])


@pytest.fixture
async def gateway(settings: Settings, aiohttp_server: AiohttpServer) -> AsyncIterator[Gateway]:
    mock_app = create_mock_app()
    mock = await aiohttp_server(mock_app)
    provider = ProviderConfig("mock", str(mock.make_url("/v1")).rstrip("/"), price_provider="openai")
    app = gateway_app(
        msgspec.structs.replace(
            settings,
            admin_key=ADMIN_KEY,
            providers=(provider,),
            upstream_first_byte_timeout_s=2.0,
        )
    )
    server = await aiohttp_server(app)
    # a key that may carry any tag (the suite sends many); scopes have tests of their own
    secret, _ = await app[KEY_BOOK].generate(
        key_alias="test", tags=["key-tag"], settings=KeyFields(allowed_tags=["*"])
    )
    gw = Gateway(str(server.make_url("")).rstrip("/"), app, mock_app, secret)
    yield gw
    await gw.close()


CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the ledger."}],
}


# ------------------------------------------------------------------ attribution


async def test_every_attribution_source_lands_in_spend_recorded(gateway: Gateway) -> None:
    sdk = gateway.sync_sdk()
    raw = await asyncio.to_thread(
        sdk.chat.completions.with_raw_response.create,
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        user="ana@example.com",
        extra_body={
            "metadata": {
                "tags": ["team:search", "shared"],
                "spend_logs_metadata": {
                    "customer": "acme",
                    "api_key": "sk-live-0123456789abcdef",
                    "n": 3,
                },
            },
            "tags": ["app:bot"],
        },
        extra_headers={
            "x-ledger-tags": "env:prod ,  shared",
            "x-litellm-tags": "legacy",
            "x-litellm-spend-logs-metadata": '{"region": "eu", "note": "Bearer abc.def.ghi"}',
        },
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    request_id = raw.headers["x-ledger-request-id"]
    cost = Decimal(raw.headers["x-ledger-cost"])
    assert cost > 0
    events = await gateway.request_events(request_id)
    assert [type(e).__name__ for e in events] == ["RequestAdmitted", "SpendRecorded"]
    spend = events[1]
    assert isinstance(spend, ev.SpendRecorded)
    assert spend.tags == ["key-tag", "env:prod", "shared", "legacy", "team:search", "app:bot"]
    assert spend.metadata == {
        "region": "eu",
        "note": "[REDACTED]",
        "customer": "acme",
        "api_key": "[REDACTED]",
        "n": 3,
    }
    secret = gateway.app[USER_SECRET]
    assert spend.user_hash == hmac.new(secret, b"ana@example.com", hashlib.sha256).hexdigest()
    assert spend.cost == cost
    assert (spend.prompt_tokens, spend.completion_tokens) == (
        completion.usage.prompt_tokens,  # type: ignore[union-attr]
        completion.usage.completion_tokens,  # type: ignore[union-attr]
    )
    assert (spend.model, spend.provider, spend.status, spend.streamed) == (
        "gpt-4o-mini",
        "mock",
        200,
        False,
    )
    # nothing raw was stored
    rows = await gateway.store.read_stream(f"request:{request_id}")
    stored = " ".join(r.data for r in rows)
    assert "ana@example.com" not in stored
    assert "sk-live" not in stored
    assert "Bearer" not in stored
    # attribution fields never reach the upstream; the rest passes unchanged
    sent = gateway.upstream_requests()[-1]["body"]
    assert "tags" not in sent
    assert "metadata" not in sent
    assert sent["user"] == "ana@example.com"
    assert sent["messages"] == [{"role": "user", "content": "hello"}]
    headers = {k.lower() for k in gateway.upstream_requests()[-1]["headers"]}
    assert not any(h.startswith(("x-ledger", "x-litellm")) for h in headers)


async def test_litellm_shapes_string_tags_and_nested_metadata_redacted_at_every_level(
    gateway: Gateway,
) -> None:
    """LiteLLM accepts `metadata.tags` as one comma-separated string and nested
    spend_logs_metadata; a secret two levels down is redacted like one at the top."""
    body = {
        **CHAT,
        "metadata": {
            "tags": "team:search, app:bot",
            "spend_logs_metadata": {
                "order": {"id": 7, "lines": [{"sku": "a"}, {"token": "t0p-s3cret"}]},
                "auth": {"key": "x"},
                "notes": ["ok", "Bearer abc.def.ghi"],
            },
        },
    }
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {gateway.key}"},
        )
        assert r.status == 200, await r.text()
        request_id = r.headers["x-ledger-request-id"]
    events = await gateway.request_events(request_id)
    spend = events[-1]
    assert isinstance(spend, ev.SpendRecorded)
    assert spend.tags == ["key-tag", "team:search", "app:bot"]
    assert spend.metadata == {
        "order": {"id": 7, "lines": [{"sku": "a"}, {"token": "[REDACTED]"}]},
        "auth": "[REDACTED]",
        "notes": ["ok", "[REDACTED]"],
    }
    rows = await gateway.store.read_stream(f"request:{request_id}")
    stored = " ".join(r.data for r in rows)
    assert "t0p-s3cret" not in stored
    assert "Bearer" not in stored


async def test_other_metadata_keys_pass_upstream(gateway: Gateway) -> None:
    await gateway.sdk().chat.completions.create(
        **CHAT, extra_body={"metadata": {"tags": ["a"], "purpose": "eval"}}
    )
    assert gateway.upstream_requests()[-1]["body"]["metadata"] == {"purpose": "eval"}


# ------------------------------------------------------------------ budgets


async def test_budget_of_one_cent_under_200_concurrent_requests(gateway: Gateway) -> None:
    """Catches (planted once: counters admitting at twice the limit) admission past
    the budget, judged on what was reserved, not on the 3-9x smaller actual cost."""
    await gateway.budget("cent", "0.01")
    attempts = 0

    async def count(_: httpx.Request) -> None:
        nonlocal attempts
        attempts += 1

    http = httpx.AsyncClient(
        event_hooks={"request": [count]}, timeout=60, limits=httpx.Limits(max_connections=200)
    )
    sdk = gateway.sdk(max_retries=3, http_client=http)

    async def one(i: int) -> tuple[str, Any]:
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"request {i} " + "x" * 200}],
                max_tokens=400,
                extra_headers={"x-ledger-tags": "cent"},
            )
            return "ok", raw.headers
        except openai.RateLimitError as e:
            return "denied", e

    results = await asyncio.gather(*(one(i) for i in range(200)))
    await http.aclose()
    admitted = [r for kind, r in results if kind == "ok"]
    denied = [r for kind, r in results if kind == "denied"]
    assert admitted
    assert denied
    assert attempts == 200  # the SDK did not retry a single 429
    for err in denied:
        assert err.status_code == 429
        assert err.response.headers["x-should-retry"] == "false"
        assert int(err.response.headers["retry-after"]) > 0
        body = err.response.json()["error"]
        assert (body["type"], body["tag"], body["max_budget"]) == (
            "budget_exceeded",
            "cent",
            "0.01",
        )
        assert body["reset_at"]
    # What was reserved is what the budget bounds (actual spend is 3-9x below it):
    # replaying the log, the commitment (charged + still reserved) at every
    # admission stayed within $0.01, and the budget was not refused early.
    facts = await ledger_facts(gateway.app[SETTINGS].database_url or "", tag="cent", quiet_within_s=0)
    assert facts.admitted == len(admitted)
    assert facts.peak <= Decimal("0.01"), f"committed {facts.peak} of 0.01"
    admissions = await gateway.store.read_types(["RequestAdmitted"], 0, 1000)
    largest = max(e.estimate for e in (ev.decode(r) for r in admissions) if isinstance(e, ev.RequestAdmitted))
    assert len(admitted) >= Decimal("0.01") // largest
    assert facts.charged <= Decimal("0.01")
    denials = await gateway.store.read_types(["RequestDenied"], 0, 1000)
    assert len(denials) == len(denied)
    # the header reports what the tightest budget has left
    assert all("x-ledger-budget-remaining" in h for h in admitted)


async def test_a_request_without_an_output_cap_cannot_cost_more_than_it_reserved(gateway: Gateway) -> None:
    """Reproduction of issue 10 item 3: with no max_tokens the upstream once produced far more
    than the estimate assumed ($0.06 on a $0.01 budget). The gateway now forwards its cap."""
    await gateway.budget("capped", "0.01")
    raw = await gateway.sdk().chat.completions.with_raw_response.create(
        **CHAT,
        extra_headers={"x-ledger-tags": "capped"},
        extra_body={"mock": {"completion_tokens": 1_000_000}},
    )
    forwarded = gateway.upstream_requests()[-1]["body"]
    assert forwarded["max_completion_tokens"] == gateway.app[SETTINGS].default_max_tokens
    [admitted, spent] = await gateway.request_events(raw.headers["x-ledger-request-id"])
    assert isinstance(admitted, ev.RequestAdmitted)
    assert isinstance(spent, ev.SpendRecorded)
    assert spent.completion_tokens == gateway.app[SETTINGS].default_max_tokens
    assert spent.cost <= admitted.estimate <= Decimal("0.01")
    # without a budget nothing is injected: the client's request goes as it was sent
    await gateway.sdk().chat.completions.create(**CHAT)
    assert "max_completion_tokens" not in gateway.upstream_requests()[-1]["body"]


async def test_output_fields_the_bound_cannot_trust_are_400s(gateway: Gateway) -> None:
    for field, value in [("max_tokens", 2.5), ("n", 500), ("max_completion_tokens", -3)]:
        with pytest.raises(openai.BadRequestError) as caught:
            await gateway.sdk().chat.completions.create(**CHAT, extra_body={field: value})
        assert caught.value.body["param"] == field  # type: ignore[index]


async def test_models_restrictions(gateway: Gateway) -> None:
    secret, _ = await gateway.app[KEY_BOOK].generate(allowed_models=["gpt-4o"])
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        await gateway.sdk(api_key=secret).chat.completions.create(**CHAT)
    await gateway.app[TAGS].create("limited", ev.TagFields(models=["gpt-4o"]))
    await gateway.app[BUDGET_BOOK].refresh()
    with pytest.raises(openai.PermissionDeniedError, match="tag 'limited'"):
        await gateway.sdk().chat.completions.create(**CHAT, extra_headers={"x-ledger-tags": "limited"})
    ok = await gateway.sdk().chat.completions.create(
        model="gpt-4o", messages=CHAT["messages"], extra_headers={"x-ledger-tags": "limited"}
    )
    assert ok.model == "gpt-4o"


async def test_unpriced_models(gateway: Gateway) -> None:
    made = await gateway.sdk().chat.completions.with_raw_response.create(
        model="house-model-x", messages=CHAT["messages"]
    )
    [spend] = [
        e
        for e in await gateway.request_events(made.headers["x-ledger-request-id"])
        if isinstance(e, ev.SpendRecorded)
    ]
    assert (spend.cost, spend.unpriced) == (0, True)
    await gateway.budget("priced-only", "1")
    with pytest.raises(openai.BadRequestError, match="no known price"):
        await gateway.sdk().chat.completions.create(
            model="house-model-x",
            messages=CHAT["messages"],
            extra_headers={"x-ledger-tags": "priced-only"},
        )


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("openai/gpt-4o", "openai"),
        ("anthropic/claude-sonnet-4-5", "anthropic"),
        ("google/gemini-2.5-pro", "google"),
    ],
)
async def test_provider_prefixed_ids_are_priced_behind_any_upstream(
    gateway: Gateway, model: str, provider: str
) -> None:
    """Issue 13 item 3: `openai/gpt-4o` had no price unless a provider named `openai`
    was configured, so any budgeted request with it was a 400."""
    await gateway.budget("prefixed", "1")
    raw = await gateway.sdk().chat.completions.with_raw_response.create(
        model=model, messages=CHAT["messages"], extra_headers={"x-ledger-tags": "prefixed"}
    )
    [_, spend] = await gateway.request_events(raw.headers["x-ledger-request-id"])
    assert isinstance(spend, ev.SpendRecorded)
    assert spend.cost > 0
    assert not spend.unpriced
    assert gateway.upstream_requests()[-1]["body"]["model"] == model  # forwarded as named


async def test_unpriced_model_errors_say_which_names_are_priced_and_models_lists_prices(
    gateway: Gateway,
) -> None:
    await gateway.budget("priced-only", "1")
    with pytest.raises(openai.BadRequestError, match="priced names like it: gpt-4o-mini") as caught:
        await gateway.sdk().chat.completions.create(
            model="gpt-4o-minii", messages=CHAT["messages"], extra_headers={"x-ledger-tags": "priced-only"}
        )
    assert caught.value.body["code"] == "unpriced_model"  # type: ignore[index]
    listed = {m.id: m for m in (await gateway.sdk().models.list()).data}
    assert listed["gpt-4o-mini"].priced is True  # type: ignore[attr-defined]
    assert Decimal(listed["gpt-4o-mini"].pricing["prompt"]) == Decimal("0.15") / 1_000_000  # type: ignore[attr-defined]


# ------------------------------------------------------------------ routes


async def test_completions_embeddings_models_and_prefixed_routing(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    text = await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=5)
    assert text.choices[0].text
    emb = await sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2
    models = await sdk.models.list()
    assert "gpt-4o-mini" in [m.id for m in models.data]
    routed = await sdk.chat.completions.create(model="mock/gpt-4o-mini", messages=CHAT["messages"])
    assert routed.model == "gpt-4o-mini"
    assert gateway.upstream_requests()[-1]["body"]["model"] == "gpt-4o-mini"
    spends = await gateway.spends()
    assert {s.model for s in spends} >= {
        "gpt-3.5-turbo-instruct",
        "text-embedding-3-small",
        "mock/gpt-4o-mini",
    }
    assert all(s.cost > 0 for s in spends)
    # the same routes without /v1
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {gateway.key}"},
        )
        assert r.status == 200


# ------------------------------------------------------------------ streaming


async def test_stream_hides_the_usage_chunk_and_is_byte_identical(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {gateway.key}"},
        )
        assert r.status == 200
        received = (await r.read()).decode()
        request_id = r.headers["x-ledger-request-id"]
    sent = gateway.upstream_requests()[-1]["sent"]
    usage_frames = [f for f in sent if '"choices":[]' in f]
    assert len(usage_frames) == 1
    spend = (await gateway.request_events(request_id))[1]
    assert isinstance(spend, ev.SpendRecorded)
    # every frame as sent, but the usage chunk; the cost as an SSE comment before [DONE]
    passed = [f for f in sent if f not in usage_frames]
    comment = f": ledger cost={spend.cost} request_id={request_id}\n"
    assert received == "".join(passed[:-1]) + comment + passed[-1]
    assert spend.streamed
    usage = msgspec.json.decode(usage_frames[0].removeprefix("data: "))["usage"]
    assert (spend.prompt_tokens, spend.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def test_stream_with_usage_requested_through_the_sdk(gateway: Gateway) -> None:
    stream = await gateway.sdk().chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    # the exact cost of the request, as OpenRouter puts it: in the usage object
    [spend] = await gateway.spends()  # the only request of this test
    assert Decimal(chunks[-1].usage.cost) == spend.cost  # type: ignore[attr-defined]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    sent = gateway.upstream_requests()[-1]["sent"]
    assert len(chunks) == len(sent) - 1  # every frame but [DONE]


async def test_client_disconnect_mid_stream_is_charged_partially(gateway: Gateway) -> None:
    body = {**CHAT, "stream": True, "mock": {"completion_tokens": 60, "chunk_delay_ms": 30}}
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {gateway.key}"},
        )
        request_id = r.headers["x-ledger-request-id"]
        got = 0
        async for _ in r.content.iter_any():
            got += 1
            if got >= 5:
                break
        r.close()
    for _ in range(100):
        events = await gateway.request_events(request_id)
        if len(events) == 2:
            break
        await asyncio.sleep(0.1)
    spend = events[1]
    assert isinstance(spend, ev.SpendRecorded)
    assert (spend.status, spend.usage_source) == (499, "partial")
    assert 1 <= spend.completion_tokens < 60
    assert 0 < spend.cost < events[0].estimate  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    assert len(gateway.upstream_requests()[-1]["sent"]) < 60  # the upstream call was cut off too


@pytest.mark.parametrize(
    ("mock", "source"),
    [({"cut_after": 12}, "counted_tokenizer"), ({"no_usage": True}, "counted_tokenizer")],
)
async def test_a_stream_without_usage_is_charged_for_what_it_produced(
    gateway: Gateway, mock: dict[str, Any], source: str
) -> None:
    """Issue 11 item 4: a stream cut before its usage chunk (or from an upstream that
    ignores include_usage) was recorded as released, cost 0."""
    await gateway.budget("streams", "5")
    body = {**CHAT, "stream": True, "mock": {"completion_tokens": 40, **mock}}
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {gateway.key}", "x-ledger-tags": "streams"},
        )
        received = (await r.read()).decode()
        request_id = r.headers["x-ledger-request-id"]
    [admitted, spend] = await gateway.request_events(request_id)
    assert isinstance(admitted, ev.RequestAdmitted)
    assert isinstance(spend, ev.SpendRecorded)
    assert spend.usage_source == source
    words = [f for f in gateway.upstream_requests()[-1]["sent"] if '"content":' in f and '"role"' not in f]
    assert spend.completion_tokens >= len(words) > 0  # at least one token per word streamed
    assert 0 < spend.cost <= admitted.estimate
    assert f": ledger cost={spend.cost}" in received
    [b] = gateway.app[BUDGET_BOOK].budgets_for(["streams"], datetime.now(UTC))
    for _ in range(50):  # the settle runs after the response
        counter = await gateway.app[COUNTERS].read(b)
        if counter.reserved_nanos == 0:
            break
        await asyncio.sleep(0.05)
    assert (counter.spent_nanos, counter.reserved_nanos) == (to_nanos(spend.cost), 0)


# ------------------------------------------------------------------ upstream faults


@pytest.mark.parametrize(
    ("mock", "stream", "error", "reason"),
    [
        ({"status": 500}, False, openai.InternalServerError, "upstream_status_500"),
        ({"delay_ms": 3000}, False, openai.APIStatusError, "upstream_timeout"),
        ({"cut_after": 0}, True, openai.APIError, "upstream_cut"),
        ({"status": 503}, True, openai.APIStatusError, "upstream_status_503"),
    ],
)
async def test_upstream_failures_release_and_record(
    gateway: Gateway, mock: dict[str, Any], stream: bool, error: type[Exception], reason: str
) -> None:
    await gateway.budget("guarded", "5")
    sdk = gateway.sdk()

    async def call() -> None:
        result = await sdk.chat.completions.create(
            **CHAT,
            stream=stream,
            extra_body={"mock": mock},
            extra_headers={"x-ledger-tags": "guarded"},
        )
        if stream:
            async for _ in result:  # type: ignore[union-attr]
                pass

    with pytest.raises(error):
        await call()
    [released] = await gateway.released()
    assert released.reason == reason
    [b] = gateway.app[BUDGET_BOOK].budgets_for(["guarded"], datetime.now(UTC))
    spend = await gateway.app[COUNTERS].read(b)
    assert (spend.spent_nanos, spend.reserved_nanos) == (0, 0)


# ------------------------------------------------------------------ bad input and auth


async def test_model_names_are_bounded(gateway: Gateway) -> None:
    """Issue 11 items 1 and 3: a 3,000-character model name stalled a projection; 2 MB
    names grew memory without bound."""
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.sdk().chat.completions.create(**{**CHAT, "model": "m" * 257})
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await gateway.sdk().chat.completions.create(**{**CHAT, "model": "m" * 2_000_000})


async def test_an_upstream_refusing_the_gateways_key_on_models_is_a_502(
    settings: Settings, aiohttp_server: AiohttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 item 11: /v1/models passed an upstream 401 body through as is."""
    mock = await aiohttp_server(create_mock_app(MockConfig(api_key="the-right-key")))
    monkeypatch.setenv("MOCK_KEY", "a-wrong-key")
    provider = ProviderConfig("mock", str(mock.make_url("/v1")).rstrip("/"), api_key_env="MOCK_KEY")
    app = gateway_app(msgspec.structs.replace(settings, admin_key=ADMIN_KEY, providers=(provider,)))
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        r = await http.get(server.make_url("/v1/models"), headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        body = await r.json()
    assert r.status == 502
    assert body["error"]["code"] == "upstream_auth"
    assert "mock upstream" not in str(body)


async def test_authentication(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        await gateway.sdk(api_key="sk-ledger-not-a-real-key").chat.completions.create(**CHAT)
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{gateway.url}/v1/chat/completions", json=CHAT)
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "missing_api_key"
    # the admin key works as a key without bound tags
    ok = await gateway.sdk(api_key=ADMIN_KEY).chat.completions.create(**CHAT)
    assert ok.choices


BAD_ATTRIBUTION: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    ("tags not a list", {"tags": 5}, {}, "tags"),
    ("template name as a tag", {"tags": ["customer:*"]}, {}, "tags"),
    ("key scope wildcard as a tag", {}, {"x-ledger-tags": "a,*"}, "header x-ledger-tags"),
    ("tag not a string", {"tags": ["a", 3]}, {}, "tags"),
    ("metadata.tags not a list", {"metadata": {"tags": {"a": 1}}}, {}, "metadata.tags"),
    ("empty tag", {"tags": ["  "]}, {}, "tags"),
    ("NUL in tag", {"tags": ["a\x00b"]}, {}, "tags"),
    ("tag too long", {"tags": ["x" * 257]}, {}, "tags"),
    ("too many tags", {"tags": [f"t{i}" for i in range(65)]}, {}, "tags"),
    ("metadata not an object", {"metadata": "x"}, {}, "metadata"),
    (
        "metadata nested too deep",
        {"metadata": {"spend_logs_metadata": {"a": {"b": {"c": {"d": {"e": 1}}}}}}},
        {},
        "metadata.spend_logs_metadata",
    ),
    (
        "metadata too large",
        {"metadata": {"spend_logs_metadata": {"a": "x" * 17000}}},
        {},
        "metadata.spend_logs_metadata",
    ),
    ("user not a string", {"user": 42}, {}, "user"),
    (
        "NUL in metadata",
        {"metadata": {"spend_logs_metadata": {"k": "a\x00b"}}},
        {},
        "metadata.spend_logs_metadata",
    ),
    (
        "header JSON invalid",
        {},
        {"x-ledger-spend-logs-metadata": "{oops"},
        "x-ledger-spend-logs-metadata",
    ),
    (
        "header JSON not an object",
        {},
        {"x-litellm-spend-logs-metadata": "[1]"},
        "header x-litellm-spend-logs-metadata",
    ),
    (
        "too many header tags",
        {},
        {"x-ledger-tags": ",".join(f"t{i}" for i in range(65))},
        "x-ledger-tags",
    ),
]


@pytest.mark.parametrize(
    ("what", "extra", "headers", "param"), BAD_ATTRIBUTION, ids=[b[0] for b in BAD_ATTRIBUTION]
)
async def test_malformed_attribution_is_a_400(
    gateway: Gateway, what: str, extra: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={**CHAT, **extra},
            headers={"Authorization": f"Bearer {gateway.key}", **headers},
        )
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["param"] == param
    assert error["code"] == "invalid_attribution"
    assert await gateway.store.read_types(["RequestAdmitted"], 0, 10) == []  # nothing admitted


async def test_a_body_over_a_mebibyte_is_forwarded(gateway: Gateway) -> None:
    """Found by the hostile review: a body over 1 MiB was forwarded as raw bytes,
    which aiohttp warns about (a 500 where warnings are errors, as here)."""
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (1536 * 1024)}]}
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gateway.url}/v1/chat/completions",
            data=io.BytesIO(json.dumps(big).encode()),
            headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
        )
        assert r.status == 200, await r.text()
    sent = gateway.upstream_requests()[-1]["body"]
    assert len(sent["messages"][0]["content"]) == 1536 * 1024


async def test_a_header_that_is_not_utf8_is_a_400(gateway: Gateway) -> None:
    """Review finding: a non-UTF-8 byte in the metadata header was a 500."""
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(CHAT).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {gateway.key}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + b'x-ledger-spend-logs-metadata: {"k": "\xff\xfe"}\r\n'
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"400", answer[:500]
    assert b"x-ledger-spend-logs-metadata" in rest


async def test_bad_bodies(gateway: Gateway) -> None:
    auth = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        big = b'{"model": "gpt-4o-mini", "messages": [], "x": "' + b"a" * (9 * 1024 * 1024) + b'"}'
        r = await http.post(f"{gateway.url}/v1/chat/completions", data=io.BytesIO(big), headers=auth)
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "request_too_large"
        for raw, fragment in (
            (b"{nope", "not valid JSON"),
            (b"[1]", "JSON object"),
            (b'{"messages": []}', "model is required"),
        ):
            r = await http.post(f"{gateway.url}/v1/chat/completions", data=raw, headers=auth)
            assert r.status == 400
            assert fragment in (await r.json())["error"]["message"]


async def test_same_request_id_is_never_charged_twice(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    headers = {"x-request-id": "client-retry-123"}
    first = await sdk.chat.completions.with_raw_response.create(**CHAT, extra_headers=headers)
    scoped = first.headers["x-ledger-request-id"]
    assert scoped.endswith(":client-retry-123")
    with pytest.raises(openai.ConflictError) as info:
        await sdk.chat.completions.create(**CHAT, extra_headers=headers)
    assert info.value.response.headers["x-should-retry"] == "false"
    spends = [s for s in await gateway.spends() if s.request_id == scoped]
    assert len(spends) == 1


async def test_a_key_can_neither_charge_nor_read_a_tag_outside_its_scope(gateway: Gateway) -> None:
    """Issue 11 item 2: any client key could charge, reserve or read any tag: billed
    to team:victim, its budget and reset time revealed by 429s, its models by 403s."""
    await gateway.budget("team:victim", "0.00001", models=["gpt-4o"])
    attacker, key = await gateway.app[KEY_BOOK].generate(key_alias="attacker", tags=["team:attacker"])
    assert key.allowed_tags == ("team:attacker", "team:attacker:*")  # the default: its own tags
    sdk = gateway.sdk(api_key=attacker)
    for sneak in (
        {"extra_headers": {"x-ledger-tags": "team:victim"}},
        {"extra_body": {"metadata": {"tags": ["team:victim"]}}},
        {"extra_body": {"tags": ["team:victim"]}},
    ):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await sdk.chat.completions.create(**CHAT, max_tokens=900, **sneak)  # type: ignore[arg-type]
        text = str(caught.value.body)
        assert "team:victim" in text
        for secret_of_the_victim in ("0.00001", "gpt-4o", "reset"):
            assert secret_of_the_victim not in text
    # nothing was reserved, charged or denied on the victim's tag
    assert not [s for s in await gateway.spends() if "team:victim" in s.tags]
    assert await gateway.store.read_types(["RequestAdmitted", "RequestDenied"], 0, 10) == []
    [b] = gateway.app[BUDGET_BOOK].budgets_for(["team:victim"], datetime.now(UTC))
    assert (await gateway.app[COUNTERS].read(b)).reserved_nanos == 0
    # its own tags, and those under them, are fine
    await sdk.chat.completions.create(**CHAT, extra_headers={"x-ledger-tags": "team:attacker:bot"})
    # an admin can scope a key to patterns
    wide, _ = await gateway.app[KEY_BOOK].generate(settings=KeyFields(allowed_tags=["team:*"]))
    await gateway.sdk(api_key=wide).chat.completions.create(
        **CHAT, extra_headers={"x-ledger-tags": "team:other"}
    )
    with pytest.raises(openai.PermissionDeniedError):
        await gateway.sdk(api_key=wide).chat.completions.create(
            **CHAT, extra_headers={"x-ledger-tags": "app:x"}
        )


async def test_a_tag_outside_the_keys_scope_is_refused_before_routing(
    settings: Settings, aiohttp_server: AiohttpServer
) -> None:
    """The scope answers first: with no upstream configured, a tag outside the key's
    scope is still a 403 naming the tag, not a 503 about routing."""
    app = gateway_app(msgspec.structs.replace(settings, admin_key=ADMIN_KEY, providers=()))
    server = await aiohttp_server(app)
    raw, _ = await app[KEY_BOOK].generate(key_alias="scoped", tags=["team:a"])
    async with aiohttp.ClientSession() as http:
        for tags, status, code in (("team:b", 403, "tag_not_allowed"), ("team:a", 503, "no_upstream")):
            r = await http.post(
                server.make_url("/v1/chat/completions"),
                json=CHAT,
                headers={"Authorization": f"Bearer {raw}", "x-ledger-tags": tags},
            )
            assert (r.status, (await r.json())["error"]["code"]) == (status, code)


async def test_request_ids_are_scoped_per_key(gateway: Gateway) -> None:
    """Issue 11 item 7: key B's request with an id key A used first got a 409 forever,
    and the 409 told B that someone had used it."""
    other, _ = await gateway.app[KEY_BOOK].generate(key_alias="other")
    headers = {"x-request-id": "order-2026-0001"}
    a = await gateway.sdk().chat.completions.with_raw_response.create(**CHAT, extra_headers=headers)
    b = await gateway.sdk(api_key=other).chat.completions.with_raw_response.create(
        **CHAT, extra_headers=headers
    )
    assert a.headers["x-ledger-request-id"] != b.headers["x-ledger-request-id"]
    assert {s.request_id for s in await gateway.spends()} >= {
        a.headers["x-ledger-request-id"],
        b.headers["x-ledger-request-id"],
    }
    with pytest.raises(openai.ConflictError, match="by this key"):
        await gateway.sdk(api_key=other).chat.completions.create(**CHAT, extra_headers=headers)


async def test_metrics_and_admission_state(gateway: Gateway) -> None:
    await gateway.sdk().chat.completions.create(**CHAT)
    async with aiohttp.ClientSession() as http:
        r = await http.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        text = await r.text()
    assert r.status == 200
    assert 'ledger_requests_total{route="chat",status="200"} 1.0' in text
    assert "ledger_admit_latency_seconds_count 1.0" in text
    assert "ledger_event_writer_queue_depth" in text
    assert "ledger_projection_lag_events" in text


# ------------------------------------------------------------------ upstreams that answer oddly


def _chunk(content: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = (
        [{"index": 0, "delta": {"content": content}, "finish_reason": None}] if content is not None else []
    )
    out: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = {**usage, "total_tokens": sum(usage.values())}
    return out


USAGE = {"prompt_tokens": 20, "completion_tokens": 3}


def _event(obj: Any, *, eol: str = "\n", extra: str = "") -> bytes:
    return f"{extra}data: {msgspec.json.encode(obj).decode()}{eol}{eol}".encode()


ODD_STREAMS: dict[str, tuple[bytes, str]] = {
    # CRLF framing (valid SSE, sse-starlette's default)
    "crlf": (
        b"".join(_event(_chunk(w), eol="\r\n") for w in ("one", " two", " three"))
        + _event(_chunk(usage=USAGE), eol="\r\n")
        + b"data: [DONE]\r\n\r\n",
        "text/event-stream",
    ),
    # events with id: and event: lines
    "id-lines": (
        b"".join(_event(_chunk(w), extra=f"id: {i}\nevent: message\n") for i, w in enumerate(("a", "b")))
        + _event(_chunk(usage=USAGE), extra="id: 9\n")
        + b"data: [DONE]\n\n",
        "text/event-stream",
    ),
    # the last content chunk carries the usage too (some upstreams do)
    "mixed": (
        _event(_chunk("THE")) + _event(_chunk(" END", usage=USAGE)) + b"data: [DONE]\n\n",
        "text/event-stream",
    ),
}


@pytest.fixture
async def odd_gateway(
    settings: Settings, aiohttp_server: AiohttpServer
) -> AsyncIterator[tuple[Gateway, dict[str, Any]]]:
    """A gateway in front of an upstream that answers with whatever a test sets."""
    answer: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(
            status=answer.get("status", 200), headers={"Content-Type": answer["type"]}
        )
        await response.prepare(request)
        await response.write(answer["body"])
        if answer.get("cut"):
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(upstream)
    provider = ProviderConfig("odd", str(server.make_url("/v1")).rstrip("/"), price_provider="openai")
    app = gateway_app(
        msgspec.structs.replace(settings, admin_key=ADMIN_KEY, providers=(provider,), max_response_bytes=4096)
    )
    gateway_server = await aiohttp_server(app)
    gw = Gateway(str(gateway_server.make_url("")).rstrip("/"), app, web.Application(), ADMIN_KEY)
    await gw.budget("odd", "5")
    yield gw, answer
    await gw.close()


@pytest.mark.parametrize("shape", list(ODD_STREAMS))
async def test_streams_in_every_sse_framing_are_passed_on_and_charged_from_their_usage(
    odd_gateway: tuple[Gateway, dict[str, Any]], shape: str
) -> None:
    """Review finding 3: CRLF framing and id:/event: lines were released at $0 or
    charged the prompt only; content that came with the usage was dropped."""
    gw, answer = odd_gateway
    body, content_type = ODD_STREAMS[shape]
    answer.update(body=body, type=content_type)
    stream = await gw.sdk().chat.completions.create(
        **CHAT, stream=True, extra_headers={"x-ledger-tags": "odd"}
    )
    text = "".join(c.choices[0].delta.content or "" for c in [c async for c in stream] if c.choices)
    assert text == {"crlf": "one two three", "id-lines": "ab", "mixed": "THE END"}[shape]
    [spend] = await gw.spends()
    assert (spend.prompt_tokens, spend.completion_tokens, spend.usage_source) == (20, 3, "upstream")


async def test_a_json_answer_to_a_stream_request_is_charged_from_its_usage(
    odd_gateway: tuple[Gateway, dict[str, Any]],
) -> None:
    gw, answer = odd_gateway
    reply = {
        "id": "x",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {**USAGE, "total_tokens": 23},
    }
    answer.update(body=msgspec.json.encode(reply), type="application/json")
    async with aiohttp.ClientSession() as http:
        r = await http.post(
            f"{gw.url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {gw.key}", "x-ledger-tags": "odd"},
        )
        assert r.status == 200
        assert (await r.json())["choices"][0]["message"]["content"] == "hi"
    [spend] = await gw.spends()
    assert (spend.prompt_tokens, spend.completion_tokens) == (20, 3)


@pytest.mark.parametrize(("shape", "cut"), [("too-large", False), ("cut", True), ("not-json", False)])
async def test_a_2xx_answer_that_cannot_be_read_whole_is_charged_its_bound(
    odd_gateway: tuple[Gateway, dict[str, Any]], shape: str, cut: bool
) -> None:
    """Review finding 2: a 2xx answer over the size limit (or cut, or unreadable) was
    released at $0 though the upstream produced it and will bill it."""
    gw, answer = odd_gateway
    body = {"too-large": b"{" + b" " * 10_000 + b"}", "cut": b'{"id": "x", "choi', "not-json": b"<html>"}[
        shape
    ]
    answer.update(body=body, type="application/json", cut=cut)
    with pytest.raises(openai.APIStatusError) as caught:
        await gw.sdk(max_retries=0).chat.completions.create(**CHAT, extra_headers={"x-ledger-tags": "odd"})
    assert caught.value.status_code in (502, 504)
    request_id = caught.value.response.headers["x-ledger-request-id"]
    [admitted, charged] = await gw.request_events(request_id)
    assert isinstance(admitted, ev.RequestAdmitted)
    assert isinstance(charged, ev.SpendRecorded)
    assert (charged.cost, charged.usage_source) == (admitted.estimate, "estimate")
