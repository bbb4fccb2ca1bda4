"""Budget counters on a real Redis Cluster (3 masters, 3 replicas), rebuilt from a
real PostgreSQL log.

On a cluster a script may only touch one hash slot, so a request reserves subject
by subject (each subject's keys share its slot) in one fixed order and gives back
what it took if a later subject refuses. A master's failover is made harmless by
the counters' server life: every counter records the run id and replication id
of the node that built it, a promoted replica (or an old master the slot fails
back to) has another, so everything it inherited counts as missing and is rebuilt
from the log before any decision.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster as SyncCluster

from ledger.admission import Admitted, BudgetExceeded
from ledger.counters import keys
from ledger.counters.budget import tag_subject
from ledger.domain.money import to_nanos
from tests.redis_cluster import LocalRedisCluster
from tests.test_counters import Gateway, GatewayFactory, charged, gateways, verified, with_budget

__all__ = ["gateways"]  # the fixture, shared with tests/test_counters.py


def tags_on_masters(cluster: LocalRedisCluster, per_master: int, prefix: str = "t") -> list[list[str]]:
    """``per_master`` tag names whose counters live on each master, by master."""
    client = SyncCluster.from_url(cluster.seed_url)
    try:
        by_node: dict[str, list[str]] = {}
        i = 0
        while len(by_node) < 3 or any(len(v) < per_master for v in by_node.values()):
            name = f"{prefix}{i}"
            node = client.get_node_from_key(keys.counter(tag_subject(name), 0, 0))
            found = by_node.setdefault(node.name, [])
            if len(found) < per_master:
                found.append(name)
            i += 1
        return list(by_node.values())
    finally:
        client.close()


async def on_cluster(gateways: GatewayFactory, cluster: LocalRedisCluster) -> Gateway:
    gw: Gateway = await gateways(redis_url=cluster.seed_url, cluster=True, redis_timeout=5)
    assert gw.counters.sharded
    return gw


async def reserved_on(gw: Gateway, tag: str) -> tuple[int, int]:
    return await gw.counter(tag)


async def a_upstream(
    gateways: GatewayFactory, cluster: LocalRedisCluster, prefix: str
) -> tuple[Gateway, str, Admitted]:
    """A tag with a $1 budget, 0.1 spent on it, and request a (0.4) admitted and
    confirmed: on its way upstream."""
    [t], _, _ = tags_on_masters(cluster, 1, prefix)
    g1 = await on_cluster(gateways, cluster)
    await with_budget(g1, t, "1")
    await g1.spend("before", [t], "0.1")
    a = await g1.admission.admit("a", [t], Decimal("0.4"))
    assert isinstance(a, Admitted)
    return g1, t, a


async def lose_by_hand(gw: Gateway, key: str, request_id: str, usd: str) -> None:
    """What a replica holds when ``request_id``'s reservation never reached it
    (replication is asynchronous; on loopback it always arrives, so the loss is
    made by hand): the counter without it, still of its old life."""
    assert await gw.client.hexists(key, f"r:{request_id}")
    await gw.client.hdel(key, f"r:{request_id}")
    await gw.client.hincrby(key, "reserved", -to_nanos(Decimal(usd)))


async def a_still_counts(gw: Gateway, tag: str, a: Admitted) -> None:
    """After 0.1 spent and a (0.4) admitted on a $1 budget: b fits, c does not, and
    the books end at 0.9, equal to the log."""
    b = await gw.admission.admit("b", [tag], Decimal("0.4"))
    c = await gw.admission.admit("c", [tag], Decimal("0.4"))
    assert isinstance(b, Admitted), b
    assert isinstance(c, BudgetExceeded), c  # 0.1 + 0.4 (a) + 0.4 (b): no room for c
    await gw.admission.record_spend(a, Decimal("0.4"))
    await gw.admission.record_spend(b, Decimal("0.4"))
    assert await charged(gw.store, tag) == Decimal("0.9")
    await verified(gw)


async def test_a_request_over_three_masters_reserves_all_or_nothing(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    [a], [b], [c] = tags_on_masters(redis_cluster, 1, "aon")
    gw = await on_cluster(gateways, redis_cluster)
    await with_budget(gw, a, "1")
    await with_budget(gw, b, "1")
    await with_budget(gw, c, "0.3")
    # c (reserved last or not: the order is by subject) refuses: a and b hold nothing after
    refused = await gw.admission.admit("r1", [a, b, c], Decimal("0.5"))
    assert isinstance(refused, BudgetExceeded)
    for tag in (a, b, c):
        assert await gw.counter(tag) == (0, 0), tag
        zset, index = keys.open_index(tag_subject(tag))
        assert await gw.client.zcard(zset) == 0
        assert await gw.client.hlen(index) == 0
    ok = await gw.spend("r2", [a, b], "0.5")
    assert ok.budgets
    assert await gw.counter(a) == (to_nanos(Decimal("0.5")), 0)
    assert await gw.counter(b) == (to_nanos(Decimal("0.5")), 0)
    await verified(gw)


async def test_concurrent_requests_over_slots_never_overshoot(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """Four gateway stacks, 400 concurrent requests, each over two or three of six
    tags spread over the three masters: no tag's charges pass its budget, and the
    tightest tags are used to the last request that fits."""
    tags = [t for group in tags_on_masters(redis_cluster, 2, "cc") for t in group]
    gws = [await on_cluster(gateways, redis_cluster) for _ in range(4)]
    budget = Decimal("0.105")  # room for 10 requests of 0.01 on each tag
    for tag in tags:
        await with_budget(gws[0], tag, str(budget))
    for gw in gws[1:]:
        await gw.refresh()
    rng = random.Random(17)
    picks = [rng.sample(tags, rng.choice((2, 3))) for _ in range(400)]

    async def one(i: int) -> bool:
        gw = gws[i % 4]
        admitted = await gw.admission.admit(f"c{i}", picks[i], Decimal("0.01"))
        if not isinstance(admitted, Admitted):
            assert isinstance(admitted, BudgetExceeded), admitted
            return False
        await gw.admission.record_spend(admitted, Decimal("0.01"))
        return True

    results = await asyncio.gather(*(one(i) for i in range(400)))
    assert sum(results) >= 10
    for tag in tags:
        spent = await charged(gws[0].store, tag)
        assert spent <= budget, f"{tag}: {spent} of {budget}"
        assert await gws[0].counter(tag) == (to_nanos(spent), 0)
    # A reservation taken on one subject and given back when another refused may
    # have denied a concurrent request; nothing stays held: what is left is usable.
    for tag in tags:
        i = 0
        while await one_tag(gws[i % 4], tag, i):
            i += 1
        assert await charged(gws[0].store, tag) == Decimal("0.10"), tag
    await verified(gws[0])


async def one_tag(gw: Gateway, tag: str, i: int) -> bool:
    admitted = await gw.admission.admit(f"{tag}-after-{i}", [tag], Decimal("0.01"))
    if isinstance(admitted, Admitted):
        await gw.admission.record_spend(admitted, Decimal("0.01"))
        return True
    return False


async def test_the_sweeper_finds_an_orphan_in_its_subjects_index(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """A reservation whose admission never reached the log (its gateway died in
    between) is found by the sweeper in the subject's own index, on its master."""
    [a], [b], _ = tags_on_masters(redis_cluster, 1, "sw")
    gw = await on_cluster(gateways, redis_cluster)
    await with_budget(gw, a, "1")
    await with_budget(gw, b, "1")
    budgets = gw.book.budgets_for([a, b], gw.admission.now())
    now = gw.admission.now()
    made = await gw.counters.reserve("orphan", budgets, to_nanos(Decimal("0.4")), now, "n1", now=now)
    assert not isinstance(made, BudgetExceeded)
    assert await gw.counter(a) == (0, to_nanos(Decimal("0.4")))
    found = await gw.counters.expired(now)
    assert set(found) == {"orphan"}
    assert sorted(found["orphan"]) == sorted([tag_subject(a), tag_subject(b)])  # where the sweeper looks
    report = await gw.admission.sweep()
    assert report.dropped == 1
    assert await gw.counter(a) == (0, 0)
    assert await gw.counter(b) == (0, 0)
    assert await gw.counters.expired(now) == {}
    await verified(gw)


