"""Money: exact decimals, nano-USD counters, clear errors."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger.domain.money import MoneyError, from_nanos, limit_to_nanos, parse_usd, to_nanos


def test_parse_accepts_numbers_and_strings_exactly() -> None:
    assert parse_usd(10, "max_budget") == Decimal(10)
    assert parse_usd("0.1", "max_budget") == Decimal("0.1")
    assert parse_usd(0.1, "max_budget") == Decimal("0.1")  # not 0.1000000000000000055...
    assert parse_usd(Decimal("1e9"), "max_budget") == Decimal(1_000_000_000)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "must be a number"),
        (None, "must be a number"),
        ("abc", "must be a decimal number"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
        (-0.01, ">= 0"),
        ("1000000000.01", "<= 1000000000"),
        ("0.0000000000001", "12 decimal places"),
        ([1], "must be a number"),
    ],
)
def test_parse_rejects_with_field_name(value: object, message: str) -> None:
    with pytest.raises(MoneyError, match=message) as info:
        parse_usd(value, "soft_budget")
    assert str(info.value).startswith("soft_budget ")
    assert info.value.field == "soft_budget"


def test_nanos_round_charges_up_and_limits_down() -> None:
    assert to_nanos(Decimal("0.0000000001")) == 1  # a tenth of a nano is still charged
    assert limit_to_nanos(Decimal("0.0000000019")) == 1
    assert to_nanos(Decimal("0.01")) == 10_000_000
    assert to_nanos(Decimal("1000000000")) == 10**18
    assert from_nanos(10_000_000) == Decimal("0.01")
    assert from_nanos(0) == 0
