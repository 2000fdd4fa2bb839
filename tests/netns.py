"""Hosts for tests: one Linux network namespace per host, joined by veth links to a bridge.

The test itself runs in the machine's own namespace, which holds the bridge (and its address,
``.1`` of a private /24), so it reaches every host and every host reaches it (the upstream
simulator listens there). A host's link can be cut and restored (its veth end on the bridge set
down and up: the host is cut off without knowing it) and a host can be killed (every process in
its namespace SIGKILLed, then its link cut: a machine that died). Needs root and ``ip``
(iproute2); `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=20)


def unavailable() -> str | None:
    """Why hosts cannot be built here (None: they can)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root (the test runs as uid {os.geteuid()})"
    name = f"hrprobe{os.getpid()}"
    added = _ip("netns", "add", name, check=False)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip() or added.returncode}"
    _ip("netns", "del", name, check=False)
    probe = f"hrpb{os.getpid() % 100000}"
    bridge = _ip("link", "add", probe, "type", "bridge", check=False)
    if bridge.returncode != 0:
        return f"cannot create a bridge: {bridge.stderr.strip()}"
    _ip("link", "del", probe, check=False)
    return None


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(200, 250)}.{rng.randrange(256)}.0/24")
        if str(net.network_address)[:-1] not in used:
            return net
    raise RuntimeError("no free private /24 for the test hosts")


@dataclass
class Network:
    """Hosts on one private /24; `close()` removes every namespace, link and process."""

    tag: str = field(default_factory=lambda: os.urandom(3).hex()[:5])
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address
    _links: dict[str, str] = field(default_factory=dict)  # name -> bridge-side veth
    _subnet: ipaddress.IPv4Network | None = None

    @property
    def bridge(self) -> str:
        return f"hrb{self.tag}"

    @property
    def gateway(self) -> str:
        """The test's own address on the hosts' network."""
        assert self._subnet is not None
        return str(self._subnet.network_address + 1)

    def open(self) -> Network:
        self._subnet = _free_subnet(random.Random())
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def namespace(self, name: str) -> str:
        return f"hr{self.tag}-{name}"

    def add(self, name: str) -> str:
        """A new host; its address."""
        assert self._subnet is not None
        index = len(self.hosts) + 1
        address = str(self._subnet.network_address + 10 + index)
        ns = self.namespace(name)
        outside, inside = f"hv{self.tag}{index}", f"hp{self.tag}{index}"
        _ip("netns", "add", ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("-n", ns, "link", "set", inside, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        self.hosts[name] = address
        self._links[name] = outside
        return address

    def prefix(self, name: str) -> list[str]:
        """Put in front of an argv to run it on host `name`."""
        return ["ip", "netns", "exec", self.namespace(name)]

    def cut(self, name: str) -> None:
        _ip("link", "set", self._links[name], "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self._links[name], "up")

    def pids(self, name: str) -> list[int]:
        out = _ip("netns", "pids", self.namespace(name), check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, name: str) -> None:
        """The host dies: every process on it at once, then its link."""
        for pid in self.pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.cut(name)

    def close(self) -> None:
        for name in list(self.hosts):
            for pid in self.pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", self.namespace(name), check=False)
            _ip("link", "del", self._links[name], check=False)
        self.hosts.clear()
        _ip("link", "del", self.bridge, check=False)
