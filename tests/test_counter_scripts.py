"""The Lua scripts against Redis alone: every rule a counter relies on, one at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from ledger.counters import keys, scripts

K1 = keys.counter("tag:a", 1, 1000)
K2 = keys.counter("tag:b", 1, 1000)
G1 = keys.generation("tag:a")
G2 = keys.generation("tag:b")
R1 = keys.registry("tag:a")
ENTRY = "1000000|2000000|1|100"  # window [1000 s, 2000 s), epoch 1, limit 100
BIG = 2**62  # limits far above 2^53: exact arithmetic or bust


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def run(r: aioredis.Redis, name: str, keys_: list[str], args: list[Any]) -> Any:
    return await r.eval(scripts.source(name), len(keys_), *keys_, *args)


async def built(
    r: aioredis.Redis, key: str, spent: int = 0, reserved: int = 0, pos: int = 10, run: str | None = None
) -> None:
    """A counter as a rebuild in this server's life would leave it."""
    run = run or f"{(await r.info('server'))['run_id']}.{(await r.info('replication'))['master_replid']}"
    await r.hset(key, mapping={"spent": spent, "reserved": reserved, "pos": pos, "run": run})


async def state(r: aioredis.Redis, key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (await r.hgetall(key)).items()}


async def reserve(
    r: aioredis.Redis, rid: str, est: int, *limits: int, counters: tuple[str, ...] = (K1,), nonce: str = "n1"
) -> Any:
    reply = await run(
        r,
        "reserve",
        [keys.OPEN, keys.OPEN_KEYS, *counters],
        [rid, est, 99, keys.join(list(counters)), nonce, len(counters), *limits, 0, 0, ""],
    )
    return scripts.reserve_reply(reply)


async def settle(
    r: aioredis.Redis,
    rid: str,
    actual: int,
    at: int,
    admitted: int,
    held: str,
    counters: tuple[str, ...] = (K1,),
    nonce: str = "n1",
    swept: bool = False,
) -> int:
    gens = [keys.generation_of(k) for k in counters]
    reply = await run(
        r,
        "settle",
        [keys.OPEN, keys.OPEN_KEYS, *counters, *gens],
        [rid, actual, at, admitted, 0, 0, held, nonce, at, "1" if swept else "0", "0"],
    )
    settled = scripts.settle_reply(reply)
    assert isinstance(settled, scripts.Settled)
    return settled.charged


async def confirm(
    r: aioredis.Redis,
    rid: str,
    est: int,
    admitted: int,
    *limits: int,
    counters: tuple[str, ...] = (K1,),
    regs: tuple[str, ...] = (),
    at: int = 0,
    nonce: str = "n1",
) -> Any:
    gens = [keys.generation_of(k) for k in counters]
    reply = await run(
        r, "confirm", [*regs, *counters, *gens], [rid, est, admitted, at, len(regs), nonce, *limits]
    )
    return scripts.confirm_reply(reply)


# ------------------------------------------------------------------ reserve


async def test_reserve_reports_every_missing_counter_and_never_reads_missing_as_zero(
    r: aioredis.Redis,
) -> None:
    await built(r, K2)
    assert await reserve(r, "q", 5, 100, 100, counters=(K1, K2)) == scripts.Missing((0,))
    assert await r.exists(K1) == 0  # nothing created
    assert await reserve(r, "q", 5, 100, 100, counters=(K2, K1)) == scripts.Missing((1,))


