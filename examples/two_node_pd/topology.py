"""Two "nodes" on one machine: two network namespaces joined by a veth pair, or (where namespaces are not
permitted) two loopback addresses. Each node runs commands through :meth:`Node.command`; the link can be cut and
restored; its byte counters say how much crossed it.

Namespaces are named ``kvx2n-<pid>-a`` / ``-b`` after the process that made them; :func:`sweep_stale` removes those
whose process is gone (a demo killed with SIGKILL cannot clean up after itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Self

SUBNET = "10.77.0"
_STALE = re.compile(r"^kvx2n-(\d+)-[ab]\b")


@dataclass(frozen=True)
class Node:
    """One side: its label, the address its services listen on, its namespace (None: the host's) and the network
    device its traffic to the other node uses."""

    label: str
    address: str
    netns: str | None
    device: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this node."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10).stdout


def sweep_stale() -> list[str]:
    """Delete ``kvx2n-<pid>-*`` namespaces of processes that no longer exist; returns their names."""
    if shutil.which("ip") is None:
        return []
    try:
        names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]
    except (subprocess.CalledProcessError, OSError):
        return []
    removed = []
    for name in names:
        match = _STALE.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)
            removed.append(name)
    return removed


class Topology:
    """Node A and node B and the link between them. ``Topology.create("auto")`` tries namespaces and falls back
    to loopback, recording why in :attr:`fallback_reason`. Use as a context manager (namespaces are deleted on
    exit, which also deletes the veth pair)."""

    def __init__(self, mode: str, a: Node, b: Node, fallback_reason: str = "") -> None:
        self.mode, self.a, self.b, self.fallback_reason = mode, a, b, fallback_reason
        self._closed = False

    @classmethod
    def create(cls, mode: str = "auto") -> Topology:
        if mode not in ("auto", "netns", "loopback"):
            raise ValueError(f"topology mode: expected auto, netns or loopback, got {mode!r}")
        if mode == "loopback":
            return cls.loopback("asked for")
        try:
            return cls.netns()
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as error:
            reason = error.stderr.strip() if isinstance(error, subprocess.CalledProcessError) else str(error)
            if mode == "netns":
                raise RuntimeError(f"network namespaces are not available here: {reason}") from error
            return cls.loopback(f"network namespaces not permitted ({reason})")

    @classmethod
    def loopback(cls, reason: str) -> Topology:
        return cls("loopback", Node("a", "127.0.0.1", None, "lo"), Node("b", "127.0.0.2", None, "lo"), reason)

    @classmethod
    def netns(cls) -> Topology:
        if shutil.which("ip") is None:
            raise OSError("the `ip` command (iproute2) is missing")
        sweep_stale()
        pid = os.getpid()
        ns_a, ns_b = f"kvx2n-{pid}-a", f"kvx2n-{pid}-b"
        dev_a, dev_b = f"kvxa{pid % 100000}", f"kvxb{pid % 100000}"
        made: list[str] = []
        try:
            for ns in (ns_a, ns_b):
                _ip("netns", "add", ns)
                made.append(ns)
            _ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
            for ns, dev, host in ((ns_a, dev_a, 1), (ns_b, dev_b, 2)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            for ns in made:
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)
            subprocess.run(["ip", "link", "del", dev_a], check=False, capture_output=True, timeout=10)
            raise
        return cls("netns", Node("a", f"{SUBNET}.1", ns_a, dev_a), Node("b", f"{SUBNET}.2", ns_b, dev_b))

    def counters(self) -> dict[str, int]:
        """Bytes and packets node A's device sent and received (on loopback: everything on ``lo``, this
        machine's other traffic included)."""
        args = ["-n", self.a.netns] if self.a.netns else []
        stats = json.loads(_ip(*args, "-s", "-j", "link", "show", "dev", self.a.device))[0]["stats64"]
        return {
            "tx_bytes": stats["tx"]["bytes"],
            "rx_bytes": stats["rx"]["bytes"],
            "tx_packets": stats["tx"]["packets"],
            "rx_packets": stats["rx"]["packets"],
        }

    def set_link(self, up: bool) -> None:
        """Cut (``up=False``) or restore the link between the nodes (namespaces only: loopback cannot be cut
        without cutting the whole machine)."""
        if self.mode != "netns":
            raise RuntimeError("the link can only be cut between network namespaces")
        assert self.a.netns is not None
        _ip("-n", self.a.netns, "link", "set", self.a.device, "up" if up else "down")

    def shape(self, rate_mbit: float | None) -> None:
        """Limit what node A sends to node B to ``rate_mbit`` (a token bucket on A's veth; None removes it), so a
        transfer lasts long enough to be cut half-way. Namespaces only."""
        if self.mode != "netns":
            raise RuntimeError("traffic shaping is only done between network namespaces")
        assert self.a.netns is not None
        tc = ["ip", "netns", "exec", self.a.netns, "tc", "qdisc"]
        if rate_mbit is None:
            subprocess.run([*tc, "del", "dev", self.a.device, "root"], check=False, capture_output=True, timeout=10)
            return
        subprocess.run(
            [
                *tc,
                "replace",
                "dev",
                self.a.device,
                "root",
                "tbf",
                "rate",
                f"{rate_mbit}mbit",
                "burst",
                "64kb",
                "latency",
                "2s",
            ],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def describe(self) -> str:
        if self.mode == "netns":
            return (
                f"network namespaces {self.a.netns} ({self.a.address} on {self.a.device}) <-veth-> "
                f"{self.b.netns} ({self.b.address} on {self.b.device})"
            )
        return f"loopback {self.a.address} <-> {self.b.address} ({self.fallback_reason})"

    def close(self) -> None:
        """Delete the namespaces (and with them the veth pair). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for node in (self.a, self.b):
            if node.netns:
                subprocess.run(["ip", "netns", "del", node.netns], check=False, capture_output=True, timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
