"""A real Redis Cluster for the tests: 3 masters, 3 replicas, on loopback.

Each node is a ``redis-server`` child process (the binaries on PATH, as for the
embedded Redis) with its own directory; ``redis-cli --cluster create`` joins them.
Every wait polls the nodes themselves against a deadline, so a slow machine only
makes things slower, never flaky; a timeout names what was still wrong and shows
the tails of the nodes' logs.

Failover is bounded: after a kill the cluster's own failure detection (or, for a
live master, a coordinated hand-over) gets a grace period of a few node timeouts,
then the replica takes over by itself (``CLUSTER FAILOVER TAKEOVER``), which
needs no vote.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, SlotNotCoveredError

from ledger.errors import EmbeddedServerError
from ledger.run.embedded import (
    _BIND_ATTEMPTS,
    EmbeddedRedis,
    _ChildServer,
    _free_port,
    _log_tail,
    _port_free,
    _port_taken,
    _redis_ping,
)

HASH_SLOTS = 16384
NODE_TIMEOUT_MS = 1000  # fast failure detection: a dead master is voted out in ~2-3 s
_BUS_OFFSET = 10000  # the cluster bus listens on port + 10000 (every Redis version)
_POLL = 0.1

T = TypeVar("T")


class ClusterError(EmbeddedServerError):
    """The test cluster did not come up, fail over or heal within its deadline."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as the cluster sees it (a live node's ``CLUSTER NODES``)."""

    node_id: str
    port: int
    role: Literal["master", "replica"]
    master_id: str | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # inclusive ranges; empty for replicas
    flags: frozenset[str]
    connected: bool  # the seeing node's cluster bus link to this one is up

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


@dataclass(frozen=True, slots=True)
class Failover:
    """What ``failover_to_replica`` did: how long from the kill (or the call, for a
    live master) until every surviving node agreed, and which way it went."""

    seconds: float
    method: Literal["automatic", "takeover", "manual"]
    new_master: NodeInfo


def cluster_client(url: str) -> RedisCluster:
    """An asyncio cluster client that finds a promoted replica by itself.

    After a failover its first command to the dead master fails to connect,
    which marks the slot map stale; the client's own retry (10 by default, at
    least 1 is needed) reloads the map from a live node and succeeds. Those
    retries do not wait between connection errors (redis-py uses its ``retry``
    only for the count), so they are spent in ~0.1 s: while the master is dead
    and not yet replaced (~2-3 s here) the caller must wait and try again
    (``ThroughFailover``). Short socket timeouts bound a master that hangs
    instead of dying.
    """
    return RedisCluster.from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0)


# What redis-py gives up with after its own (immediate) retries while a slot has
# no reachable master; the caller waits and tries again.
FAILOVER_ERRORS = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, SlotNotCoveredError)