async def test_a_counter_from_another_server_life_counts_as_missing(r: aioredis.Redis) -> None:
    """Review finding 1: Redis restarted from an RDB/AOF file (or a replica promoted)
    brings back counters that miss recent changes; they must be rebuilt, not trusted."""
    await built(r, K1, spent=5, run="0" * 40)
    assert await reserve(r, "q", 5, 100) == scripts.Missing((0,))
    assert await confirm(r, "q", 5, 1, 100) == scripts.Missing((0,))
    # a rebuild replaces it (it is not live), under a token of this life
    token = scripts.begin_reply(await run(r, "begin", [K1, G1, R1], ["t1", ENTRY]))
    assert token is not None
    assert token.endswith(":t1")
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 7, 0, 30, 0])) == "ok"
    assert (await state(r, K1))["spent"] == "7"
    # a token restored from another life is not one a rebuild of this life started under
    await r.hset(G1, "token", "0" * 40 + ":t9")
    fresh = scripts.begin_reply(await run(r, "begin", [K2, G1, R1], ["t2", ENTRY]))
    assert fresh is not None
    assert fresh.endswith(":t2")


async def test_a_reserve_run_twice_answers_its_own_attempt_and_refuses_another(
    r: aioredis.Redis,
) -> None:
    """A cluster client sends a call again when its reply was lost: the same attempt
    (nonce) takes nothing twice; another attempt under the id is a duplicate; and
    when a counter was rebuilt in between (without the reservation: the log has no
    such attempt yet), the attempt reserves afresh, once, within the limit."""
    await built(r, K1, spent=10)
    await built(r, K2, spent=10)
    both = (K1, K2)
    first = await reserve(r, "q", 30, 100, 100, counters=both)
    assert first == scripts.Ok(0, 60)
    assert await reserve(r, "q", 30, 100, 100, counters=both) == first
    assert [(await state(r, k))["reserved"] for k in both] == ["30", "30"]
    assert await reserve(r, "q", 30, 100, 100, counters=both, nonce="n2") == scripts.Dup()
    await built(r, K2, spent=50)  # rebuilt since, from a log without q (and with more spend)
    await r.hdel(K2, "r:q")
    assert await reserve(r, "q", 30, 100, 100, counters=both) == scripts.Ok(1, 20)
    assert [(await state(r, k))["reserved"] for k in both] == ["30", "30"]
    assert await r.hget(keys.OPEN_KEYS, "q") == b"n1|" + keys.join(list(both)).encode()
    await built(r, K2, spent=80)
    await r.hdel(K2, "r:q")
    # no room left there: refused, and nothing of the attempt stays anywhere
    assert await reserve(r, "q", 30, 100, 100, counters=both) == scripts.Deny(1, 80, 0)
    assert [(await state(r, k)).get("r:q") for k in both] == [None, None]
    assert (await state(r, K1))["reserved"] == "0"
    assert await r.hexists(keys.OPEN_KEYS, "q") == 0


async def test_reserve_is_all_or_nothing_and_names_the_tightest(r: aioredis.Redis) -> None:
    await built(r, K1, spent=90)
    await built(r, K2, spent=10)
    reply = await reserve(r, "q", 20, 100, 100, counters=(K1, K2))
    assert reply == scripts.Deny(0, 90, 0)
    assert (await state(r, K2))["reserved"] == "0"  # the other one untouched
    reply = await reserve(r, "q", 5, 100, 100, counters=(K1, K2))
    assert reply == scripts.Ok(0, 5)  # K1 has 5 left afterwards, K2 has 85
    assert (await state(r, K1))["r:q"] == "5|n1"
    assert await r.zscore(keys.OPEN, "q") == 99
    assert (await r.hget(keys.OPEN_KEYS, "q")).decode() == "n1|" + keys.join([K1, K2])


async def test_reserve_refuses_a_request_id_already_in_flight(r: aioredis.Redis) -> None:
    await built(r, K1)
    assert isinstance(await reserve(r, "q", 5, 100), scripts.Ok)
    assert await reserve(r, "q", 5, 100, nonce="n2") == scripts.Dup()
    await r.delete(keys.OPEN_KEYS)  # even with the index gone, the counter knows
    assert await reserve(r, "q", 5, 100, nonce="n2") == scripts.Dup()
    assert (await state(r, K1))["reserved"] == "5"


