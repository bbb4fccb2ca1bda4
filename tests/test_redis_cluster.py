"""The Redis Cluster test helper, checked with redis-py's asyncio cluster client:
keys spread over the three masters, a script over one hash tag runs and one over
two slots is refused, and a client rides out a master's death and failover."""

from __future__ import annotations

import asyncio
import functools
import statistics
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from tests.redis_cluster import LocalRedisCluster, ThroughFailover, cluster_client

# Reads two keys' counters and adds to both: the shape of the ledger's counter scripts.
ADD_BOTH = """
redis.call('INCRBY', KEYS[1], ARGV[1])
return redis.call('INCRBY', KEYS[2], ARGV[1])
"""


@pytest.fixture
async def client(redis_cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    redis_cluster.flushall()
    rc = cluster_client(redis_cluster.seed_url)
    await rc.initialize()
    yield rc
    await rc.aclose()


async def test_keys_spread_over_all_three_masters(
    redis_cluster: LocalRedisCluster, client: RedisCluster
) -> None:
    keys = [f"spread:{i}" for i in range(60)]
    for key in keys:
        await client.set(key, key)
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert sum(hi - lo + 1 for m in masters for lo, hi in m.slots) == 16384
    by_port: dict[int, int] = {}
    for key in keys:
        node = client.get_node_from_key(key)
        assert node is not None
        assert node.port == redis_cluster.master_for_key(key).port
        by_port[node.port] = by_port.get(node.port, 0) + 1
    assert set(by_port) == {m.port for m in masters}
    # Each master holds exactly the keys the slot map gives it.
    for master in masters:
        size = await client.dbsize(target_nodes=client.get_node(port=master.port, host="127.0.0.1"))
        assert size == by_port[master.port]


async def test_script_over_one_hash_tag_runs_and_over_two_slots_is_refused(client: RedisCluster) -> None:
    script = client.register_script(ADD_BOTH)
    assert await script(keys=["{tag:a}:spent", "{tag:a}:reserved"], args=[5]) == 5
    assert await script(keys=["{tag:a}:spent", "{tag:a}:reserved"], args=[2]) == 7  # EVALSHA, cached

    # redis-py refuses before sending ...
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=["{tag:a}:spent", "{tag:b}:spent"], args=[1])
    # ... and the server itself answers CROSSSLOT (redis-py's ClusterCrossSlotError).
    node = client.get_node_from_key("{tag:a}:spent")
    with pytest.raises(ClusterCrossSlotError, match="don't hash to the same slot"):
        await client.execute_command(
            "EVAL", ADD_BOTH, 2, "{tag:a}:spent", "{tag:b}:spent", 1, target_nodes=node
        )
    assert await client.get("{tag:b}:spent") is None


async def test_takeover_and_manual_failover(redis_cluster: LocalRedisCluster, client: RedisCluster) -> None:
    """The helper's bounded fallback (the replica takes over without a vote) and a
    live master's coordinated hand-over both leave a whole cluster the client uses."""
    key = "{paths}:n"
    await client.set(key, 1)
    master = redis_cluster.master_for_key(key)
    assert await client.execute_command("WAIT", 1, 5000, target_nodes=client.get_node_from_key(key)) == 1

    redis_cluster.kill(master)
    taken = redis_cluster.failover_to_replica(master, takeover_after=0)
    assert taken.method == "takeover"
    assert await ThroughFailover()(functools.partial(client.incr, key)) == 2
    redis_cluster.restart(master)

    handed = redis_cluster.failover_to_replica(taken.new_master)  # alive: CLUSTER FAILOVER
    assert handed.method in ("manual", "takeover")  # takeover: the vote stalled past the grace
    assert handed.new_master.port == master.port  # the restarted node is master again
    roles = {n.port: n.role for n in redis_cluster.nodes()}
    assert roles[taken.new_master.port] == "replica"
    assert await ThroughFailover()(functools.partial(client.incr, key)) == 3


@pytest.mark.slow
async def test_client_rides_out_a_master_failover(
    redis_cluster: LocalRedisCluster, client: RedisCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three times: kill the master of a key, keep writing to it through the
    failover, check nothing acknowledged was lost, and bring the node back."""
    script = client.register_script(ADD_BOTH)
    keys = ["{fo}:spent", "{fo}:reserved"]
    others = [f"{{other{i}}}:n" for i in range(20)]  # keys on other masters, written all along
    seconds: list[float] = []
    methods: list[str] = []
    retrying = ThroughFailover()
    for _ in range(3):
        master = redis_cluster.master_for_key(keys[0])
        other = next(k for k in others if redis_cluster.master_for_key(k).port != master.port)
        before = int(await client.get(keys[0]) or 0)
        await script(keys=keys, args=[1])
        # Acknowledged by the replica too, so the kill cannot lose it.
        node = client.get_node_from_key(keys[0])
        assert await client.execute_command("WAIT", 1, 5000, target_nodes=node) == 1

        redis_cluster.kill(master)
        failover = asyncio.create_task(asyncio.to_thread(redis_cluster.failover_to_replica, master))
        writes = 0
        while not failover.done():
            await retrying(lambda: script(keys=keys, args=[1]))
            await retrying(functools.partial(client.incr, other))
            writes += 1
            await asyncio.sleep(0.02)
        result = await failover
        seconds.append(result.seconds)
        methods.append(result.method)
        assert result.new_master.owns(_slot(keys[0]))

        # The client found the new master by itself; the script cache was reloaded there.
        assert _port(client, keys[0]) == result.new_master.port
        assert await script(keys=keys, args=[0]) == before + 1 + writes
        assert int(await client.get(keys[1]) or 0) == before + 1 + writes

        await asyncio.to_thread(redis_cluster.restart, master)
        rejoined = next(n for n in redis_cluster.nodes() if n.port == master.port)
        assert rejoined.role == "replica"

    with capsys.disabled():
        print(
            f"\nfailover (kill -> every survivor agrees): {[round(s, 2) for s in seconds]} s {methods}, "
            f"median {statistics.median(seconds):.2f} s; the client waited through {retrying.errors}, "
            f"at most {retrying.longest:.2f} s for one write"
        )
    assert retrying.errors, "the writes never met the failover: the test proves nothing"
    assert statistics.median(seconds) < 15


def _port(client: RedisCluster, key: str) -> int:
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def _slot(key: str) -> int:
    return key_slot(key.encode())
