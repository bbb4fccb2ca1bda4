"""The spend rollup rows of a batch (pure, no database) and the one upsert that writes rows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from ledger import events as ev
from projections.rows import Row, Upsert
from projections.spend import TagDay, TagTotals, UserDay, UserTotals, spend_rows

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = T0.date()


def spend(
    cost: str,
    tags: list[str],
    *,
    model: str | None = "gpt-4o",
    user: str | None = None,
    prompt: int = 0,
    completion: int = 0,
) -> ev.SpendRecorded:
    return ev.SpendRecorded(
        request_id="r",
        admitted_at=T0,
        cost=Decimal(cost),
        tags=tags,
        model=model,
        user_hash=user,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def denial(tag: str) -> ev.RequestDenied:
    zero = Decimal(0)
    return ev.RequestDenied("d", T0, tag, zero, zero, Decimal("0.5"), Decimal(1))


def test_an_empty_batch_has_no_rows() -> None:
    rows = spend_rows([])
    assert (rows.tags, rows.daily, rows.users, rows.user_daily) == ({}, {}, {}, {})


def test_two_events_with_the_same_key_are_summed() -> None:
    later = T0 + timedelta(minutes=5)
    rows = spend_rows(
        [
            (later, spend("0.25", ["team:a"], user="u1", prompt=10, completion=20)),
            (T0, spend("0.5", ["team:a"], user="u1", prompt=1, completion=2)),
        ]
    )
    assert rows.tags == {"team:a": TagTotals("team:a", Decimal("0.75"), 2, 0, T0, later)}
    assert rows.daily == {
        ("team:a", DAY, "gpt-4o"): TagDay("team:a", DAY, "gpt-4o", Decimal("0.75"), 2, 11, 22)
    }
    assert rows.users == {"u1": UserTotals("u1", Decimal("0.75"), 2, T0, later)}
    assert rows.user_daily == {("u1", DAY): UserDay("u1", DAY, Decimal("0.75"), 2)}


def test_different_keys_are_kept_apart() -> None:
    next_day = T0 + timedelta(days=1)
    rows = spend_rows(
        [
            (T0, spend("1", ["team:a", "app:x"], user="u1")),
            (T0, spend("2", ["team:a"], model="gpt-4o-mini", user="u2")),
            (next_day, spend("4", ["team:a"], user="u1")),
        ]
    )
    assert {k: v.total_spend for k, v in rows.tags.items()} == {"team:a": 7, "app:x": 1}
    assert {k: v.spend for k, v in rows.daily.items()} == {
        ("team:a", DAY, "gpt-4o"): 1,
        ("app:x", DAY, "gpt-4o"): 1,
        ("team:a", DAY, "gpt-4o-mini"): 2,
        ("team:a", next_day.date(), "gpt-4o"): 4,
    }
    assert {k: (v.spend, v.requests) for k, v in rows.users.items()} == {"u1": (5, 2), "u2": (2, 1)}
    assert {k: v.spend for k, v in rows.user_daily.items()} == {
        ("u1", DAY): 1,
        ("u2", DAY): 2,
        ("u1", next_day.date()): 4,
    }


def test_expiries_and_denials() -> None:
    expired = ev.ReservationExpired("r", T0, Decimal("0.3"), tags=["team:a"])
    later = T0 + timedelta(seconds=1)
    rows = spend_rows([(T0, expired), (later, denial("team:a")), (later, denial("tiny")), (T0, denial(""))])
    assert rows.tags == {
        "team:a": TagTotals("team:a", Decimal("0.3"), 1, 1, T0, later),
        "tiny": TagTotals("tiny", Decimal(0), 0, 1, later, later),  # a denial costs nothing
    }
    # an expiry names no model (its day row's model is "") and no user; a denial no day row
    assert list(rows.daily) == [("team:a", DAY, "")]
    assert rows.users == rows.user_daily == {}


def test_sums_are_exact_decimals() -> None:
    rows = spend_rows([(T0, spend("0.1", ["a"], user="u")), (T0, spend("0.2", ["a"], user="u"))])
    assert rows.tags["a"].total_spend == Decimal("0.3")  # 0.1 + 0.2 is 0.30000000000000004 in floats
    assert rows.users["u"].spend == Decimal("0.3")
    tiny = spend_rows([(T0, spend("0.000000000001", ["a"]))] * 1000)  # a pico-dollar, 12 places
    assert tiny.tags["a"].total_spend == Decimal("0.000000001")


def test_largest_values_sum_exactly() -> None:
    # The largest cost a request can carry (MAX_BUDGET_USD with 12 places), a whole
    # batch of them: 25 significant digits, exact in the default decimal context.
    top = "999999999.999999999999"
    tokens = 2**31
    rows = spend_rows([(T0, spend(top, ["a"], prompt=tokens, completion=tokens))] * 5000)
    assert rows.tags["a"].total_spend == Decimal("4999999999999.999999995000")
    day = rows.daily[("a", DAY, "gpt-4o")]
    assert (day.requests, day.prompt_tokens, day.completion_tokens) == (5000, 5000 * tokens, 5000 * tokens)


# ------------------------------------------------------------------ the upsert


class _Counted(Row, frozen=True):
    name: str
    day: date
    label: str | None
    total: Decimal
    hits: int
    first: datetime
    last: datetime


_UPSERT = Upsert(_Counted, key=("name", "day"), add=("total", "hits"), least=("first",), greatest=("last",))


def test_an_upsert_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="no column"):
        Upsert(_Counted, key=("nome",))
    with pytest.raises(ValueError, match="conflict key"):
        Upsert(_Counted, key=())
    with pytest.raises(ValueError, match="twice"):
        Upsert(_Counted, key=("name",), add=("hits",), greatest=("hits",))

    class Floats(Row, frozen=True):
        name: str
        cost: float  # money is never a float: no PostgreSQL type is guessed for it

    with pytest.raises(TypeError, match="no PostgreSQL type"):
        Upsert(Floats, key=("name",))
    for table in ("t; drop table events", "a.b.c", "Tag_Info", '"x"'):
        with pytest.raises(ValueError, match="not a plain table name"):
            _UPSERT.sql(table)


async def test_an_upsert_adds_keeps_extremes_and_replaces(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "create schema s; create table s.counted (name text, day date, label text, total numeric,"
            " hits bigint, first timestamptz, last timestamptz, primary key (name, day))"
        )
        t1, t2 = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
        await _UPSERT.run(
            conn,
            "s.counted",
            [
                _Counted("a", DAY, "old", Decimal("0.1"), 1, t1, t1),
                _Counted("b", DAY, None, Decimal(1), 1, T0, T0),
            ],
        )
        await _UPSERT.run(conn, "s.counted", [])  # nothing to write: no statement
        await _UPSERT.run(
            conn,
            "s.counted",
            [
                _Counted("a", DAY, "new", Decimal("0.2"), 2, T0, t2),
                _Counted("a", DAY + timedelta(days=1), None, Decimal(5), 1, T0, T0),
            ],
        )
        rows = await conn.fetch("select * from s.counted order by name, day")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [
        ("a", DAY, "new", Decimal("0.3"), 3, T0, t2),
        ("a", DAY + timedelta(days=1), None, Decimal(5), 1, T0, T0),
        ("b", DAY, None, Decimal(1), 1, T0, T0),
    ]
