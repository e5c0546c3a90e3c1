"""Hosts on one machine: a Linux network namespace per host, joined by a bridge.

Every host namespace gets one veth (`eth0`) into a switch namespace holding the bridge, and
an address `<subnet>.<i + 1>/24`. The operator (this process, in the root namespace) gets a
veth into the switch too, at `<subnet>.254`, so the `flwr` CLI reaches the SuperLink like a
laptop on the same LAN would. Nothing else is routed: no traffic leaves the machine. `with
Network(...)` tears everything down on exit, also after a failure; deleting a namespace
deletes its veths and their peers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

SUBNET = "10.231.77"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, or no `ip`)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why this machine cannot make network namespaces (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI runs as root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian package iproute2; scripts/setup installs it)"
    probe = f"fdgprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    return None


class Network:
    """Namespaces `<prefix>-<host>` for `hosts`, a switch, and the operator's link."""

    def __init__(self, hosts: Sequence[str], subnet: str = SUBNET) -> None:
        """Name everything after this process, so parallel test runs never collide."""
        self.prefix = f"fdg{os.getpid() % 100000}"
        self.hosts = list(hosts)
        self.subnet = subnet
        self.switch = f"{self.prefix}-sw"
        self.operator_if = f"{self.prefix}op"
        self.made: list[str] = []
        self.log: list[str] = []

    def ns(self, host: str) -> str:
        """The namespace of `host`."""
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        """The IPv4 address of `host`."""
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def _run(self, *args: str) -> None:
        self.log.append("ip " + " ".join(args))
        _ip(*args)

    def __enter__(self) -> Network:
        """Make the switch, every host and the operator's link."""
        try:
            self._make()
        except BaseException:
            self.teardown()
            raise
        return self

    def _make(self) -> None:
        if f"{self.subnet}." in _ip("route", check=False).stdout:
            raise NetnsUnavailable(f"{self.subnet}.0/24 is already routed on this machine")
        self._run("netns", "add", self.switch)
        self.made.append(self.switch)
        self._run("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._run("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns = self.ns(host)
            self._run("netns", "add", ns)
            self.made.append(ns)
            a, b = f"{self.prefix}h{i}", f"{self.prefix}s{i}"
            self._run("link", "add", a, "type", "veth", "peer", "name", b)
            self._run("link", "set", a, "netns", ns, "name", "eth0")
            self._run("link", "set", b, "netns", self.switch)
            self._run("-n", self.switch, "link", "set", b, "master", "br0", "up")
            self._run("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            self._run("-n", ns, "link", "set", "eth0", "up")
            self._run("-n", ns, "link", "set", "lo", "up")
        peer = f"{self.prefix}ops"
        self._run("link", "add", self.operator_if, "type", "veth", "peer", "name", peer)
        self._run("link", "set", peer, "netns", self.switch)
        self._run("-n", self.switch, "link", "set", peer, "master", "br0", "up")
        self._run("addr", "add", f"{self.subnet}.254/24", "dev", self.operator_if)
        self._run("link", "set", self.operator_if, "up")

    def cut(self, host: str) -> None:
        """Unplug `host`'s cable: its only interface goes down."""
        self._run("-n", self.ns(host), "link", "set", "eth0", "down")

    def restore(self, host: str) -> None:
        """Plug it back in."""
        self._run("-n", self.ns(host), "link", "set", "eth0", "up")

    def teardown(self) -> None:
        """Delete every namespace made (and with them the veths and the bridge)."""
        _ip("link", "del", self.operator_if, check=False)
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def __exit__(self, *exc: object) -> None:
        """Tear down."""
        self.teardown()

    def leftovers(self) -> list[str]:
        """Namespaces or links of this network still present (should be none)."""
        names = _ip("netns", "list", check=False).stdout.split()
        left = [n for n in names if n.startswith(f"{self.prefix}-")]
        if _ip("link", "show", self.operator_if, check=False).returncode == 0:
            left.append(self.operator_if)
        return left