class ThroughFailover:
    """Runs an operation, trying again every 100 ms while its slot's master is
    being replaced; counts what it waited through."""

    def __init__(self, within: float = 30.0) -> None:
        self.within = within
        self.errors: dict[str, int] = {}
        self.longest = 0.0  # the longest time one operation waited, in seconds

    async def __call__(self, op: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        while True:
            try:
                result = await op()
            except FAILOVER_ERRORS as e:
                name = type(e).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                if time.monotonic() - started >= self.within:
                    raise
                await asyncio.sleep(0.1)
            else:
                self.longest = max(self.longest, time.monotonic() - started)
                return result


def missing_binaries() -> list[str]:
    """The programs a cluster needs that are not on PATH."""
    return [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]


def _binaries() -> tuple[Path, Path]:
    server = EmbeddedRedis.find_executable("path")
    # The redis-cli next to the server, so both are the same version.
    cli = server.with_name("redis-cli")
    if not cli.exists():
        found = shutil.which("redis-cli")
        if found is None:
            raise ClusterError("no redis-cli on PATH (Debian: apt-get install redis-tools)")
        cli = Path(found)
    return server, cli


def _pick_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = _free_port()
        bus = port + _BUS_OFFSET
        if bus <= 65535 and not {port, bus} & taken and _port_free(bus):
            taken.update((port, bus))
            return port
    raise ClusterError("found no free port pair for a cluster node")


class _Node(_ChildServer):
    """One cluster node: a redis-server in ``data_dir`` on ``port``."""

    stop_signal = signal.SIGTERM
    stop_timeout = 15.0

    def __init__(self, data_dir: Path, executable: Path, port: int) -> None:
        self.data_dir = data_dir
        self.executable = executable
        self.port = port
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> Self:
        raise NotImplementedError("use launch()")

    def launch(self, taken: set[int], deadline: float) -> None:
        """Start on ``self.port``, moving to another free pair if it was taken meanwhile."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_BIND_ATTEMPTS):
            if self._launch(deadline):
                return
            if attempt + 1 < _BIND_ATTEMPTS:
                self.port = _pick_port(taken)
        raise ClusterError(f"cluster node found no free port:\n{_log_tail(self.log_path)}")

    def _launch(self, deadline: float) -> bool:
        d = self.data_dir
        conf = d / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    f"dir {d}",
                    f"logfile {self.log_path}",
                    f"pidfile {d / 'redis.pid'}",
                    "daemonize no",
                    "protected-mode no",
                    "appendonly no",
                    'save ""',
                    "cluster-enabled yes",
                    f"cluster-config-file {d / 'nodes.conf'}",
                    f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                    # A replica may always be promoted, however long a loaded CI
                    # machine kept it from hearing its master.
                    "cluster-replica-validity-factor 0",
                    # A replica syncs at once (the default waits 5 s for more replicas).
                    "repl-diskless-sync yes",
                    "repl-diskless-sync-delay 0",
                    "",
                ]
            )
        )
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = subprocess.Popen(
            [str(self.executable), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self._proc.pid
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.pid = None
                if _port_taken(self.log_path, log_start):
                    return False
                raise ClusterError(
                    f"cluster node on port {self.port} exited with code {self._proc.returncode}:\n"
                    + _log_tail(self.log_path)
                )
            if _redis_ping(self.port):
                return True
            time.sleep(0.02)
        self.kill()
        raise ClusterError(f"cluster node on port {self.port} did not answer:\n{_log_tail(self.log_path)}")


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=2, decode_responses=True
    )


def _call(port: int, *args: str) -> str:
    with _client(port) as r:
        out = r.execute_command(*args)
    if isinstance(out, bytes):
        return out.decode()
    if not isinstance(out, str):
        raise ClusterError(f"{' '.join(args)} on port {port} answered {out!r}")
    return out


def _fields(text: str) -> dict[str, str]:
    """``CLUSTER INFO`` text as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _replication(port: int) -> dict[str, str]:
    """``INFO replication``, every value as a string."""
    with _client(port) as r:
        return {k: str(v) for k, v in r.info("replication").items()}


def _parse_nodes(text: str) -> list[NodeInfo]:
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = frozenset(parts[2].split(","))
        address = parts[1].split("@", 1)[0]  # ip:port@cport[,hostname]
        port = int(address.rsplit(":", 1)[1])
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        is_master = "master" in flags
        nodes.append(
            NodeInfo(
                node_id=parts[0],
                port=port,
                role="master" if is_master else "replica",
                master_id=None if parts[3] == "-" else parts[3],
                slots=tuple(sorted(slots)),
                flags=flags,
                connected=parts[7] == "connected",
            )
        )
    return nodes


class LocalRedisCluster:
    """A 3-master, 3-replica Redis Cluster of child processes; sync, for fixtures.

    ``with LocalRedisCluster(tmp_path) as cluster:`` or ``start()`` / ``stop()``.
    """

    MASTERS = 3

    def __init__(self, base_dir: Path, *, timeout: float = 60.0) -> None:
        self.base_dir = base_dir.resolve()
        self.timeout = timeout
        self._nodes: list[_Node] = []
        self._killed_at: dict[int, float] = {}  # port -> monotonic time of the kill
        self._taken: set[int] = set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        server, cli = _binaries()
        deadline = time.monotonic() + self.timeout
        try:
            for i in range(self.MASTERS * 2):
                node = _Node(self.base_dir / f"node{i}", server, _pick_port(self._taken))
                self._nodes.append(node)
                node.launch(self._taken, deadline)
            self._create(cli, deadline)
            self._wait(self._healthy, deadline, "the new cluster to be whole")
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, cli: Path, deadline: float) -> None:
        argv = [str(cli), "--cluster", "create"]
        argv += [f"127.0.0.1:{n.port}" for n in self._nodes]
        argv += ["--cluster-replicas", "1", "--cluster-yes"]
        try:
            out = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=False,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired as e:
            printed = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            raise ClusterError(f"redis-cli --cluster create hung:\n{printed}\n{self._logs()}") from e
        if out.returncode != 0:
            raise ClusterError(
                f"redis-cli --cluster create failed ({out.returncode}):\n"
                f"{out.stdout}\n{out.stderr}\n{self._logs()}"
            )

    def stop(self) -> None:
        for node in self._nodes:
            with contextlib.suppress(EmbeddedServerError):
                node.stop()
        # Reap what stop() could not (a process killed from outside).
        for node in self._nodes:
            node._reap(1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ views

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{n.port}" for n in self._nodes if n.alive]

    @property
    def seed_url(self) -> str:
        return self.urls[0]

    def nodes(self) -> list[NodeInfo]:
        """Every node as a live node sees it (dead ones included, flagged ``fail``)."""
        for node in self._live():
            with contextlib.suppress(redis.RedisError):
                return _parse_nodes(_call(node.port, "CLUSTER", "NODES"))
        raise ClusterError("no cluster node answers")

    def masters(self) -> list[NodeInfo]:
        """The masters that own slots, by their first slot."""
        owners = [n for n in self.nodes() if n.role == "master" and n.slots]
        return sorted(owners, key=lambda n: n.slots[0])

    def master_for_key(self, key: str | bytes) -> NodeInfo:
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for node in self.masters():
            if node.owns(slot):
                return node
        raise ClusterError(f"no master owns slot {slot}")

    def replica_of(self, master: NodeInfo) -> NodeInfo:
        for node in self.nodes():
            if node.master_id == master.node_id:
                return node
        raise ClusterError(f"master {master.port} has no replica")

    def flushall(self) -> None:
        """Empty every master (their replicas follow)."""
        for node in self.masters():
            if "fail" not in node.flags:
                with _client(node.port) as r:
                    r.flushall()

    # ------------------------------------------------------------ faults

    def kill(self, node: NodeInfo) -> None:
        """SIGKILL the node's process."""
        proc = self._node(node.port)
        proc.kill()
        self._killed_at[node.port] = time.monotonic()

    def failover_to_replica(self, master: NodeInfo, *, takeover_after: float | None = None) -> Failover:
        """Promote ``master``'s replica and wait until every surviving node agrees.

        A killed master is left to the cluster's failure detection; a live one
        hands over through a coordinated ``CLUSTER FAILOVER`` (no write lost).
        Either may stall (votes are refused for 2 node timeouts after a vote on
        the same shard; a manual failover whose message is lost just times out),
        so after ``takeover_after`` seconds (default: five node timeouts) the
        replica is told to take over without a vote.
        """
        grace = 5 * NODE_TIMEOUT_MS / 1000 if takeover_after is None else takeover_after
        replica = self.replica_of(master)
        started = self._killed_at.get(master.port, time.monotonic())
        deadline = time.monotonic() + self.timeout
        method: Literal["automatic", "takeover", "manual"] = "automatic"
        if self._node(master.port).alive:
            method = "manual"
            _call(replica.port, "CLUSTER", "FAILOVER")
        takeover_at = time.monotonic() + grace
        while not self._is_master(replica):
            if time.monotonic() >= takeover_at:
                method = "takeover"
                _call(replica.port, "CLUSTER", "FAILOVER", "TAKEOVER")
                break
            time.sleep(_POLL)

        def promoted() -> str | None:
            return self._promoted(master, replica)

        self._wait(promoted, deadline, f"replica {replica.port} to take over from {master.port}")
        seconds = time.monotonic() - started
        new = next(n for n in self.nodes() if n.node_id == replica.node_id)
        return Failover(seconds, method, new)

    def restart(self, node: NodeInfo) -> None:
        """Start a killed node again (same dir, same port if still free) and wait
        until it has rejoined, as a replica when its slots went to another node."""
        proc = self._node(node.port)
        if proc.alive:
            raise ClusterError(f"node {node.port} is running")
        deadline = time.monotonic() + self.timeout
        old_port = proc.port
        if not _port_free(proc.port) or not _port_free(proc.port + _BUS_OFFSET):
            proc.port = _pick_port(self._taken)
        proc.launch(self._taken, deadline)
        self._killed_at.pop(old_port, None)
        self._wait(self._healthy, deadline, f"node {proc.port} to rejoin")

    # ------------------------------------------------------------ waiting

    def _node(self, port: int) -> _Node:
        for node in self._nodes:
            if node.port == port:
                return node
        raise ClusterError(f"no cluster node on port {port}")

    def _live(self) -> Iterator[_Node]:
        return (n for n in self._nodes if n.alive)

    def _is_master(self, node: NodeInfo) -> bool:
        try:
            return _replication(node.port).get("role") == "master"
        except (redis.RedisError, ClusterError):
            return False

    def _wait(self, problem: Callable[[], str | None], deadline: float, what: str) -> None:
        """Poll ``problem`` (None once all is well) until the deadline."""
        last = "not checked yet"
        while True:
            try:
                found = problem()
            except redis.RedisError as e:
                found = f"{type(e).__name__}: {e}"
            if found is None:
                return
            last = found
            if time.monotonic() >= deadline:
                raise ClusterError(f"timed out waiting for {what}: {last}\n{self._logs()}")
            time.sleep(_POLL)

    def _views(self) -> dict[int, list[NodeInfo]]:
        return {n.port: _parse_nodes(_call(n.port, "CLUSTER", "NODES")) for n in self._live()}

    def _common_problem(self, views: dict[int, list[NodeInfo]]) -> str | None:
        """What stops the live nodes from serving every slot with one shared map."""
        for port in views:
            info = _fields(_call(port, "CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return f"node {port}: cluster_state {info.get('cluster_state')}"
            if info.get("cluster_slots_ok") != str(HASH_SLOTS):
                return f"node {port}: cluster_slots_ok {info.get('cluster_slots_ok')}"
            if info.get("cluster_known_nodes") != str(len(self._nodes)):
                return f"node {port}: knows {info.get('cluster_known_nodes')} nodes"
        maps = {
            port: sorted((n.slots, n.node_id) for n in view if n.role == "master" and n.slots)
            for port, view in views.items()
        }
        first_port, first = next(iter(maps.items()))
        for port, slot_map in maps.items():
            if slot_map != first:
                return f"nodes {first_port} and {port} disagree on who owns which slots"
        return None

    def _healthy(self) -> str | None:
        """None once all six nodes are up, agree, and every master has a replica in sync."""
        if len(list(self._live())) != len(self._nodes):
            return "a node is not running"
        views = self._views()
        if problem := self._common_problem(views):
            return problem
        for port, view in views.items():
            if bad := [n.port for n in view if n.flags & {"fail", "fail?", "handshake", "noaddr"}]:
                return f"node {port} still flags {bad}"
            if down := [n.port for n in view if not n.connected]:
                return f"node {port} has no cluster bus link to {down} yet"
        view = next(iter(views.values()))
        masters = [n for n in view if n.role == "master" and n.slots]
        if len(masters) != self.MASTERS:
            return f"{len(masters)} masters own slots"
        for master in masters:
            replicas = [n for n in view if n.master_id == master.node_id]
            if not replicas:
                return f"master {master.port} has no replica"
            for replica in replicas:
                info = _replication(replica.port)
                if info.get("master_link_status") != "up" or info.get("master_port") != str(master.port):
                    return f"replica {replica.port} is not in sync with {master.port}: {info}"
                if info.get("master_sync_in_progress") != "0":
                    return f"replica {replica.port} is still syncing"
        return None

    def _promoted(self, old: NodeInfo, replica: NodeInfo) -> str | None:
        """None once ``replica`` owns ``old``'s slots in every live node's view."""
        views = self._views()
        if problem := self._common_problem(views):
            return problem
        for port, view in views.items():
            owner = next((n for n in view if n.role == "master" and n.owns(old.slots[0][0])), None)
            if owner is None or owner.node_id != replica.node_id:
                return f"node {port} sees slot {old.slots[0][0]} on {owner.port if owner else None}"
            if old.port in views and next(n for n in view if n.node_id == old.node_id).role != "replica":
                return f"node {port} does not see {old.port} as a replica yet"
        if old.port in views:  # a live master handed over: it now follows the new one
            info = _replication(old.port)
            if info.get("master_link_status") != "up" or info.get("master_port") != str(replica.port):
                return f"old master {old.port} does not follow {replica.port} yet: {info}"
        return None

    def _logs(self) -> str:
        return "\n".join(
            f"--- node {n.port} ({'running' if n.alive else 'stopped'}):\n{_log_tail(n.log_path, 15)}"
            for n in self._nodes
        )
