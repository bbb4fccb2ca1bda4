"""The tag aggregate over a real event store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from ledger.events import TagFields
from ledger.postgres.store import EventStore
from ledger.tags import InvalidTag, TagExists, TagNotFound, TagService, validate_name


@pytest.fixture
def tags(store: EventStore) -> TagService:
    return TagService(store)


async def test_lifecycle_and_history(tags: TagService) -> None:
    created = await tags.create("team:ml", TagFields(max_budget=Decimal(10), budget_duration="7d"))
    assert (created.exists, created.version, created.max_budget) == (True, 1, Decimal(10))
    with pytest.raises(TagExists):
        await tags.create("team:ml", TagFields())
    updated = await tags.update("team:ml", TagFields(soft_budget=Decimal(8), description="ML"))
    assert (updated.version, updated.soft_budget, updated.description) == (2, Decimal(8), "ML")
    assert updated.max_budget == Decimal(10)  # untouched fields stay
    deleted = await tags.delete("team:ml")
    assert not deleted.exists
    with pytest.raises(TagNotFound):
        await tags.update("team:ml", TagFields(description="x"))
    with pytest.raises(TagNotFound):
        await tags.delete("team:ml")
    again = await tags.create("team:ml", TagFields(max_budget=Decimal(1)))
    assert again.version == 4  # a new lifecycle on the same stream
    assert again.soft_budget is None  # nothing carried over from the old one
    history = await tags.history("team:ml")
    assert [h.type for h in history] == ["TagCreated", "TagUpdated", "TagDeleted", "TagCreated"]


async def test_concurrent_updates_are_never_lost(tags: TagService) -> None:
    await tags.create("busy", TagFields(max_budget=Decimal(100), metadata={}))
    descriptions = [f"d{i}" for i in range(8)]
    await asyncio.gather(
        *(tags.update("busy", TagFields(description=d)) for d in descriptions),
        tags.update("busy", TagFields(max_budget=Decimal(50))),
    )
    state = await tags.load("busy")
    assert state.version == 1 + len(descriptions) + 1
    assert state.max_budget == Decimal(50)
    history = await tags.history("busy")
    changed = [getattr(h.event, "changes", None) for h in history if h.type == "TagUpdated"]
    assert (
        sorted(c.description for c in changed if c is not None and c.description in descriptions)
        == descriptions
    )


async def test_anchor_moves_only_when_the_duration_changes(store: EventStore) -> None:
    t0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    now = [t0]
    tags = TagService(store, clock=lambda: now[0])
    await tags.create("fixed", TagFields(max_budget=Decimal(1), budget_duration="3d"))
    now[0] = t0 + timedelta(hours=5)
    state = await tags.update("fixed", TagFields(max_budget=Decimal(2)))
    assert state.anchor == t0
    now[0] = t0 + timedelta(hours=6)
    state = await tags.update("fixed", TagFields(budget_duration="2d"))
    assert state.anchor == t0 + timedelta(hours=6)
    assert state.window(now[0]).start == now[0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "1 to 128 characters"),
        ("x" * 129, "1 to 128 characters"),
        (" lead", "whitespace"),
        ("trail ", "whitespace"),
        ("tab\there", r"U\+0009"),
        ("nul\x00", r"U\+0000"),
        ("zero\u200bwidth", r"U\+200B"),
        (42, "must be a string"),
    ],
)
def test_invalid_names(name: object, message: str) -> None:
    with pytest.raises(InvalidTag, match=message):
        validate_name(name)


def test_valid_names_are_kept_verbatim() -> None:
    for name in (
        "team:search",
        "Team:Search",
        "ünïcødé",
        "a b",
        "'; drop table events; --",
        "x" * 128,
    ):
        assert validate_name(name) == name


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            TagFields(max_budget=Decimal(1), soft_budget=Decimal(2)),
            "soft_budget",
            "must not exceed",
        ),
        (TagFields(budget_duration="1d"), "budget_duration", "needs a max_budget"),
        (TagFields(max_budget=Decimal(-1)), "max_budget", ">= 0"),
        (TagFields(max_budget=Decimal("NaN")), "max_budget", "finite"),
        (TagFields(max_budget=Decimal("1e10")), "max_budget", "<= 1000000000"),
        (
            TagFields(max_budget=Decimal(1), budget_duration="0d"),
            "budget_duration",
            "accepted|one of",
        ),
        (TagFields(models=[""]), "models", "invalid model name"),
        (TagFields(description="x" * 2001), "description", "at most 2000"),
        (TagFields(metadata={"k": "v" * 9000}), "metadata", "8192 bytes"),
    ],
)
async def test_invalid_fields_name_the_field(
    tags: TagService, fields: TagFields, field: str, message: str
) -> None:
    with pytest.raises(InvalidTag, match=message) as info:
        await tags.create("t", fields)
    assert info.value.field == field
    assert await tags.store.read_stream("tag:t") == []  # nothing written
