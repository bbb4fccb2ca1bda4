"""The period's charges as a FOCUS 1.2 dataset (FinOps Open Cost and Usage Specification).

One row per charged request (spend, or a reservation swept at its bound). All
21 columns FOCUS 1.2 makes mandatory are present, with the conditional ones a
token-priced SaaS service fills (ConsumedQuantity/Unit, ChargeFrequency,
ResourceId, SkuId, ServiceSubcategory, Tags). Costs are exact decimals and
there are no discounts, so BilledCost = EffectiveCost = ListCost =
ContractedCost = the recorded cost, and BilledCost sums to what /spend/report
totals for the same period.

Custom columns (``x_`` prefix, as FOCUS requires of them) carry the request's
model, tokens and, per tag dimension seen in the period, its split
allocation: ``x_Split_<dimension>`` is a JSON object of value -> share (or
``(untagged)`` -> cost), the same shares as ``allocation=split`` reports.
"""

from __future__ import annotations

import csv
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO

import asyncpg
import msgspec

from ledger.domain.allocation import UNTAGGED, allocate, dimension_of
from ledger.postgres.store import create_pool
from ledger.settings import Settings

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]

MANDATORY = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
)
CONDITIONAL = (
    "ChargeFrequency",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ResourceId",
    "ResourceName",
    "ServiceSubcategory",
    "SkuId",
    "Tags",
)
CUSTOM = ("x_RequestId", "x_Model", "x_InputTokens", "x_OutputTokens", "x_UserHash", "x_KeyHash", "x_Kind")
ACCOUNT = "budget-ledger"
_json = msgspec.json.Encoder()
# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def split_column(dimension: str) -> str:
    return "x_Split_" + _UNSAFE.sub("_", dimension)


def header(dimensions: Sequence[str]) -> list[str]:
    return [*MANDATORY, *CONDITIONAL, *CUSTOM, *(split_column(d) for d in dimensions)]


def cell(value: Any) -> str:
    if isinstance(value, datetime):
        return _iso(value)
    text = "" if value is None else format(value, "f") if isinstance(value, Decimal) else str(value)
    # Neutralised with a leading quote, which spreadsheets show as text.
    return "'" + text if text.startswith(_FORMULA_START) else text


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month(moment: datetime) -> tuple[datetime, datetime]:
    start = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def focus_tags(tags: list[str], metadata: dict[str, Any]) -> dict[str, str]:
    """FOCUS Tags: flat key -> string. ``team:a`` is team=a (several values joined
    by commas), a plain tag is a key with an empty value, metadata keys are
    ``metadata.<key>`` (non-strings as JSON)."""
    out: dict[str, str] = {}
    for tag in tags:
        parts = dimension_of(tag)
        if parts is None:
            out.setdefault(tag, "")
        else:
            key, value = parts
            out[key] = f"{out[key]},{value}" if out.get(key) else value
    for key, value in metadata.items():
        out[f"metadata.{key}"] = value if isinstance(value, str) else _json.encode(value).decode()
    return out


def row(r: asyncpg.Record, dimensions: Sequence[str]) -> list[Any]:
    """One charge's values, in header order: Decimals, ints, datetimes, strings, None."""
    cost = Decimal(r["cost"])
    at: datetime = r["recorded_at"]
    hour = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    period_start, period_end = _month(at)
    model = r["model"] or "(unknown model)"
    provider = r["provider"] or "(unknown provider)"
    tokens = int(r["prompt_tokens"]) + int(r["completion_tokens"])
    tags = list(r["tags"])
    metadata = msgspec.json.decode(r["metadata"]) if r["metadata"] else {}
    if r["kind"] == "expired":
        description = "reservation expired before the answer was recorded: charged at its reserved bound"
    else:
        description = (
            f"{model} via {provider}: {r['prompt_tokens']} input and {r['completion_tokens']} output tokens"
        )
    shares = allocate(cost, tags)
    splits = []
    for dimension in dimensions:
        mine = {v: format(s, "f") for (d, v), s in shares.items() if d == dimension}
        splits.append(_json.encode(mine or {UNTAGGED: format(cost, "f")}).decode())
    values: list[Any] = [
        cost,  # BilledCost
        ACCOUNT,
        ACCOUNT,
        "USD",
        period_end,
        period_start,
        "Usage",  # ChargeCategory
        None,  # ChargeClass: not a correction
        description,
        hour + timedelta(hours=1),
        hour,
        cost,  # ContractedCost
        cost,  # EffectiveCost
        provider,  # InvoiceIssuerName
        cost,  # ListCost
        tokens,  # PricingQuantity
        "Tokens",
        provider,  # ProviderName
        provider,  # PublisherName
        "AI and Machine Learning",
        model,  # ServiceName
        "Usage-Based",  # ChargeFrequency
        tokens,
        "Tokens",
        r["request_id"],  # ResourceId
        model,  # ResourceName
        "Generative AI",  # ServiceSubcategory
        model,  # SkuId
        _json.encode(focus_tags(tags, metadata)).decode(),
        r["request_id"],
        model,
        int(r["prompt_tokens"]),
        int(r["completion_tokens"]),
        r["user_hash"],
        r["key_hash"],
        r["kind"],
        *splits,
    ]
    return values


