"""Read-side queries the gateway and the tools serve. The SQL of each answer lives here, once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from ledger.domain.allocation import UNTAGGED, valid_dimension

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A pool, or one connection (several queries in one snapshot).
    Reader = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]


@dataclass(frozen=True, slots=True)
class TagTotals:
    total_spend: Decimal
    request_count: int


# ------------------------------------------------------------------ spend views

_GROUPS = {
    "tag": "unnest(tags)",
    "user": "user_hash",
    "model": "model",
}
INTERVALS = ("day", "week", "month")


def valid_group(group_by: str) -> bool:
    if group_by in _GROUPS:
        return True
    key = group_by.removeprefix("metadata.")
    return group_by.startswith("metadata.") and 0 < len(key) <= 128


def _group_expr(group_by: str, args: list[Any]) -> str:
    """The SQL expression a report groups by; a metadata key becomes the next bound
    parameter (appended to ``args``), never spliced into the text."""
    if group_by in _GROUPS:
        return _GROUPS[group_by]
    args.append(group_by.removeprefix("metadata."))
    return f"metadata->>${len(args)}"


async def spend_report(
    pool: Reader, *, group_by: str, interval: str, start: Any, end: Any
) -> list[asyncpg.Record]:
    """Spend per group and period (day, ISO week or month) between two instants."""
    assert valid_group(group_by)
    assert interval in INTERVALS
    args: list[Any] = [start, end]
    expr = _group_expr(group_by, args)
    sql = f"""
        select {expr} as grp, date_trunc('{interval}', recorded_at at time zone 'UTC')::date as period,
               sum(cost) as spend, count(*) as requests,
               sum(prompt_tokens) as prompt_tokens, sum(completion_tokens) as completion_tokens
        from spend_logs
        where kind in ('spend', 'expired') and recorded_at >= $1 and recorded_at < $2
        group by 1, 2 order by 2, 3 desc
    """  # noqa: S608 - expression and interval come from whitelists
    return await pool.fetch(sql, *args)


ALLOCATIONS = ("split", "full")


def dimension_group(group_by: str) -> str | None:
    """``tag:team`` -> "team" (a tag dimension); None for any other grouping."""
    if not group_by.startswith("tag:"):
        return None
    name = group_by.removeprefix("tag:")
    return name if valid_dimension(name) else None


async def dimension_report(
    pool: Reader, *, dimension: str, allocation: str, interval: str, start: Any, end: Any
) -> list[asyncpg.Record]:
    """Spend per value of a tag dimension (``dimension`` "" is every tag) and period.

    Every charged request is in the answer: under each of its values, or under
    ``(untagged)`` when it has none. ``split`` divides its cost among its values
    (the spend_allocations view), so the rows sum exactly to the period's spend;
    ``full`` counts the full cost under each value. Requests and tokens count a
    request under each of its values either way.
    """
    assert allocation in ALLOCATIONS
    assert interval in INTERVALS
    args: list[Any] = [start, end, UNTAGGED]
    if allocation == "split":
        args.append(dimension)
        values = """
            left join spend_allocations a
              on a.position = c.position and a.dimension = $4
             and a.recorded_at >= $1 and a.recorded_at < $2
        """
        spend = "coalesce(a.share, c.cost)"
    elif dimension == "":
        values = "left join lateral (select distinct t as value from unnest(c.tags) t) a on true"
        spend = "c.cost"
    else:
        args.append(dimension)
        values = """
            left join lateral (
                select distinct substr(t, length($4) + 2) as value from unnest(c.tags) t
                where split_part(t, ':', 1) = $4 and length(t) > length($4) + 1
            ) a on true
        """
        spend = "c.cost"
    sql = f"""
        select coalesce(a.value, $3) as grp,
               date_trunc('{interval}', c.recorded_at at time zone 'UTC')::date as period,
               sum({spend}) as spend, count(*) as requests,
               sum(c.prompt_tokens) as prompt_tokens, sum(c.completion_tokens) as completion_tokens
        from spend_logs c {values}
        where c.kind in ('spend', 'expired') and c.recorded_at >= $1 and c.recorded_at < $2
        group by 1, 2 order by 2, 3 desc, 1
    """  # noqa: S608 - fixed fragments; the dimension is a bound parameter
    return await pool.fetch(sql, *args)


async def total_spend(pool: Reader, start: Any, end: Any) -> Decimal:
    """Charged spend between two instants, each request once: what a bill totals."""
    value = await pool.fetchval(
        f"select coalesce(sum(cost), 0) from spend_logs where {_CHARGED} "  # noqa: S608
        "and recorded_at >= $1 and recorded_at < $2",
        start,
        end,
    )
    return Decimal(value)


async def spend_by_tag(pool: asyncpg.Pool, start: Any, end: Any) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        select tag, sum(spend) as spend, sum(requests) as requests,
               sum(prompt_tokens) as prompt_tokens, sum(completion_tokens) as completion_tokens
        from tag_daily_spend where day >= $1 and day <= $2
        group by tag order by spend desc
        """,
        start,
        end,
    )


