"""Test support: a Redis primary, its replica and Sentinels, each a process the test owns.

On loopback (`tests/test_sentinel.py`, every part on its own port) or one part per network
namespace (`tests/hosts.py`: `prefix` puts ``ip netns exec <host>`` in front of each argv).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support import ManagedProcess, wait_until

SERVICE = "mymaster"


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    return binary


@dataclass
class Node:
    """One redis-server (data or sentinel) at `host:port`, started by `argv` (with `prefix`)."""

    name: str
    host: str
    port: int
    workdir: Path
    prefix: list[str] = field(default_factory=list)
    proc: ManagedProcess | None = None

    def start(self, args: list[str]) -> ManagedProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = ManagedProcess(self.name, [*self.prefix, redis_binary(), *args],
                                   dict(os.environ), self.workdir / f"{self.name}.log").start()
        return self.proc

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(self.host, self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def ping(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        finally:
            client.close()


@dataclass
class SentinelGroup:
    """A primary, one replica and `len(sentinel_hosts)` sentinels watching them."""

    workdir: Path
    data_hosts: tuple[tuple[str, int], tuple[str, int]]  # primary, replica
    sentinel_hosts: list[tuple[str, int]]
    prefix: Callable[[str], list[str]] = lambda _name: []
    down_after_ms: int = 1000
    failover_timeout_ms: int = 4000
    primary: Node = field(init=False)
    replica: Node = field(init=False)
    sentinels: list[Node] = field(init=False)

    def __post_init__(self) -> None:
        (ph, pp), (rh, rp) = self.data_hosts
        self.primary = Node("redis-a", ph, pp, self.workdir / "redis-a", self.prefix("redis-a"))
        self.replica = Node("redis-b", rh, rp, self.workdir / "redis-b", self.prefix("redis-b"))
        self.sentinels = [Node(f"sentinel-{i + 1}", h, p, self.workdir / f"sentinel-{i + 1}",
                               self.prefix(f"sentinel-{i + 1}"))
                          for i, (h, p) in enumerate(self.sentinel_hosts)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{n.host}:{n.port}" for n in self.sentinels)
        return f"sentinel://{hosts}/{SERVICE}/0"

    def _data_args(self, node: Node, replica_of: Node | None) -> list[str]:
        args = ["--port", str(node.port), "--bind", node.host, "--save", "",
                "--appendonly", "no", "--dir", str(node.workdir), "--maxclients", "10000",
                "--protected-mode", "no"]
        if replica_of is not None:
            args += ["--replicaof", replica_of.host, str(replica_of.port)]
        return args

    def start(self, timeout: float = 30.0) -> None:
        self.primary.start(self._data_args(self.primary, None))
        wait_until(self.primary.ping, timeout, message="redis primary")
        self.replica.start(self._data_args(self.replica, self.primary))
        wait_until(self.replica_in_sync, timeout, message="redis replica in sync")
        quorum = len(self.sentinels) // 2 + 1
        for node in self.sentinels:
            node.workdir.mkdir(parents=True, exist_ok=True)
            conf = node.workdir / "sentinel.conf"
            conf.write_text(
                f"port {node.port}\nbind {node.host}\nprotected-mode no\n"
                f"dir {node.workdir}\n"
                f"sentinel monitor {SERVICE} {self.primary.host} {self.primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            node.start([str(conf), "--sentinel"])
        wait_until(self.sentinels_agree, timeout, 0.1, message="sentinels see the replica")

    def replica_in_sync(self) -> bool:
        info = self.replica.client().info("replication")
        return info.get("master_link_status") == "up"

    def master_seen(self, node: Node) -> tuple[str, int] | None:
        client = node.client()
        try:
            answer = client.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        finally:
            client.close()
        if not answer:
            return None
        host, port = answer
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)

    def sentinels_agree(self) -> bool:
        """Every sentinel names the same master and knows the other sentinels and a replica."""
        seen = set()
        for node in self.sentinels:
            client = node.client()
            try:
                master = client.execute_command("SENTINEL", "master", SERVICE)
            finally:
                client.close()
            info = dict(zip(master[::2], master[1::2], strict=True)) if isinstance(master, list) \
                else master
            fields = {(k.decode() if isinstance(k, bytes) else k):
                      (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
            if int(fields["num-other-sentinels"]) < len(self.sentinels) - 1 \
                    or int(fields["num-slaves"]) < 1:
                return False
            seen.add((fields["ip"], int(fields["port"])))
        return len(seen) == 1

    def current_master(self) -> tuple[str, int] | None:
        """The master every answering sentinel names, None while they disagree."""
        seen = set()
        for node in self.sentinels:
            try:
                seen.add(self.master_seen(node))
            except redis.RedisError:
                continue
        return seen.pop() if len(seen) == 1 else None

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.primary]:
            if node.proc is not None:
                node.proc.stop()
