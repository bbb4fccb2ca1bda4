"""Money: exact decimals (USD) in events, integer nano-USD in counters.

A single token of a cheap model costs a fraction of a micro-dollar, so counters
count nano-dollars. Converting a charge rounds *up* (a counter never shows less
than was spent); converting a limit rounds *down* (never allows more).
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
MAX_BUDGET_USD = Decimal(1_000_000_000)
_NANO = Decimal(1).scaleb(-9)


class MoneyError(ValueError):
    """An amount that is not a finite, in-range decimal; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


def parse_usd(value: object, field: str, *, maximum: Decimal = MAX_BUDGET_USD) -> Decimal:
    """A USD amount from JSON (number or numeric string): finite, >= 0, <= maximum."""
    if isinstance(value, bool) or value is None:
        raise MoneyError(field, "must be a number of US dollars")
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int | str):
        try:
            amount = Decimal(str(value).strip())
        except InvalidOperation:
            raise MoneyError(field, f"must be a decimal number, got {value!r}") from None
    elif isinstance(value, float):
        amount = Decimal(repr(value))  # the shortest decimal that round-trips, not the binary value
    else:
        raise MoneyError(field, "must be a number of US dollars")
    if not amount.is_finite():
        raise MoneyError(field, "must be a finite number (not NaN or Infinity)")
    if amount < 0:
        raise MoneyError(field, f"must be >= 0, got {amount}")
    if amount > maximum:
        raise MoneyError(field, f"must be <= {maximum}, got {amount}")
    if amount.as_tuple().exponent < -12:  # type: ignore[operator]
        raise MoneyError(field, "has more than 12 decimal places")
    return amount


def to_nanos(usd: Decimal) -> int:
    """A charge in nano-USD, rounded up."""
    return int((usd * NANOS_PER_USD).to_integral_value(ROUND_CEILING))


def limit_to_nanos(usd: Decimal) -> int:
    """A limit in nano-USD, rounded down."""
    return int((usd * NANOS_PER_USD).to_integral_value(ROUND_FLOOR))


def from_nanos(nanos: int) -> Decimal:
    """Nano-USD back to exact USD."""
    return (Decimal(nanos) * _NANO).normalize() if nanos else Decimal(0)