async def test_a_failover_between_reserve_and_commit_cannot_overshoot(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """The master holding a tag's counter dies after a request reserved there and
    before its admission committed; its replica is promoted with whatever it had
    received. Everything the promoted node inherited is from another server life:
    it is rebuilt from the log (without the uncommitted reservation), two other
    requests take the room, and the first request's confirm then refuses it."""
    [t], _, _ = tags_on_masters(redis_cluster, 1, "fo")
    g1 = await on_cluster(gateways, redis_cluster)
    g2 = await on_cluster(gateways, redis_cluster)
    await with_budget(g1, t, "1")
    await g2.refresh()
    await g1.spend("before", [t], "0.1")
    g1.gate.block("reserved:a")
    first = asyncio.create_task(g1.admission.admit("a", [t], Decimal("0.4")))
    await g1.gate.wait_reached("reserved:a")
    master = redis_cluster.master_for_key(g1.budget(t).key)
    await asyncio.to_thread(redis_cluster.kill, master)
    await asyncio.to_thread(redis_cluster.failover_to_replica, master)
    try:
        # whether or not a's reservation reached the replica, the promoted node's
        # counter is of another life: rebuilt from the log, which does not hold a yet
        b = await g2.admission.admit("b", [t], Decimal("0.4"))
        c = await g2.admission.admit("c", [t], Decimal("0.4"))
        assert isinstance(b, Admitted), b
        assert isinstance(c, Admitted), c
        g1.gate.release("reserved:a")
        a = await first
        assert isinstance(a, BudgetExceeded), a  # 0.1 + 0.4 + 0.4 + 0.4 > 1: refused before upstream
        await g2.admission.record_spend(b, Decimal("0.4"))
        await g2.admission.record_spend(c, Decimal("0.4"))
        assert await charged(g1.store, t) == Decimal("0.9")
        await verified(g1)
    finally:
        await asyncio.to_thread(redis_cluster.restart, master)  # back, as a replica


async def test_spend_recorded_before_a_failover_still_counts_after_it(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """Asynchronous replication may lose the last acknowledged increments; the
    promoted replica's counters are rebuilt from the log, which holds them."""
    [t], _, _ = tags_on_masters(redis_cluster, 1, "fs")
    gw = await on_cluster(gateways, redis_cluster)
    await with_budget(gw, t, "1")
    for i in range(4):
        await gw.spend(f"s{i}", [t], "0.2")
    master = redis_cluster.master_for_key(gw.budget(t).key)
    await asyncio.to_thread(redis_cluster.kill, master)
    await asyncio.to_thread(redis_cluster.failover_to_replica, master)
    try:
        assert isinstance(await gw.admission.admit("over", [t], Decimal("0.3")), BudgetExceeded)
        assert await gw.counter(t) == (to_nanos(Decimal("0.8")), 0)
        await verified(gw)
    finally:
        await asyncio.to_thread(redis_cluster.restart, master)


def test_a_cluster_refuses_a_script_over_two_subjects(redis_cluster: LocalRedisCluster) -> None:
    """Why the counters go subject by subject: one script over two slots is refused."""
    [a], [b], _ = tags_on_masters(redis_cluster, 1, "xs")
    client = SyncCluster.from_url(redis_cluster.seed_url)
    try:
        with pytest.raises(redis.exceptions.RedisClusterException):
            client.eval("return 1", 2, keys.registry(tag_subject(a)), keys.registry(tag_subject(b)))
    finally:
        client.close()


async def test_a_promoted_replica_that_missed_acknowledged_reservations_is_not_trusted(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """Asynchronous replication: the master acknowledged a's reservation (a was
    admitted and confirmed, and is upstream), its replica never got it, the master
    died. Trusting the promoted replica's counter would admit two more requests into
    a's room ($1.30 committed on a $1 budget); it is of another server life, so it
    is rebuilt from the log, which holds a's admission."""
    g1, t, a = await a_upstream(gateways, redis_cluster, "lost")
    key = g1.budget(t).key
    master = redis_cluster.master_for_key(key)
    await asyncio.to_thread(redis_cluster.kill, master)
    await asyncio.to_thread(redis_cluster.failover_to_replica, master)
    try:
        await lose_by_hand(g1, key, "a", "0.4")
        await a_still_counts(g1, t, a)
    finally:
        await asyncio.to_thread(redis_cluster.restart, master)


async def fail_over_and_back(cluster: LocalRedisCluster, key: str, between: Any) -> None:
    """Hand ``key``'s slot to the master's replica (coordinated, nothing lost), run
    ``between`` there, then hand it back to the old master: the same process, so
    the same run id, that now follows the replica and holds its data."""
    master = cluster.master_for_key(key)
    took = await asyncio.to_thread(cluster.failover_to_replica, master)
    await between()
    back = await asyncio.to_thread(cluster.failover_to_replica, took.new_master)
    assert back.new_master.node_id == master.node_id


async def test_a_failback_to_the_old_master_does_not_trust_what_it_got_from_the_replica(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """A master cut off from the others (alive) is voted out; its replica, promoted,
    missed a's acknowledged reservation (asynchronous replication; on loopback it
    always arrives, so the loss is made by hand, as in the test above). The old
    master rejoins as the replica's replica and takes its data; later the slot fails
    back to it. Its run id never changed, so the counter it got back — built under
    that run id, without a — looks live: b and c were admitted into a's room."""
    g1, t, a = await a_upstream(gateways, redis_cluster, "back")
    key = g1.budget(t).key

    await fail_over_and_back(redis_cluster, key, lambda: lose_by_hand(g1, key, "a", "0.4"))
    await a_still_counts(g1, t, a)


async def test_a_settle_while_the_replica_serves_is_not_lost_when_the_slot_fails_back(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """A coordinated failover (maintenance) and back, nothing lost in replication:
    a settles while the replica serves, where its counter is of another life (the
    settle leaves it alone: whatever rebuilds it reads the charge). Back on the old
    master, the same run id makes that counter live again, still holding a's $0.40
    reservation and without its $0.10 charge: a reservation no sweeper will ever
    find (the index and the log say a is done), and c, which fits, is refused."""
    g1, t, a = await a_upstream(gateways, redis_cluster, "leak")

    async def a_settles() -> None:
        await g1.admission.record_spend(a, Decimal("0.1"))

    await fail_over_and_back(redis_cluster, g1.budget(t).key, a_settles)
    now = await g1.counters.read(g1.budget(t))  # rebuilt first if it is of another life
    assert (now.spent_nanos, now.reserved_nanos) == (to_nanos(Decimal("0.2")), 0)
    b = await g1.admission.admit("b", [t], Decimal("0.4"))
    c = await g1.admission.admit("c", [t], Decimal("0.4"))  # 0.2 + 0.4 + 0.4 = 1.0 fits
    assert isinstance(b, Admitted), b
    assert isinstance(c, Admitted), c
    await g1.admission.record_spend(b, Decimal("0.4"))
    await g1.admission.record_spend(c, Decimal("0.4"))
    await verified(g1)


async def test_a_reserve_retried_after_a_lost_reply_and_a_failover_is_no_duplicate(
    gateways: GatewayFactory, redis_cluster: LocalRedisCluster
) -> None:
    """A cluster call whose reply was lost is sent again (the script answers its own
    attempt again). Here the master ran a's reserve, replicated it and died before
    answering: the retry meets the promoted replica, whose counter is of another life
    and is rebuilt from the log, without a's (uncommitted) reservation. That is no
    other attempt's reservation: a must be admitted (or refused for room), not told
    it is a duplicate in flight (a 409 that also blocks a client retrying under the
    same x-request-id until the sweeper clears the index)."""
    [t], _, _ = tags_on_masters(redis_cluster, 1, "lost-reply")
    gw = await on_cluster(gateways, redis_cluster)
    await with_budget(gw, t, "1")
    await gw.spend("before", [t], "0.1")
    key = gw.budget(t).key
    script = gw.counters._scripts["reserve"]
    calls = 0

    async def reply_lost_then_failover(*, keys: list[str], args: list[Any]) -> Any:
        nonlocal calls
        calls += 1
        reply = await script(keys=keys, args=args)
        if calls == 1:
            # what the promoted replica's counter is: a's reservation replicated, but
            # built in the old master's life
            await gw.client.hset(key, "run", "the-old-masters-life")
            raise redis.exceptions.ConnectionError("connection lost before the reply")
        return reply

    gw.counters._scripts["reserve"] = reply_lost_then_failover
    a = await gw.admission.admit("a", [t], Decimal("0.4"))
    assert calls >= 2
    assert isinstance(a, Admitted), a
    await gw.admission.record_spend(a, Decimal("0.4"))
    await verified(gw)