async def test_money_is_exact_above_2_pow_53_nanos(r: aioredis.Redis) -> None:
    limit = 2**60 + 7
    await built(r, K1, spent=2**60)
    assert isinstance(await reserve(r, "a", 7, limit), scripts.Ok)
    assert await reserve(r, "b", 1, limit) == scripts.Deny(0, 2**60, 7)  # one nano too many
    assert (await state(r, K1))["reserved"] == "7"
    assert await reserve(r, "c", 3, BIG, counters=(K2,)) == scripts.Missing((0,))
    await built(r, K2)
    assert await reserve(r, "c", 3, BIG, counters=(K2,)) == scripts.Ok(0, BIG - 3)


# ------------------------------------------------------------------ settle


async def test_settle_charges_once_and_gives_the_reservation_back(r: aioredis.Redis) -> None:
    await built(r, K1, pos=10)
    await reserve(r, "q", 50, 100)
    assert await settle(r, "q", 30, at=20, admitted=15, held="1") == 1
    s = await state(r, K1)
    assert (s["spent"], s["reserved"], "r:q" in s) == ("30", "0", False)
    assert await r.zscore(keys.OPEN, "q") is None
    # a second settle (a retry, a sweeper) changes nothing
    assert await settle(r, "q", 30, at=20, admitted=15, held="1") == 0
    assert (await state(r, K1))["spent"] == "30"


async def test_a_zero_estimate_settles(r: aioredis.Redis) -> None:
    """Review finding 11: HINCRBY by '-0' is refused by Redis; the settle failed halfway."""
    await built(r, K1, pos=10)
    await reserve(r, "z", 0, 100)
    assert await settle(r, "z", 0, at=20, admitted=15, held="1") == 1
    s = await state(r, K1)
    assert (s["spent"], s["reserved"], "r:z" in s) == ("0", "0", False)
    assert await r.hget(keys.OPEN_KEYS, "z") is None


async def test_another_attempt_under_the_same_id_is_never_touched(r: aioredis.Redis) -> None:
    """Review findings 4 and 9: giving back (or sweeping) one attempt released, or
    charged, another attempt's reservation under the same request id."""
    await built(r, K1, pos=10)
    await reserve(r, "q", 50, 100, nonce="first")
    # a second attempt's cleanup (its reserve answered dup) gives back nothing of the first
    await run(
        r, "settle", [keys.OPEN, keys.OPEN_KEYS, K1, G1], ["q", 0, 2**62, 0, 0, 0, "1", "second", 0, "0", "0"]
    )
    s = await state(r, K1)
    assert (s["reserved"], s["r:q"]) == ("50", "50|first")
    assert await r.hget(keys.OPEN_KEYS, "q") is not None
    # a settle of an older, finished attempt charges nothing twice and leaves this one alone
    assert await settle(r, "q", 30, at=20, admitted=15, held="0", nonce="older", swept=True) == 0
    assert (await state(r, K1))["r:q"] == "50|first"
    assert await confirm(r, "q", 50, 12, 100, nonce="other") == scripts.Dup()


async def test_a_counter_built_after_the_charge_already_holds_it(r: aioredis.Redis) -> None:
    await built(r, K1, spent=30, pos=25)
    assert await settle(r, "q", 30, at=20, admitted=15, held="0") == 0
    assert (await state(r, K1))["spent"] == "30"


async def test_a_counter_that_never_held_the_reservation_is_charged_exactly_once(r: aioredis.Redis) -> None:
    # built before the admission (pos < admitted), and the request reserved elsewhere
    await built(r, K1, pos=5)
    assert await settle(r, "q", 30, at=20, admitted=15, held="0") == 1
    assert await settle(r, "q", 30, at=20, admitted=15, held="0") == 0
    s = await state(r, K1)
    assert (s["spent"], s["reserved"], s["x:q"]) == ("30", "0", "1")


