"""Money properties: what a request reserves is never below what it can be charged.

For random requests (text, image and file parts, tools, ``n``, output caps given
or not) and every price shape genai-prices has (flat, tiered, per-request fees,
cached input dearer than fresh, prices that change with the time of day), the
estimate bounds the cost of any usage the upstream may report within the caps
the gateway forwards, at any time. Operator overrides win over the database;
amounts are exact decimals from the configuration to the charge.

Catches (each planted once): the estimate pricing the prompt at the fresh-input
rate only (bug a), a flat price dropping its per-request fee (bug b), a
time-of-day price fixed at lookup time (bug c), prices parsed through float
(bug d), and the gateway reserving ``cost`` instead of ``upper_bound``.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelPrice, TieredPrices, TimeOfDateConstraint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from gateway.mock_upstream import create_mock_app
from ledger import events as ev
from ledger.domain.estimate import CHAT, COMPLETIONS, image_token_bound, request_bound
from ledger.domain.pricing import Price, PriceBook, Tokens
from ledger.postgres.store import EventStore
from ledger.settings import PriceOverride, ProviderConfig, Settings
from tests.conftest import gateway_app

# ------------------------------------------------------------- price shapes


def _shape(mp: ModelPrice, conditional: bool) -> str | None:
    values = {k: v for k, v in vars(mp).items() if v is not None}
    if "input_mtok" not in values or "output_mtok" not in values:
        return None
    if conditional:
        return "time-dependent"
    if any(isinstance(v, TieredPrices) for v in values.values()):
        return "tiered"
    if "requests_kcount" in values:
        return "per-request fee"
    read = values.get("cache_read_mtok")
    if isinstance(read, Decimal) and read > values["input_mtok"]:
        return "cached dearer than fresh"
    return "flat"


def _priced_models() -> dict[str, list[tuple[str, str]]]:
    """(provider, model) of every token-priced model genai-prices has, by shape."""
    shapes: dict[str, list[tuple[str, str]]] = {}
    for provider in get_snapshot().providers:
        for model in provider.models:
            conditional = isinstance(model.prices, list) and len(model.prices) > 1
            prices = model.prices if isinstance(model.prices, ModelPrice) else model.prices[-1].prices
            shape = _shape(prices, conditional)
            if shape is not None:
                shapes.setdefault(shape, []).append((provider.id, model.id))
    return shapes


BOOK = PriceBook()
# (ids genai-prices cannot resolve back to their own model are left out)
SHAPES = {
    shape: [pm for pm in models if BOOK.lookup(*pm) is not None] for shape, models in _priced_models().items()
}
ALL_PRICED = sorted({pm for models in SHAPES.values() for pm in models})


def test_every_price_shape_is_in_the_sample() -> None:
    assert set(SHAPES) == {"flat", "tiered", "per-request fee", "cached dearer than fresh", "time-dependent"}


# ------------------------------------------------------------- requests

text = st.text(min_size=0, max_size=300)
image = st.builds(
    lambda url, detail: {"type": "image_url", "image_url": {"url": url, "detail": detail}},
    st.sampled_from(["https://example.com/a.png", "data:image/png;base64,iVBORw0KGgo="]),
    st.sampled_from(["low", "high", "auto"]),
)
file_part = st.builds(
    lambda data: {"type": "file", "file": {"filename": "a.pdf", "file_data": data}},
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/", min_size=4, max_size=400),
)
content = st.one_of(
    text, st.lists(st.one_of(text.map(lambda t: {"type": "text", "text": t}), image, file_part))
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": content}
)
tool = st.builds(
    lambda name, desc: {
        "type": "function",
        "function": {"name": name, "description": desc, "parameters": {"type": "object", "properties": {}}},
    },
    st.from_regex(r"[a-z_]{1,20}", fullmatch=True),
    text,
)


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": draw(st.lists(message, min_size=1, max_size=5))}
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(tool, min_size=1, max_size=3))
    for field in ("n", "max_tokens", "max_completion_tokens"):
        if draw(st.booleans()):
            high = 8 if field == "n" else 20_000
            body[field] = draw(st.integers(1, high))
    return body


@st.composite
def completion_bodies(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(st.one_of(text, st.lists(text, min_size=1, max_size=4)))
    body: dict[str, Any] = {"model": "m", "prompt": prompt}
    for field in ("n", "best_of", "max_tokens"):
        if draw(st.booleans()):
            body[field] = draw(st.integers(1, 8 if field != "max_tokens" else 20_000))
    return body


@st.composite
def reported_usage(draw: st.DrawFn, prompt: int, completion: int) -> Tokens:
    """Any usage an upstream may report within what the gateway forwarded (the
    gateway clamps anything above these caps before charging)."""
    used_prompt = draw(st.integers(0, prompt))
    return Tokens(used_prompt, draw(st.integers(0, completion)), draw(st.integers(0, used_prompt)))


any_time = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from(ALL_PRICED),
    kind=st.sampled_from([CHAT, COMPLETIONS]),
    data=st.data(),
    at=any_time,
)
def test_the_estimate_bounds_any_reported_usage(
    model: tuple[str, str], kind: str, data: st.DataObject, at: datetime
) -> None:
    body = data.draw(chat_bodies() if kind == CHAT else completion_bodies())
    price = BOOK.lookup(*model)
    assert price is not None
    bound = request_bound(kind, body, default_cap=4096, image_tokens=2000)
    estimate = price.upper_bound(Tokens(bound.prompt, bound.completion))
    used = data.draw(reported_usage(bound.prompt, bound.completion))
    cost = price.cost(used, at=at)
    assert isinstance(cost, Decimal)
    assert cost <= estimate, (model, used, bound, cost, estimate)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_at_its_caps(shape: str) -> None:
    """The corner a random draw may miss: all of the caps used, the prompt all
    fresh or all cached, at every hour of a day (off-peak prices) and either side
    of a price's start date."""
    bound = Tokens(250_000, 8_000)
    hours = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=30 * i) for i in range(48)]
    for provider, model in SHAPES[shape][:25]:
        price = BOOK.lookup(provider, model)
        assert price is not None
        estimate = price.upper_bound(bound)
        for at in [*hours, datetime(2024, 1, 1, tzinfo=UTC)]:
            for cached in (0, bound.prompt):
                used = Tokens(bound.prompt, bound.completion, cached)
                assert price.cost(used, at=at) <= estimate, (provider, model, at, cached)


