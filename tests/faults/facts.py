"""What the event log says happened in a fault scenario: the one place every
figure of the fault table is measured (no scenario writes a figure itself).

- admitted: requests that got a reservation (``RequestAdmitted`` in the log);
- lost: 2xx answers whose request has no durable charge, plus admitted requests
  still without a terminal event once the cluster is quiet;
- dups: requests with more than one terminal event (any version) or charged
  more than once;
- peak commitment: replaying the log in order, the most a budget was ever
  committed to at an admission (charged so far + estimates still reserved).
  The gateway appends a terminal event before it frees the counter, so the log
  never shows less room than the counter had: ``peak <= max_budget`` holds for
  a correct gateway however requests interleave, and fails for one that admits
  past the budget.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg

from tests.faults.harness import Cluster

TERMINAL = ("SpendRecorded", "ReservationExpired", "RequestReleased")
CHARGING = ("SpendRecorded", "ReservationExpired")


@dataclass
class Facts:
    admitted: int = 0  # RequestAdmitted (on the tag, when one is given)
    reserved: int = 0  # of those, admitted with a reservation (not LEDGER_ON_REDIS_DOWN=allow)
    estimates: Decimal = Decimal(0)  # sum of the reserved admissions' estimates
    charged: Decimal = Decimal(0)  # sum of SpendRecorded + ReservationExpired costs
    peak: Decimal = Decimal(0)  # most committed at any admission (see module doc)
    expired: int = 0
    released: int = 0
    spends: int = 0
    lost: list[str] = field(default_factory=list)
    dups: list[str] = field(default_factory=list)
    denied: int = 0  # RequestDenied for budget reasons (on the tag)
    refused_redis_down: int = 0  # RequestDenied because budgets could not be checked


async def _open_admissions(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            """select count(*) from events a where a.type = 'RequestAdmitted' and not exists
               (select 1 from events t where t.stream = a.stream and t.position > a.position
                and t.type = any($1::text[]))""",
            list(TERMINAL),
        )
    )


async def ledger_facts(
    pg_url: str, answered: Iterable[str] = (), *, tag: str | None = None, quiet_within_s: float = 4.0
) -> Facts:
    """Wait (up to ``quiet_within_s``) until every admission has its ending, then
    read the log. ``answered``: request ids the clients got a 2xx for. ``tag``:
    count admissions, charges and the peak on that budget tag only."""
    conn = await asyncpg.connect(pg_url)
    try:
        deadline = time.monotonic() + quiet_within_s
        while await _open_admissions(conn) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        rows = await conn.fetch(
            """select stream, type, data->>'request_id' as rid, data->>'estimate' as estimate,
                      data->>'cost' as cost, data->'budget_tags' as budget_tags,
                      coalesce((data->>'unreserved')::bool, false) as unreserved,
                      data->>'tag' as denied_tag, data->>'reason' as reason
               from events where stream like 'request:%' or type = 'RequestDenied'
               order by position"""
        )
    finally:
        await conn.close()
    facts = Facts()
    terminals: Counter[str] = Counter()
    charges: Counter[str] = Counter()
    rid_of: dict[str, str] = {}
    spent_ids: set[str] = set()
    admitted_streams: set[str] = set()
    held: dict[str, Decimal] = {}  # stream -> estimate still reserved on the tag
    committed = Decimal(0)
    on_tag: dict[str, bool] = defaultdict(bool)
    for r in rows:
        kind, stream = r["type"], r["stream"]
        if kind == "RequestDenied":
            if (tag is None or r["denied_tag"] == tag) and r["reason"] in ("budget", "budget_recheck"):
                facts.denied += 1
            facts.refused_redis_down += r["reason"] == "redis_unavailable"
            continue
        tags = set(_json_list(r["budget_tags"]))
        if kind == "RequestAdmitted":
            rid_of[stream] = r["rid"]
            admitted_streams.add(stream)
            on_tag[stream] = tag is None or tag in tags
            if not on_tag[stream]:
                continue
            facts.admitted += 1
            if not r["unreserved"]:
                estimate = Decimal(r["estimate"])
                facts.reserved += 1
                facts.estimates += estimate
                held[stream] = estimate
                committed += estimate
                facts.peak = max(facts.peak, committed)
        elif kind in TERMINAL:
            terminals[stream] += 1
            if kind in CHARGING:
                charges[stream] += 1
                if on_tag[stream]:
                    facts.charged += Decimal(r["cost"])
                    committed += Decimal(r["cost"])
            if kind == "SpendRecorded":
                facts.spends += 1
                spent_ids.add(rid_of.get(stream, r["rid"]))
            elif kind == "ReservationExpired":
                facts.expired += 1
            else:
                facts.released += 1
            committed -= held.pop(stream, Decimal(0))
    # An answered request's charge is its SpendRecorded: one swept at its estimate
    # instead had its recording lost (and was overcharged).
    lost = {rid for rid in answered if rid not in spent_ids}
    lost |= {rid_of[s] for s in admitted_streams if terminals[s] == 0}
    facts.lost = sorted(lost)
    facts.dups = sorted(
        rid_of.get(s, s) for s in set(terminals) | set(charges) if terminals[s] > 1 or charges[s] > 1
    )
    return facts


def _json_list(value: object) -> list[str]:
    if value is None:
        return []
    parsed = json.loads(value) if isinstance(value, str) else value
    return [str(x) for x in parsed] if isinstance(parsed, list) else []


async def caught_up(pg_url: str, timeout: float = 60) -> None:
    """Every projection has read the whole log (so views can be compared with it)."""
    conn = await asyncpg.connect(pg_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            head = await conn.fetchval("select coalesce(max(position), 0) from events")
            behind = await conn.fetchval(
                "select count(*) from projection_checkpoints where position < $1", head
            )
            known = await conn.fetchval("select count(*) from projection_checkpoints")
            if behind == 0 and known > 0:
                return
            if time.monotonic() > deadline:
                rows = await conn.fetch("select * from projection_checkpoints")
                raise AssertionError(f"projections did not catch up to {head}: {[tuple(r) for r in rows]}")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


_VERIFIED = re.compile(r"ok: (\d+) views .* and (\d+) counters agree")


async def verify(cluster: Cluster, *, counters_at_least: int = 1) -> tuple[int, int]:
    """``ledger verify`` (the CLI, as an operator runs it) exits 0 once the views
    have caught up, having compared at least ``counters_at_least`` live counters
    with the log. Returns (views, counters) checked."""
    await caught_up(cluster.pg.url)
    done = await asyncio.to_thread(cluster.ledger, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    found = _VERIFIED.search(" ".join(done.stdout.split()))
    assert found, done.stdout
    views, counters = int(found[1]), int(found[2])
    assert counters >= counters_at_least, done.stdout
    return views, counters