async def test_a_counter_rebuilt_after_the_admission_without_the_reservation_means_settled(
    r: aioredis.Redis,
) -> None:
    await built(r, K1, spent=30, pos=17)  # rebuilt at 17 >= admitted 15, with no r:q: settled before
    assert await settle(r, "q", 30, at=20, admitted=15, held="0") == 0
    assert (await state(r, K1))["spent"] == "30"


async def test_a_held_reservation_that_is_gone_was_settled(r: aioredis.Redis) -> None:
    await built(r, K1, pos=5)
    assert await settle(r, "q", 30, at=20, admitted=15, held="1") == 0
    assert (await state(r, K1))["spent"] == "0"


async def test_a_sweeper_settle_is_a_no_op_once_the_index_no_longer_lists_the_attempt(
    r: aioredis.Redis,
) -> None:
    await built(r, K1, pos=5)
    assert await settle(r, "q", 30, at=20, admitted=15, held="0", swept=True) == 0  # not listed
    await reserve(r, "p", 10, 100)
    await r.hdel(K1, "r:p")  # lost with a rebuild from before its admission
    assert await settle(r, "p", 7, at=20, admitted=15, held="0", nonce="n1", swept=True) == 1


async def test_settles_and_confirms_fence_rebuilds_that_read_the_log_before_them(r: aioredis.Redis) -> None:
    """Review finding 6: a rebuild that read the log before an admission committed
    landed after the admission confirmed, when the counter alone was lost twice."""
    token = scripts.begin_reply(await run(r, "begin", [K1, G1, R1], ["t1", ENTRY]))
    assert token is not None
    # a settle on the missing counter: a rebuild that read the log before its charge is stale
    assert await settle(r, "q", 30, at=20, admitted=15, held="1") == 0
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 0, 0, 12, 0])) == "stale"
    # a confirm does the same for its admission
    await built(r, K1, pos=30)
    assert await confirm(r, "p", 5, 40, 100) == scripts.Confirmed(1)
    await r.delete(K1)  # lost again (evicted)
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 0, 0, 35, 0])) == "stale"
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 0, 5, 40, 0, "p", "5|n1"])) == "ok"


# ------------------------------------------------------------------ rebuild


async def test_a_rebuild_never_replaces_a_live_counter(r: aioredis.Redis) -> None:
    token = scripts.begin_reply(await run(r, "begin", [K1, G1, R1], ["t1", ENTRY]))
    assert token is not None
    again = scripts.begin_reply(await run(r, "begin", [K1, G1, R1], ["t2", ENTRY]))
    assert again == token  # same generation
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 7, 5, 30, 0, "q", "5|n1"])) == "ok"
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 0, 0, 40, 0])) == "exists"
    s = await state(r, K1)
    assert (s["spent"], s["reserved"], s["pos"], s["r:q"]) == ("7", "5", "30", "5|n1")
    assert scripts.begin_reply(await run(r, "begin", [K1, G1, R1], ["t3", ENTRY])) is None  # exists
    await r.flushdb()  # a FLUSHALL takes the token: a rebuild from before it is stale
    assert scripts.init_reply(await run(r, "init", [K1, G1], [token, 0, 0, 50, 0])) == "stale"


async def test_a_rebuild_writes_every_open_reservation_and_an_expiry(r: aioredis.Redis) -> None:
    token = scripts.begin_reply(await run(r, "begin", [K1, G1, R1], ["t", ENTRY]))
    args: list[Any] = [token, 0, 3000, 30, 4102444800]  # expires in 2100
    for i in range(3000):
        args += [f"q{i}", "1|n"]
    assert scripts.init_reply(await run(r, "init", [K1, G1], args)) == "ok"
    assert len([k for k in await r.hkeys(K1) if k.startswith(b"r:")]) == 3000
    assert await r.ttl(K1) > 0
    # an expiry already in the past (a gateway clock ahead of Redis's) keeps the key a minute
    token2 = scripts.begin_reply(await run(r, "begin", [K2, G2, keys.registry("tag:b")], ["t", ENTRY]))
    assert scripts.init_reply(await run(r, "init", [K2, G2], [token2, 0, 0, 1, 1])) == "ok"
    assert 0 < await r.ttl(K2) <= 60