def test_a_per_request_fee_is_charged() -> None:
    """genai-prices' per-request fees (requests_kcount) are part of the cost (bug b)."""
    provider, model = SHAPES["per-request fee"][0]
    price = BOOK.lookup(provider, model)
    assert price is not None
    assert price.cost(Tokens(0, 0)) > 0


def test_time_of_day_prices_are_resolved_at_each_call() -> None:
    """A price that changes during the day is the one in force when charged,
    not the one that was when the PriceBook first looked it up (bug c)."""
    provider, model = next(
        (p.id, m.id)
        for p in get_snapshot().providers
        for m in p.models
        if isinstance(m.prices, list)
        and any(isinstance(c.constraint, TimeOfDateConstraint) for c in m.prices)
    )
    price = BOOK.lookup(provider, model)
    assert price is not None
    used = Tokens(1_000_000, 1_000_000)
    day = [price.cost(used, at=datetime(2026, 3, 1, h, 45, tzinfo=UTC)) for h in range(24)]
    assert len(set(day)) > 1, day
    assert price.upper_bound(used) == max(day)


# ------------------------------------------------------------- exact decimals, overrides

money = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    inp=money,
    out=money,
    cached=st.one_of(st.none(), money),
    prompt=st.integers(0, 10**9),
    completion=st.integers(0, 10**9),
    data=st.data(),
)
def test_flat_costs_are_exact(
    inp: Decimal, out: Decimal, cached: Decimal | None, prompt: int, completion: int, data: st.DataObject
) -> None:
    read = data.draw(st.integers(0, prompt))
    book = PriceBook((PriceOverride("gpt-4o-mini", inp, out, cached),))
    price = book.lookup("openai", "gpt-4o-mini")
    assert price is not None
    assert (price.input_per_mtok, price.output_per_mtok, price.cached_input_per_mtok) == (inp, out, cached)
    rate = Fraction(cached if cached is not None else inp)
    want = ((prompt - read) * Fraction(inp) + read * rate + completion * Fraction(out)) / 10**6
    got = price.cost(Tokens(prompt, completion, read))
    assert Fraction(got) == want
    bound = price.upper_bound(Tokens(prompt, completion))
    assert Fraction(bound) == max(
        (prompt * Fraction(inp) + completion * Fraction(out)) / 10**6,
        (prompt * rate + completion * Fraction(out)) / 10**6,
    )


def test_overrides_win_over_the_database_and_respect_their_provider() -> None:
    mine = PriceOverride("gpt-4o-mini", Decimal("7"), Decimal("9"), provider="openai")
    book = PriceBook((mine,))
    price = book.lookup("openai", "gpt-4o-mini")
    assert price is not None
    assert (price.input_per_mtok, price.output_per_mtok) == (Decimal(7), Decimal(9))
    other = book.lookup("azure", "gpt-4o-mini")
    assert other is None or other.input_per_mtok != Decimal(7)


EXACT = "123456789.123456789"  # a float keeps about 17 significant digits


