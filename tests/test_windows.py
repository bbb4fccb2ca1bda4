"""Durations and windows: parsing, calendar rules, and properties that must hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.domain.windows import Duration, DurationError, parse_duration, window_at

T = datetime(2026, 11, 27, 19, 30, 15, tzinfo=UTC)  # a Friday
ANCHOR = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", Duration(30, "s")),
        ("15m", Duration(15, "m")),
        ("1h", Duration(1, "h")),
        ("1d", Duration(1, "d")),
        ("7d", Duration(7, "d")),
        ("1w", Duration(1, "w")),
        ("30d", Duration(30, "d")),
        ("1mo", Duration(1, "mo")),
        ("3mo", Duration(3, "mo")),
    ],
)
def test_parse_accepts(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "30dx",
        "0d",
        "-1d",
        "1.5d",
        "1e9d",
        "",
        " 1d",
        "1d ",
        "1D",
        "d",
        "1",
        "01d",
        "1y",
        "9999999d",
        "4000d",
        "1 d",
        "1mos",
        "１d",
    ],
)
def test_parse_rejects_naming_the_field_and_forms(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert str(info.value).startswith("budget_duration must be one of Ns, Nm, Nh, Nd, Nw or Nmo")
    assert repr(text) in str(info.value)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(DurationError, match="not a string"):
        parse_duration(7)


def test_calendar_windows() -> None:
    day = window_at(parse_duration("1d"), ANCHOR, T)
    assert (day.start, day.end) == (
        datetime(2026, 11, 27, tzinfo=UTC),
        datetime(2026, 11, 28, tzinfo=UTC),
    )
    for text in ("7d", "1w"):
        week = window_at(parse_duration(text), ANCHOR, T)
        assert week.start == datetime(2026, 11, 23, tzinfo=UTC)  # Monday
        assert week.end == datetime(2026, 11, 30, tzinfo=UTC)
    for text in ("30d", "1mo"):
        month = window_at(parse_duration(text), ANCHOR, T)
        assert (month.start, month.end) == (
            datetime(2026, 11, 1, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
        )
    december = window_at(parse_duration("1mo"), ANCHOR, datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert december.end == datetime(2027, 1, 1, tzinfo=UTC)


def test_fixed_windows_count_from_the_anchor() -> None:
    w = window_at(parse_duration("3d"), ANCHOR, T)
    assert (w.start - ANCHOR) % timedelta(days=3) == timedelta(0)
    assert w.start <= T < w.end
    w = window_at(parse_duration("2mo"), ANCHOR, T)
    assert (w.start, w.end) == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        window_at(parse_duration("1h"), ANCHOR, datetime(2026, 1, 1))


durations = st.builds(
    lambda n, u: f"{n}{u}",
    st.integers(min_value=1, max_value=400),
    st.sampled_from(["s", "m", "h", "d", "w", "mo"]),
).filter(
    lambda t: not (t.endswith("mo") and int(t[:-2]) > 120) and not (t.endswith("w") and int(t[:-1]) > 520)
)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=400, deadline=None)
@given(durations, instants, instants)
def test_every_instant_is_in_exactly_one_window(text: str, anchor: datetime, now: datetime) -> None:
    d = parse_duration(text)
    w = window_at(d, anchor, now)
    assert w.start <= now < w.end  # reset_at > now
    # windows tile: the instant before start is in the previous window, which ends at start
    before = window_at(d, anchor, w.start - timedelta(microseconds=1))
    assert before.end == w.start
    after = window_at(d, anchor, w.end)
    assert after.start == w.end
    # any instant inside the window maps to the same window
    assert window_at(d, anchor, w.end - timedelta(microseconds=1)) == w
    assert window_at(d, anchor, w.start) == w
