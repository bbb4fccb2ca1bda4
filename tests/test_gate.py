"""The gate (ledger/gate.py): the proxy's decisions without HTTP, against real
PostgreSQL and Redis. Each refusal names its reason, field and code; an admitted
request carries the output cap to forward only when a budget applies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from ledger import events as ev
from ledger.admission import Admission, BudgetExceeded
from ledger.apikeys import ApiKey
from ledger.budgets import BudgetBook
from ledger.counters import Counters, connect_redis
from ledger.domain.pricing import PriceBook
from ledger.gate import Ask, Blocked, Gate, Passed, Refused
from ledger.postgres.store import EventStore
from ledger.settings import PriceOverride, Settings
from ledger.tags import TagService


@dataclass
class World:
    gate: Gate
    tags: TagService
    book: BudgetBook


@pytest.fixture
async def world(database_url: str, redis_url: str) -> AsyncIterator[World]:
    settings = Settings.from_dsn(database_url)
    settings = msgspec.structs.replace(settings, unpriced_policy="auto")
    store = await EventStore.open(settings)
    client = connect_redis(redis_url)
    counters = Counters(client, store.pool)
    book = BudgetBook(store)
    await book.refresh()
    prices = PriceBook((PriceOverride("house-model", Decimal(1000), Decimal(1000)),))
    gate = Gate(settings, book, prices, Admission(store, counters, book))
    try:
        yield World(gate, TagService(store), book)
    finally:
        await gate.admission.drain()
        await counters.close()
        await client.aclose()
        await store.close()


def ask(request_id: str = "r", *, model: str = "house-model", tags: tuple[str, ...] = (), **kw: Any) -> Ask:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw.pop("body", {})}
    return Ask(request_id, "chat", body, model, model, "openai", list(tags), None, {}, kw.pop("key", None))


def key(**kw: Any) -> ApiKey:
    return ApiKey("h" * 64, "sk-led-abc", datetime.now(UTC), **kw)


async def refused(world: World, a: Ask) -> Refused:
    with pytest.raises(Refused) as e:
        await world.gate.admit(a)
    return e.value


async def test_a_tag_outside_the_keys_scope_is_refused_before_anything_is_said(world: World) -> None:
    e = await refused(world, ask(tags=("team:b",), key=key(allowed_tags=("team:a",))))
    assert (e.reason, e.param, e.code) == ("forbidden", "tags", "tag_not_allowed")
    assert "team:b" in str(e)


async def test_a_model_the_key_or_the_tag_may_not_use_is_refused(world: World) -> None:
    e = await refused(world, ask(key=key(allowed_models=("other",))))
    assert (e.reason, e.code) == ("forbidden", "model_not_allowed")
    await world.tags.create("t", ev.TagFields(models=["other"]))
    await world.book.refresh()
    e = await refused(world, ask(tags=("t",)))
    assert (e.reason, e.param, e.code) == ("forbidden", "model", "model_not_allowed_for_tag")


async def test_an_unpriced_model_is_refused_only_where_a_budget_applies(world: World) -> None:
    passed = await world.gate.admit(ask("free", model="nobody-prices-this"))
    assert isinstance(passed, Passed)
    assert passed.price is None
    assert passed.admitted.estimate == 0
    await world.tags.create("b", ev.TagFields(max_budget=Decimal(1)))
    await world.book.refresh()
    e = await refused(world, ask("paid", model="nobody-prices-this", tags=("b",)))
    assert (e.reason, e.param, e.code) == ("invalid", "model", "unpriced_model")


async def test_a_bound_it_cannot_trust_is_refused_naming_the_field(world: World) -> None:
    e = await refused(world, ask(body={"max_tokens": -1}))
    assert (e.reason, e.param, e.code) == ("invalid", "max_tokens", "invalid_value")


async def test_the_default_cap_is_forwarded_only_when_a_budget_applies(world: World) -> None:
    unbudgeted = await world.gate.admit(ask("u"))
    assert isinstance(unbudgeted, Passed)
    assert unbudgeted.inject is None
    await world.tags.create("b", ev.TagFields(max_budget=Decimal(100)))
    await world.book.refresh()
    budgeted = await world.gate.admit(ask("b", tags=("b",)))
    assert isinstance(budgeted, Passed)
    assert budgeted.inject == ("max_completion_tokens", world.gate.settings.default_max_tokens)
    own_cap = await world.gate.admit(ask("c", tags=("b",), body={"max_tokens": 10}))
    assert isinstance(own_cap, Passed)
    assert own_cap.inject is None
    assert own_cap.admitted.estimate < budgeted.admitted.estimate


async def test_a_budget_without_room_blocks_and_says_the_default_cap_was_assumed(world: World) -> None:
    await world.tags.create("tiny", ev.TagFields(max_budget=Decimal("0.000001")))
    await world.book.refresh()
    blocked = await world.gate.admit(ask(tags=("tiny",)))
    assert isinstance(blocked, Blocked)
    assert isinstance(blocked.outcome, BudgetExceeded)
    assert blocked.capped_by_default
    blocked = await world.gate.admit(ask("r2", tags=("tiny",), body={"max_tokens": 5000}))
    assert isinstance(blocked, Blocked)
    assert not blocked.capped_by_default
