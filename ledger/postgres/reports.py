"""Spend reports as /spend/report, `ledger report` and the exports answer them.

A report groups the charges of a period by tag, tag dimension (``tag:team``),
user, model or metadata key, per day, week or month, and compares each group
with the period of equal length just before (trends).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from rich.table import Table

from ledger.postgres import queries

_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)  # a previous period cannot start before year 1


class ReportError(ValueError):
    """A bad report parameter; ``param`` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Query:
    group_by: str
    allocation: str  # split | full
    interval: str
    start: datetime
    end: datetime

    @property
    def dimension(self) -> str | None:
        """The tag dimension grouped by ("" for all tags with split), or None."""
        dimension = queries.dimension_group(self.group_by)
        if dimension is not None:
            return dimension
        return "" if self.group_by == "tag" and self.allocation == "split" else None


def make_query(group_by: str, allocation: str | None, interval: str, start: datetime, end: datetime) -> Query:
    """Validate a report's parameters; split is the default for a dimension, full for tags."""
    if not (queries.valid_group(group_by) or queries.dimension_group(group_by) is not None):
        raise ReportError(
            "group_by must be tag, tag:<dimension> (e.g. tag:team), user, model or metadata.<key>", "group_by"
        )
    if interval not in queries.INTERVALS:
        raise ReportError("interval must be day, week or month", "interval")
    if allocation is None:
        allocation = "split" if group_by.startswith("tag:") else "full"
    if allocation not in queries.ALLOCATIONS:
        raise ReportError("allocation must be split or full", "allocation")
    return Query(group_by, allocation, interval, start, end)


@dataclass(frozen=True, slots=True)
class GroupTrend:
    group: str | None
    spend: Decimal
    requests: int
    previous_spend: Decimal | None  # None when the previous period is not representable
    change: Decimal | None
    change_pct: Decimal | None  # None when the previous spend was 0


@dataclass(frozen=True, slots=True)
class Report:
    query: Query
    rows: list[dict[str, Any]]
    total: Decimal  # each request once
    groups: list[GroupTrend]
    previous_start: datetime | None
    previous_total: Decimal | None


async def _rows(pool: queries.Reader, q: Query, start: datetime, end: datetime) -> list[dict[str, Any]]:
    if q.dimension is not None:
        records = await queries.dimension_report(
            pool, dimension=q.dimension, allocation=q.allocation, interval=q.interval, start=start, end=end
        )
    else:
        records = await queries.spend_report(
            pool, group_by=q.group_by, interval=q.interval, start=start, end=end
        )
    return [
        {
            "group": r["grp"],
            "period": r["period"],
            "spend": Decimal(r["spend"]),
            "requests": int(r["requests"]),
            "prompt_tokens": int(r["prompt_tokens"]),
            "completion_tokens": int(r["completion_tokens"]),
        }
        for r in records
    ]


def _per_group(rows: list[dict[str, Any]]) -> dict[str | None, tuple[Decimal, int]]:
    out: dict[str | None, tuple[Decimal, int]] = {}
    for r in rows:
        spend, requests = out.get(r["group"], (Decimal(0), 0))
        out[r["group"]] = (spend + r["spend"], requests + r["requests"])
    return out


def _pct(now: Decimal, before: Decimal) -> Decimal | None:
    if before == 0:
        return None
    return ((now - before) * 100 / before).quantize(Decimal("0.01"))


async def build(pool: asyncpg.Pool, q: Query) -> Report:
    """The report, its total and the period before, all from one snapshot of the
    views (so the rows add up to the total even while the projections write)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        return await _build(conn, q)


async def _build(pool: queries.Reader, q: Query) -> Report:
    rows = await _rows(pool, q, q.start, q.end)
    total = await queries.total_spend(pool, q.start, q.end)
    previous = period_before(q.start, q.end)
    previous_start = previous[0] if previous else None
    before: dict[str | None, tuple[Decimal, int]] = {}
    previous_total: Decimal | None = None
    if previous_start is not None:
        before = _per_group(await _rows(pool, q, previous_start, q.start))
        previous_total = await queries.total_spend(pool, previous_start, q.start)
    now = _per_group(rows)
    groups = []
    for group in sorted(now.keys() | before.keys(), key=lambda g: (-now.get(g, (0, 0))[0], g or "")):
        spend, requests = now.get(group, (Decimal(0), 0))
        prev = before.get(group, (Decimal(0), 0))[0] if previous_start is not None else None
        groups.append(
            GroupTrend(
                group=group,
                spend=spend,
                requests=requests,
                previous_spend=prev,
                change=None if prev is None else spend - prev,
                change_pct=None if prev is None else _pct(spend, prev),
            )
        )
    return Report(q, rows, total, groups, previous_start, previous_total)


def period_before(start: datetime, end: datetime) -> tuple[datetime, datetime] | None:
    """The period of equal length just before [start, end), if representable."""
    length = end - start
    if start - _EARLIEST <= length:
        return None
    return start - length, start


def _signed(value: Decimal | None, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{'+' if value > 0 else ''}{format(value, 'f')}{suffix}"


def table(report: Report, *, compare: bool, label: str) -> Table:
    """One row per group with its exact spend (a dimension's rows add up to the
    total line); with ``compare``, the previous period and the change."""
    q = report.query
    how = f", {q.allocation} allocation" if q.dimension is not None else ""
    out = Table(title=f"spend by {q.group_by}{how}, {label}")
    out.add_column(q.group_by)
    out.add_column("spend (USD)", justify="right")
    out.add_column("requests", justify="right")
    if compare:
        out.add_column("previous (USD)", justify="right")
        out.add_column("change (USD)", justify="right")
        out.add_column("change", justify="right")
    for g in report.groups:
        if g.spend == 0 and g.requests == 0 and not compare:
            continue
        cells = [g.group if g.group is not None else "(none)", format(g.spend, "f"), str(g.requests)]
        if compare:
            previous = None if g.previous_spend is None else format(g.previous_spend, "f")
            cells += [previous or "—", _signed(g.change), _signed(g.change_pct, "%")]
        out.add_row(*cells)
    out.add_section()
    total = ["total", format(report.total, "f"), ""]
    if compare:
        prev = report.previous_total
        total += [
            "—" if prev is None else format(prev, "f"),
            _signed(None if prev is None else report.total - prev),
            _signed(None if prev is None else _pct(report.total, prev), "%"),
        ]
    out.add_row(*total)
    notes = []
    if q.dimension is not None and q.allocation == "split":
        notes.append("split: each request's cost divided among its values; the rows sum to the total")
    elif q.group_by.startswith("tag"):
        notes.append("full: a request counts in full under each of its tags; rows overlap")
    if compare and report.previous_start is not None:
        notes.append(
            f"previous: the same length just before, from {report.previous_start:%Y-%m-%d %H:%M} UTC"
        )
    out.caption = "\n".join(notes) or None
    return out