async def dimensions(conn: Conn, start: datetime, end: datetime) -> list[str]:
    """The tag dimensions charged requests of the period have (for its x_Split_ columns)."""
    rows = await conn.fetch(
        "select distinct dimension from spend_allocations "
        "where dimension <> '' and recorded_at >= $1 and recorded_at < $2 order by 1",
        start,
        end,
    )
    return [r[0] for r in rows]


async def rows(conn: Conn, start: datetime, end: datetime, dims: Sequence[str]) -> AsyncIterator[list[str]]:
    """The period's charges, oldest first (call inside a transaction: a cursor)."""
    query = (
        "select request_id, recorded_at, kind, model, provider, tags, user_hash, metadata::text as metadata, "
        "prompt_tokens, completion_tokens, cost, key_hash from spend_logs "
        "where kind in ('spend', 'expired') and recorded_at >= $1 and recorded_at < $2 "
        "order by recorded_at, position"
    )
    async for r in conn.cursor(query, start, end, prefetch=1000):
        yield row(r, dims)


async def write_file(settings: Settings, start: datetime, end: datetime, path: str, *, parquet: bool) -> int:
    """`ledger export --focus -o PATH`: CSV or Parquet; returns the rows written."""
    if parquet:
        _arrow()  # refused before anything is read
        pool = await create_pool(settings)
        try:
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                return await write_parquet(conn, start, end, path)
        finally:
            await pool.close()
    with open(path, "w", newline="", encoding="utf-8") as out:  # noqa: ASYNC230 - a CLI's one file
        return await write_csv(settings, start, end, out)


async def write_csv(settings: Settings, start: datetime, end: datetime, out: TextIO) -> int:
    """`ledger export --focus`: the dataset as CSV to ``out``; returns the rows written."""
    pool = await create_pool(settings)
    count = 0
    try:
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            dims = await dimensions(conn, start, end)
            writer = csv.writer(out)
            writer.writerow(header(dims))
            async for values in rows(conn, start, end, dims):
                writer.writerow([cell(v) for v in values])
                count += 1
    finally:
        await pool.close()
    return count


def month_bounds(raw: str) -> tuple[datetime, datetime]:
    """``2026-10`` -> its first instant and the next month's, in UTC."""
    start = datetime.strptime(raw, "%Y-%m").replace(tzinfo=UTC)
    return _month(start)


# ------------------------------------------------------------------ Parquet

_MONEY = {"BilledCost", "ContractedCost", "EffectiveCost", "ListCost"}
_TIMES = {"BillingPeriodEnd", "BillingPeriodStart", "ChargePeriodEnd", "ChargePeriodStart"}
_COUNTS = {"PricingQuantity", "ConsumedQuantity", "x_InputTokens", "x_OutputTokens"}
_BATCH = 10_000


class ParquetUnavailable(RuntimeError):
    """pyarrow is not installed (it is the ``parquet`` extra)."""


def _arrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ParquetUnavailable(
            "Parquet needs pyarrow: pip install 'budget-ledger[parquet]' (CSV works without it)"
        ) from None
    return pyarrow


def parquet_available() -> bool:
    try:
        _arrow()
    except ParquetUnavailable:
        return False
    return True


def _schema(pa: Any, columns: list[str]) -> Any:
    def kind(name: str) -> Any:
        if name in _MONEY:
            # exact: 18 decimal places hold every recorded cost (prices per token times tokens)
            return pa.decimal128(38, 18)
        if name in _TIMES:
            return pa.timestamp("ms", tz="UTC")
        if name in _COUNTS:
            return pa.int64()
        return pa.string()

    return pa.schema([pa.field(name, kind(name), nullable=True) for name in columns])


async def write_parquet(conn: Conn, start: datetime, end: datetime, sink: Any) -> int:
    """The dataset as Parquet to ``sink`` (a path or a binary file); returns the rows
    written. Call inside a transaction (a cursor)."""
    pa = _arrow()
    dims = await dimensions(conn, start, end)
    columns = header(dims)
    schema = _schema(pa, columns)
    count = 0
    with pa.parquet.ParquetWriter(sink, schema) as writer:
        batch: list[list[Any]] = []

        def flush() -> None:
            arrays = [list(col) for col in zip(*batch, strict=True)] if batch else [[] for _ in columns]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            batch.clear()

        async for values in rows(conn, start, end, dims):
            batch.append(values)
            count += 1
            if len(batch) >= _BATCH:
                flush()
        flush()
    return count