# ------------------------------------------------------------------ confirm


async def test_confirm_puts_back_a_reservation_a_lost_counter_took_with_it(r: aioredis.Redis) -> None:
    await built(r, K1, spent=60, pos=5)  # rebuilt before the admission at 15 committed
    assert await confirm(r, "q", 30, 15, 100) == scripts.Confirmed(1)
    s = await state(r, K1)
    assert (s["reserved"], s["r:q"]) == ("30", "30|n1")
    # confirming again changes nothing
    assert await confirm(r, "q", 30, 15, 100) == scripts.Confirmed(0)
    # another that does not fit any more is refused: nothing is added
    assert await confirm(r, "p", 30, 15, 100, nonce="n2") == scripts.Deny(0, 60, 30)
    assert (await state(r, K1))["reserved"] == "30"


async def test_confirm_leaves_counters_that_hold_or_counted_it(r: aioredis.Redis) -> None:
    await built(r, K1, pos=20)  # built from a log that had the admission (15)
    await built(r, K2, pos=5)
    await r.hset(K2, "x:q", "1")  # settled already without a reservation
    assert await confirm(r, "q", 30, 15, 100, 100, counters=(K1, K2)) == scripts.Confirmed(0)
    missing = keys.counter("tag:c", 1, 1)
    assert await confirm(r, "q", 1, 1, 1, 1, counters=(K1, missing)) == scripts.Missing((1,))


async def test_the_registry_makes_callers_declare_every_counter_of_the_newest_definition(
    r: aioredis.Redis,
) -> None:
    """A gateway that has not heard of a definition change yet still reaches the new counter."""
    old, new = keys.counter("tag:a", 1, 0), keys.counter("tag:a", 2, 0)
    await built(r, old, pos=5)
    await built(r, new, spent=90, pos=8)
    await r.hset(R1, mapping={old: "0|86400000|1|100", new: "0|604800000|2|100", K2: "0|1000|3|100"})
    # the stale caller declares only the old counter: it is told about the new one
    reply = await confirm(r, "q", 20, 10, 100, counters=(old,), regs=(R1,), at=5000)
    assert reply == scripts.More(((new, "0|604800000|2|100"),))
    reply = await confirm(r, "q", 20, 10, 100, 100, counters=(old, new), regs=(R1,), at=5000)
    assert reply == scripts.Deny(1, 90, 0)  # the new definition's counter has no room
    settled = await run(
        r,
        "settle",
        [keys.OPEN, keys.OPEN_KEYS, R1, old, G1],
        ["q", 5, 20, 10, 5000, 1, "1", "n1", 20, "0", "0"],
    )
    assert scripts.settle_reply(settled) == scripts.More(((new, "0|604800000|2|100"),))
    # a time outside every window of the newest epoch asks for nothing more
    assert await confirm(r, "q", 20, 10, 100, counters=(old,), regs=(R1,), at=700000000) == scripts.Confirmed(
        1
    )


def test_counter_keys_round_trip_and_share_a_hash_slot_per_subject() -> None:
    key = keys.counter("tag:team:a}b", 12, 1_700_000_000)
    parsed = keys.parse_counter(key)
    assert parsed == keys.CounterKey("tag:team:a}b", 12, 1_700_000_000)
    assert keys.generation_of(key) == keys.generation("tag:team:a}b")
    assert keys.parse_counter("ledger:open") is None
    # the hash tag: the text between the first { and the next }
    for k in (key, keys.generation("tag:team:a}b"), keys.registry("tag:team:a}b")):
        assert k[k.index("{") + 1 : k.index("}")] == "tag:team:a"
