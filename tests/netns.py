"""Two "hosts" on one machine: network namespaces joined by a veth pair.

The link can be shaped with ``tc tbf`` (a real bandwidth limit, so that
convergence is real) and cut with blackhole routes (packets vanish without
an error, so only timeouts notice -- like a pulled cable).  Needs root and
iproute2; every namespace this creates is deleted on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

_SUBNET_BASE = "10.231"


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class TwoHosts:
    """Namespaces ``a`` and ``b``; ``a_ip``/``b_ip`` are their addresses."""

    def __init__(self, rate: str | None = None, burst: str = "64kb", latency: str = "50ms"):
        tag = uuid.uuid4().hex[:6]
        self.a = f"mgd-{tag}-a"
        self.b = f"mgd-{tag}-b"
        self.veth_a = f"mgd{tag}a"
        self.veth_b = f"mgd{tag}b"
        octet = int(tag[:2], 16) % 250 + 1
        self.a_ip = f"{_SUBNET_BASE}.{octet}.1"
        self.b_ip = f"{_SUBNET_BASE}.{octet}.2"
        self.rate, self.burst, self.latency = rate, burst, latency
        self._made: list[str] = []

    def __enter__(self) -> "TwoHosts":
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.veth_a, "netns", self.a, "type", "veth",
                "peer", "name", self.veth_b, "netns", self.b)
            for ns, dev, addr in ((self.a, self.veth_a, self.a_ip),
                                  (self.b, self.veth_b, self.b_ip)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            if self.rate:
                self.shape(self.rate)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def shape(self, rate: str) -> None:
        """Limit both directions of the link to ``rate`` (tc syntax, e.g. 40mbit)."""
        for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev,
                            "root", "tbf", "rate", rate, "burst", self.burst,
                            "latency", self.latency], check=True, capture_output=True)

    def blackhole(self) -> None:
        """Make every packet between the hosts vanish silently."""
        _ip("-n", self.a, "route", "add", "blackhole", f"{self.b_ip}/32")
        _ip("-n", self.b, "route", "add", "blackhole", f"{self.a_ip}/32")

    def restore(self) -> None:
        for ns, addr in ((self.a, self.b_ip), (self.b, self.a_ip)):
            subprocess.run(["ip", "-n", ns, "route", "del", "blackhole", f"{addr}/32"],
                           capture_output=True)

    def cmd(self, ns: str, argv: list[str]) -> list[str]:
        """argv prefixed to run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]