def test_price_overrides_from_the_environment_are_exact() -> None:
    raw = json.dumps([{"model": "m", "input_per_mtok": 0, "output_per_mtok": 0}]).replace(
        '"input_per_mtok": 0', f'"input_per_mtok": {EXACT}'
    )
    s = Settings.from_env({"LEDGER_PRICE_OVERRIDES": raw})
    assert s.price_overrides[0].input_per_mtok == Decimal(EXACT)


def test_price_overrides_from_the_config_file_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "ledger.toml"
    path.write_text(
        f'price_overrides = [{{model = "m", input_per_mtok = {EXACT}, output_per_mtok = 1.1}}]\n',
        encoding="utf-8",
    )
    s = Settings.from_env({"LEDGER_CONFIG": str(path)})
    assert s.price_overrides[0].input_per_mtok == Decimal(EXACT)
    assert s.price_overrides[0].output_per_mtok == Decimal("1.1")


# ------------------------------------------------------------- through the gateway


@pytest.fixture
async def dear_cache_gateway(settings: Settings, aiohttp_server: AiohttpServer) -> str:
    """A gateway whose only price reads cached input at 10x the fresh rate."""
    mock = await aiohttp_server(create_mock_app())
    provider = ProviderConfig("mock", str(mock.make_url("/v1")).rstrip("/"), price_provider="openai")
    app = gateway_app(
        msgspec.structs.replace(
            settings,
            admin_key="money-admin-key-0123456789",
            providers=(provider,),
            price_overrides=(PriceOverride("dear-cache", Decimal("1"), Decimal("2"), Decimal("10")),),
        )
    )
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_the_gateway_reserves_the_upper_bound(dear_cache_gateway: str, settings: Settings) -> None:
    body = {"model": "dear-cache", "messages": [{"role": "user", "content": "x" * 500}], "max_tokens": 50}
    headers = {"Authorization": "Bearer money-admin-key-0123456789"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{dear_cache_gateway}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        request_id = r.headers["x-ledger-request-id"]
    store = await EventStore.open(settings)
    try:
        [admitted, *_] = [ev.decode(e) for e in await store.read_stream(f"request:{request_id}")]
    finally:
        await store.close()
    assert isinstance(admitted, ev.RequestAdmitted)
    bound = request_bound(CHAT, dict(body), default_cap=4096, image_tokens=2000)
    dear = Price("dear-cache", "mock", Decimal("1"), Decimal("2"), Decimal("10"))
    all_cached = dear.cost(Tokens(bound.prompt, bound.completion, bound.prompt))
    assert admitted.estimate == all_cached  # the prompt priced at its dearest rate


# ------------------------------------------------------------- images (bug e)

TILE_COSTS = {"gpt-4o": (85, 170), "gpt-4o-mini": (2833, 5667), "gpt-4.1": (85, 170), "o3": (75, 150)}
PATCH_MULTIPLIERS = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72}


def tile_tokens(width: int, height: int, detail: str, base: int, per_tile: int) -> int:
    """OpenAI's documented image cost for tile-counted models."""
    if detail == "low":
        return base
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))  # the short side down to 768 px (never up)
    w, h = w * scale, h * scale
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def patch_tokens(width: int, height: int, multiplier: float) -> int:
    """OpenAI's documented image cost for patch-counted models (at most 1536 patches)."""
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches > 1536:
        shrink = math.sqrt(32 * 32 * 1536 / (width * height))
        w, h = width * shrink, height * shrink
        shrink *= min(math.floor(w / 32) / (w / 32), math.floor(h / 32) / (h / 32))
        patches = math.ceil(width * shrink / 32) * math.ceil(height * shrink / 32)
    return math.ceil(min(patches, 1536) * multiplier)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20_000),
    height=st.integers(1, 20_000),
    detail=st.sampled_from(["low", "high"]),
    provider_prefix=st.sampled_from(["", "openai/"]),
)
def test_an_image_never_costs_more_tokens_than_its_bound(
    width: int, height: int, detail: str, provider_prefix: str
) -> None:
    for model, (base, per_tile) in TILE_COSTS.items():
        tokens = tile_tokens(width, height, detail, base, per_tile)
        assert tokens <= image_token_bound(provider_prefix + model, 2000), (model, width, height)
    for model, multiplier in PATCH_MULTIPLIERS.items():
        tokens = patch_tokens(width, height, multiplier)
        assert tokens <= image_token_bound(provider_prefix + model, 2000), (model, width, height)


def test_an_inline_pdf_counts_an_image_per_page() -> None:
    """A PDF's pages are read as images too: its bytes alone do not bound it."""
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,AAAA"}}
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": [pdf]}]}
    bound = request_bound(CHAT, body, default_cap=10, image_tokens=2000)
    assert bound.prompt >= 100 * image_token_bound("gpt-4o", 2000)
