"""Cost allocation: dividing a request's exact cost among its tags in a dimension.

A tag ``key:value`` puts a request in dimension ``key`` with value ``value``
(``team:a`` -> dimension ``team``, value ``a``). Budgets count a request's full
cost on every tag it carries; a bill cannot, or the per-tag rows add up to more
than was spent. Split allocation gives each of a request's values in a
dimension an equal share of its cost, in whole units of the finer of a
nano-dollar and the cost's own last digit, and hands the leftover units one
each to the first values in sorted order. The shares therefore sum to the cost
exactly and the same request always splits the same way (replay gives the same
view). Requests with no value in a dimension are that dimension's
``(untagged)`` row, so a dimension's rows sum to the period's total spend.

The dimension ``ALL_TAGS`` ("") splits a request's cost among all its tags.
"""

from __future__ import annotations

from decimal import Decimal

UNTAGGED = "(untagged)"
ALL_TAGS = ""  # the pseudo-dimension of every tag, whatever its form
_NANO_EXPONENT = -9
MAX_DIMENSION = 64


def dimension_of(tag: str) -> tuple[str, str] | None:
    """``team:a`` -> ("team", "a"); None for a tag that is not ``key:value``."""
    key, sep, value = tag.partition(":")
    if not sep or not key or not value:
        return None
    return key, value


def valid_dimension(name: str) -> bool:
    return 0 < len(name) <= MAX_DIMENSION and ":" not in name and "\x00" not in name


def split(cost: Decimal, values: list[str]) -> dict[str, Decimal]:
    """Equal shares of ``cost`` among the distinct ``values``, summing exactly to it."""
    distinct = sorted(set(values))
    if not distinct:
        return {}
    exponent = cost.as_tuple().exponent
    assert isinstance(exponent, int), "costs are finite"
    quantum = Decimal(1).scaleb(min(_NANO_EXPONENT, exponent))
    units = int(cost / quantum)  # exact: quantum divides the cost
    base, leftover = divmod(units, len(distinct))
    return {v: (base + (1 if i < leftover else 0)) * quantum for i, v in enumerate(distinct)}


def allocate(cost: Decimal, tags: list[str]) -> dict[tuple[str, str], Decimal]:
    """Every (dimension, value) share of one request: each ``key:value`` dimension
    split on its own, and the all-tags dimension split among all the tags."""
    by_dimension: dict[str, list[str]] = {}
    for tag in tags:
        parts = dimension_of(tag)
        if parts is not None:
            by_dimension.setdefault(parts[0], []).append(parts[1])
    if tags:
        by_dimension[ALL_TAGS] = list(tags)
    return {
        (dimension, value): share
        for dimension, values in by_dimension.items()
        for value, share in split(cost, values).items()
    }