async def spend_by_user(pool: asyncpg.Pool, start: Any, end: Any, limit: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        select user_hash, sum(spend) as spend, sum(requests) as requests
        from user_daily_spend where day >= $1 and day <= $2
        group by user_hash order by spend desc limit $3
        """,
        start,
        end,
        limit,
    )


async def tag_daily_activity(
    pool: asyncpg.Pool, tags: list[str] | None, start: Any, end: Any
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """
        select tag, day, model, spend, requests, prompt_tokens, completion_tokens
        from tag_daily_spend
        where day >= $1 and day <= $2 and ($3::text[] is null or tag = any($3))
        order by day, tag, model
        """,
        start,
        end,
        tags,
    )


async def user_info(pool: asyncpg.Pool, user_hash: str) -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
    total = await pool.fetchrow("select * from user_spend where user_hash = $1", user_hash)
    daily = await pool.fetch(
        "select day, spend, requests from user_daily_spend where user_hash = $1 order by day",
        user_hash,
    )
    return total, daily


_LOG_FIELDS = (
    "position, request_id, recorded_at, admitted_at, kind, model, provider, tags, user_hash, "
    "metadata::text as metadata, prompt_tokens, completion_tokens, cost, status, latency_ms, streamed, "
    "key_hash"
)
# Kinds of spend_logs rows that charge money.
_CHARGED = "kind in ('spend', 'expired')"


def spend_logs_query(
    *,
    tag: str | None,
    user_hash: str | None,
    model: str | None,
    status: int | None,
    kind: str | None,
    start: Any,
    end: Any,
    cursor: tuple[Any, int] | None,
    limit: int | None,
    request_id: str | None = None,
    key_hashes: list[str] | None = None,
) -> tuple[str, list[Any]]:
    """Newest first; the cursor is the (recorded_at, position) of the last row seen.
    ``key_hashes`` keeps the requests made with any of these API keys."""
    where = ["recorded_at >= $1", "recorded_at < $2"]
    args: list[Any] = [start, end]

    def add(cond: str, value: Any) -> None:
        args.append(value)
        where.append(cond.replace("?", f"${len(args)}"))

    if tag is not None:
        add("tags @> array[?]::text[]", tag)
    if user_hash is not None:
        add("user_hash = ?", user_hash)
    if model is not None:
        add("model = ?", model)
    if status is not None:
        add("status = ?", status)
    if kind is not None:
        add("kind = ?", kind)
    if request_id is not None:
        add("request_id = ?", request_id)
    if key_hashes is not None:
        add("key_hash = any(?::text[])", key_hashes)
    if cursor is not None:
        args += [cursor[0], cursor[1]]
        where.append(f"(recorded_at, position) < (${len(args) - 1}, ${len(args)})")
    sql = (
        f"select {_LOG_FIELDS} from spend_logs where {' and '.join(where)} "  # noqa: S608
        "order by recorded_at desc, position desc"
    )
    if limit is not None:
        args.append(limit)
        sql += f" limit ${len(args)}"
    return sql, args


async def spend_summary(pool: asyncpg.Pool, logs_sql: str, args: list[Any]) -> list[asyncpg.Record]:
    """Per UTC day, API key, model and end user: the spend of the rows a
    spend_logs_query selects (LiteLLM's summarized /spend/logs)."""
    return await pool.fetch(
        f"""
        select (recorded_at at time zone 'UTC')::date as day, coalesce(key_hash, '') as key_hash,
               coalesce(model, '') as model, coalesce(user_hash, '') as user_hash, sum(cost) as spend
        from ({logs_sql}) as logs group by 1, 2, 3, 4 order by 1
        """,  # noqa: S608 - logs_sql comes from spend_logs_query, its values are bound parameters
        *args,
    )


async def daily_activity(
    pool: asyncpg.Pool,
    *,
    entity: str,
    ids: list[str] | None,
    start: Any,
    end: Any,
    model: str | None,
    key_hashes: list[str] | None,
) -> list[asyncpg.Record]:
    """Per UTC day, entity (a tag, or an end user's hash), model, provider and API
    key: spend, tokens, and requests that succeeded or failed (released or denied).
    A request with several tags counts once under each of them."""
    assert entity in ("tag", "user")
    source = "spend_logs cross join unnest(tags) as e(id)" if entity == "tag" else "spend_logs"
    id_expr = "e.id" if entity == "tag" else "user_hash"
    where = ["recorded_at >= $1", "recorded_at < $2"]
    args: list[Any] = [start, end]
    if entity == "user":
        where.append("user_hash is not null")
    for cond, value in ((f"{id_expr} = any($?::text[])", ids), ("model = $?", model)):
        if value is not None:
            args.append(value)
            where.append(cond.replace("$?", f"${len(args)}"))
    if key_hashes is not None:
        args.append(key_hashes)
        where.append(f"key_hash = any(${len(args)}::text[])")
    ok = f"{_CHARGED} and coalesce(status, 200) < 400"
    sql = f"""
        select (recorded_at at time zone 'UTC')::date as day, {id_expr} as entity,
               coalesce(model, '') as model, coalesce(provider, '') as provider,
               coalesce(key_hash, '') as key_hash,
               coalesce(sum(cost) filter (where {_CHARGED}), 0) as spend,
               sum(prompt_tokens) as prompt_tokens, sum(completion_tokens) as completion_tokens,
               count(*) as api_requests,
               count(*) filter (where {ok}) as successful_requests,
               count(*) filter (where not ({ok})) as failed_requests
        from {source}
        where {" and ".join(where)}
        group by 1, 2, 3, 4, 5
        order by 1 desc, 2, 3
    """  # noqa: S608 - the source and expressions come from the two fixed choices above
    return await pool.fetch(sql, *args)


async def seen_tags(pool: asyncpg.Pool, first_day: Any = None, last_day: Any = None) -> list[asyncpg.Record]:
    """Every tag seen in traffic (tag_info), or those with charges between two days."""
    if first_day is None:
        return await pool.fetch(
            "select tag, first_seen, last_seen, total_spend, request_count from tag_info "
            "where first_seen is not null order by tag"
        )
    return await pool.fetch(
        """
        select i.tag, i.first_seen, i.last_seen, i.total_spend, i.request_count from tag_info i
        where i.first_seen is not null
          and exists (select 1 from tag_daily_spend d where d.tag = i.tag and d.day >= $1 and d.day <= $2)
        order by i.tag
        """,
        first_day,
        last_day,
    )


_REPORT_GROUPS = {"key": "null::text", "customer": "user_hash", "tag": "e.id"}


async def report_rows(
    pool: asyncpg.Pool,
    *,
    by: str,
    start: Any,
    end: Any,
    key_hashes: list[str] | None = None,
    user_hash: str | None = None,
) -> list[asyncpg.Record]:
    """Charged spend per UTC day, group (end user or tag; none for "key"), API key
    and model: what /global/spend/report shapes per team, customer, tag or key."""
    group = _REPORT_GROUPS[by]
    source = "spend_logs cross join unnest(tags) as e(id)" if by == "tag" else "spend_logs"
    where = [_CHARGED, "recorded_at >= $1", "recorded_at < $2"]
    args: list[Any] = [start, end]
    if key_hashes is not None:
        args.append(key_hashes)
        where.append(f"key_hash = any(${len(args)}::text[])")
    if user_hash is not None:
        args.append(user_hash)
        where.append(f"user_hash = ${len(args)}")
    sql = f"""
        select (recorded_at at time zone 'UTC')::date as day, {group} as grp,
               coalesce(key_hash, '') as key_hash, coalesce(model, '') as model,
               sum(cost) as spend, sum(prompt_tokens) as prompt_tokens,
               sum(completion_tokens) as completion_tokens, count(*) as requests
        from {source} where {" and ".join(where)}
        group by 1, 2, 3, 4 order by 1, 2, 5 desc
    """  # noqa: S608 - the group and source come from the fixed table above
    return await pool.fetch(sql, *args)


@dataclass(frozen=True, slots=True)
class WindowSpend:
    spend: Decimal  # charges admitted in the window (after a spend reset, counted from it)
    total_spend: Decimal  # all time
    request_count: int  # all time, charged requests
    model_spend: dict[str, Decimal]  # all time, per model


async def spend_of(
    pool: asyncpg.Pool,
    *,
    column: str,
    value: str,
    window_start: datetime,
    window_end: datetime,
    reset_at: datetime | None = None,
    reset_to: Decimal | None = None,
) -> WindowSpend:
    """Spend of one API key (``key_hash``) or end user (``user_hash``), from the
    spend log: in its budget window (by admission time, as budgets count) and in
    total. A spend reset inside the window restarts the window's count at
    ``reset_to`` from ``reset_at`` on."""
    assert column in ("key_hash", "user_hash")
    counted_from = window_start
    base = Decimal(0)
    if reset_at is not None and window_start <= reset_at < window_end:
        counted_from, base = reset_at, reset_to or Decimal(0)
    rows = await pool.fetch(
        f"""
        select coalesce(model, '') as model, sum(cost) as spend, count(*) as requests,
               coalesce(sum(cost) filter (where admitted_at >= $2 and admitted_at < $3), 0) as in_window
        from spend_logs where {column} = $1 and {_CHARGED}
        group by 1
        """,  # noqa: S608 - the column is one of two fixed names
        value,
        counted_from,
        window_end,
    )
    return WindowSpend(
        spend=base + sum((Decimal(r["in_window"]) for r in rows), Decimal(0)),
        total_spend=sum((Decimal(r["spend"]) for r in rows), Decimal(0)),
        request_count=sum(int(r["requests"]) for r in rows),
        model_spend={r["model"]: Decimal(r["spend"]) for r in rows if r["model"]},
    )


async def tag_totals_view(pool: asyncpg.Pool, names: list[str]) -> dict[str, TagTotals]:
    """All-time totals of each tag from the tag_info view."""
    rows = await pool.fetch(
        "select tag, total_spend, request_count from tag_info where tag = any($1::text[])", names
    )
    return {r["tag"]: TagTotals(Decimal(r["total_spend"]), int(r["request_count"])) for r in rows}


# ------------------------------------------------------------------ projection lag


@dataclass(frozen=True, slots=True)
class Lag:
    name: str
    position: int
    head: int
    events_behind: int
    seconds_behind: float
    error: str | None = None  # why its last batch failed, while it keeps failing
    failing_since: datetime | None = None


async def projection_lag(pool: asyncpg.Pool, names: list[str] | None = None) -> list[Lag]:
    """How far each projection is behind the head of the log."""
    head = int(await pool.fetchval("select coalesce(max(position), 0) from events"))
    if names is None:
        names = [r[0] for r in await pool.fetch("select name from projection_checkpoints order by name")]
    out = []
    for name in names:
        row = await pool.fetchrow(
            "select position, last_error, failing_since from projection_checkpoints where name = $1", name
        )
        position = int(row["position"] if row else 0)
        behind = max(0, head - position)  # positions may have gaps; close enough for lag
        seconds = 0.0
        if behind:
            oldest = await pool.fetchval(
                "select recorded_at from events where position > $1 order by position limit 1",
                position,
            )
            if oldest is not None:
                seconds = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        out.append(Lag(name, position, head, behind, seconds, *((row[1], row[2]) if row else (None, None))))
    return out


async def recent_events(pool: asyncpg.Pool, types: list[str], limit: int) -> list[asyncpg.Record]:
    """The newest events of some types (alerts for the dashboard)."""
    return await pool.fetch(
        "select position, stream, version, type, data::text as data, recorded_at from events "
        "where type = any($1::text[]) order by position desc limit $2",
        types,
        limit,
    )


# ------------------------------------------------------------------ reports and the dashboard
# Totals here count each request once (a request with two tags is one request);
# only the per-tag rows count it under each of its tags.

# A charge with no known price: recorded at 0 with ``unpriced`` in its event.
_UNPRICED = (
    "(s.kind = 'spend' and s.cost = 0 and exists (select 1 from events e "
    "where e.position = s.position and e.data->>'unpriced' = 'true'))"
)
_CHARGED_S = "s.kind in ('spend', 'expired')"
BUCKETS = ("hour", "day")


async def spend_buckets(
    pool: asyncpg.Pool, *, group_by: str, bucket: str, start: datetime, end: datetime
) -> list[asyncpg.Record]:
    """Spend, requests and unpriced requests per group and UTC hour or day."""
    assert valid_group(group_by)
    assert bucket in BUCKETS
    args: list[Any] = [start, end]
    expr = _group_expr(group_by, args)
    sql = f"""
        select {expr} as grp, date_trunc('{bucket}', s.recorded_at at time zone 'UTC') as period,
               sum(s.cost) as spend, count(*) as requests, count(*) filter (where {_UNPRICED}) as unpriced
        from spend_logs s
        where {_CHARGED_S} and s.recorded_at >= $1 and s.recorded_at < $2
        group by 1, 2 order by 2
    """  # noqa: S608 - expression and bucket come from whitelists
    return await pool.fetch(sql, *args)


async def spend_between(pool: asyncpg.Pool, start: datetime, end: datetime) -> asyncpg.Record:
    """Spend, requests (each once), unpriced requests and denials between two instants."""
    row = await pool.fetchrow(
        f"""
        select coalesce(sum(s.cost) filter (where {_CHARGED_S}), 0) as spend,
               count(*) filter (where {_CHARGED_S}) as requests,
               count(*) filter (where {_UNPRICED}) as unpriced,
               count(*) filter (where s.kind = 'denied') as denials
        from spend_logs s
        where s.kind in ('spend', 'expired', 'denied') and s.recorded_at >= $1 and s.recorded_at < $2
        """,  # noqa: S608 - constant fragments
        start,
        end,
    )
    assert row is not None
    return row


async def daily_by_model(pool: asyncpg.Pool, start: datetime, end: datetime) -> list[asyncpg.Record]:
    """Per UTC day and model: spend and requests (each request once), unpriced requests, denials."""
    return await pool.fetch(
        f"""
        select (s.recorded_at at time zone 'UTC')::date as day, s.model,
               coalesce(sum(s.cost) filter (where {_CHARGED_S}), 0) as spend,
               count(*) filter (where {_CHARGED_S}) as requests,
               count(*) filter (where {_UNPRICED}) as unpriced,
               count(*) filter (where s.kind = 'denied') as denials
        from spend_logs s
        where s.kind in ('spend', 'expired', 'denied') and s.recorded_at >= $1 and s.recorded_at < $2
        group by 1, 2 order by 1, 2
        """,  # noqa: S608 - constant fragments
        start,
        end,
    )


async def tag_breakdown(
    pool: asyncpg.Pool, tag: str, by: str, start: datetime, end: datetime, limit: int
) -> list[asyncpg.Record]:
    """One tag's spend per model or per (hashed) user, largest first."""
    column = {"model": "s.model", "user": "s.user_hash"}[by]
    return await pool.fetch(
        f"""
        select {column} as grp, sum(s.cost) as spend, count(*) as requests,
               count(*) filter (where {_UNPRICED}) as unpriced
        from spend_logs s
        where {_CHARGED_S} and s.tags @> array[$1]::text[] and s.recorded_at >= $2 and s.recorded_at < $3
        group by 1 order by 2 desc, 3 desc limit $4
        """,  # noqa: S608 - the column comes from a whitelist
        tag,
        start,
        end,
        limit,
    )


async def denials(
    pool: asyncpg.Pool, *, tag: str | None, start: datetime, end: datetime, limit: int
) -> list[asyncpg.Record]:
    """Denied requests, newest first, with why: the blocking tag, its spend, limit and the
    request's estimate come from the RequestDenied event itself."""
    return await pool.fetch(
        """
        select s.position, s.request_id, s.recorded_at, s.model, s.tags, s.user_hash,
               s.metadata::text as metadata,
               nullif(e.data->>'tag', '') as denied_tag, e.data->>'reason' as reason,
               (e.data->>'estimate')::numeric as estimate, (e.data->>'spent')::numeric as spent,
               (e.data->>'reserved')::numeric as reserved,
               (e.data->>'max_budget')::numeric as max_budget
        from spend_logs s join events e on e.position = s.position
        where s.kind = 'denied' and s.recorded_at >= $1 and s.recorded_at < $2
          and ($3::text is null or s.tags @> array[$3]::text[])
        order by s.recorded_at desc, s.position desc limit $4
        """,
        start,
        end,
        tag,
        limit,
    )


async def denying_tags(pool: asyncpg.Pool, since: datetime) -> list[asyncpg.Record]:
    """Per tag that refused requests for its budget since ``since``: the last refusal,
    how many, and the last admission of a request that carried the tag and got charged."""
    return await pool.fetch(
        """
        with d as (
            select e.data->>'tag' as tag, max(s.recorded_at) as last_denied_at, count(*) as denials
            from spend_logs s join events e on e.position = s.position
            where s.kind = 'denied' and s.recorded_at >= $1
              and coalesce(e.data->>'reason', 'budget') = 'budget' and coalesce(e.data->>'tag', '') <> ''
            group by 1
        )
        select d.tag, d.last_denied_at, d.denials,
               (select max(c.admitted_at) from spend_logs c
                where c.kind in ('spend', 'expired') and c.tags @> array[d.tag]
                  and c.recorded_at >= $1) as last_admitted_at
        from d
        """,
        since,
    )
