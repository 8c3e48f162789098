"""The passive side of a sweep and the initiator's link to it.

A :class:`Target` is an Agent that listens on a side channel, registers one random pool per memory kind (regions
named "host" and "cuda"), and answers control messages carried by kvxfer notifications (prefix ``kvxbench:``,
msgpack bodies): ``hello`` (the initiator's metadata: the target connects back and answers ``ready`` with its
regions), ``digest`` (blake2b of windows of a pool, for the byte check), ``bye`` (the initiator leaves) and
``exit``. `kvxfer-bench sweep` starts one in a child process (`kvxfer-bench target ...`), or in a thread for the
in-process ``local`` backend; on another host, start it by hand and pass ``--peer host:port``.
"""

from __future__ import annotations

import itertools
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from ..agent import Agent
from ..errors import ConfigError, PeerError
from ..handle import Timeouts
from .cases import Pool, use_device

PREFIX = b"kvxbench:"
#: How long control answers may take (digests of a few 64 KiB windows, a connect back).
CONTROL_TIMEOUT = 60.0


def _pack(message: dict[str, Any]) -> bytes:
    return PREFIX + msgpack.packb(message, use_bin_type=True)


def _unpack(payload: bytes) -> dict[str, Any] | None:
    if not payload.startswith(PREFIX):
        return None
    message = msgpack.unpackb(payload[len(PREFIX) :], raw=False)
    return message if isinstance(message, dict) else None


class Target:
    """An Agent with backend ``backend`` serving pools of ``nbytes`` per kind in ``kinds`` on ``listen``.

    ``device``: the GPU of the "cuda" pool. ``parent_pid``: stop serving when that process is gone (a target the
    tool started must not outlive it).
    """

    def __init__(
        self,
        backend: str,
        kinds: Sequence[str],
        nbytes: int,
        *,
        device: int = 0,
        listen: str = "127.0.0.1:0",
        token: str | None = None,
        seed: int = 7,
        name: str = "kvxfer-bench-target",
        parent_pid: int | None = None,
    ) -> None:
        if not kinds:
            raise ConfigError("a target needs at least one memory kind, got none")
        use_device(kinds, device)
        self.pools = {kind: Pool(kind, nbytes, device, seed + i) for i, kind in enumerate(kinds)}
        self.agent = Agent(name, backends=[backend], listen=listen, token=token, timeouts=Timeouts(transfer=600.0))
        self.parent_pid = parent_pid
        self.backend = backend
        self.stopped = threading.Event()
        try:
            for kind, pool in self.pools.items():
                self.agent.register(pool.array, name=kind)
        except Exception:
            self.agent.close()
            raise

    @property
    def address(self) -> str:
        """ "host:port" of the side channel."""
        return str(self.agent.listen_address)

    def describe(self) -> str:
        """One line for the terminal."""
        regions = ", ".join(f"region {kind!r} on {pool.label}, {pool.nbytes} B" for kind, pool in self.pools.items())
        return f"kvxfer-bench target: {self.backend} agent {self.agent.name!r} listening on {self.address}; {regions}"

    def serve(self, once: bool = False) -> None:
        """Answer control messages until ``exit`` (or, with ``once``, until an initiator says ``bye``)."""
        while not self.stopped.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                break
            for note in self.agent.notifications(timeout=0.5):
                message = _unpack(note.payload)
                if message is not None:
                    self._answer(note.peer_name, message, once)

    def _answer(self, sender: str, message: dict[str, Any], once: bool) -> None:
        kind = message.get("type")
        if kind == "hello":
            peer = self.agent.connect(message["meta"])
            regions = {name: {"nbytes": pool.nbytes, "label": pool.label} for name, pool in self.pools.items()}
            self.agent.notify(peer, _pack({"type": "ready", "regions": regions, "pid": os.getpid()}))
        elif kind == "digest":
            pool = self.pools[message["region"]]
            self.agent.notify(
                sender,
                _pack(
                    {"type": "digest", "id": message["id"], "digest": pool.digest(message["offsets"], message["width"])}
                ),
            )
        elif kind == "bye":
            if sender in self.agent.peers:
                self.agent.disconnect(sender)
            if once:
                self.stopped.set()
        elif kind == "exit":
            self.stopped.set()

    def close(self) -> None:
        """Stop serving and close the agent."""
        self.stopped.set()
        self.agent.close()


class TargetLink:
    """The initiator's side of the control protocol: connect, learn the target's regions, ask for digests."""

    def __init__(self, agent: Agent, address: str, token: str | None = None, timeout: float = CONTROL_TIMEOUT):
        self.agent, self.timeout = agent, timeout
        self.peer = agent.connect_to(address, token=token, timeout=timeout)
        self._ids = itertools.count(1)
        self.agent.notify(self.peer, _pack({"type": "hello", "meta": agent.metadata()}))
        ready = self._receive("ready")
        self.regions: dict[str, dict[str, Any]] = ready["regions"]
        self.target_pid: int = ready["pid"]

    def _receive(self, kind: str, request_id: int | None = None) -> dict[str, Any]:
        """The target's ``kind`` answer (to ``request_id``); PeerError after ``timeout`` s, or within half a second
        of the agent losing the target (a dead target never answers: waiting out the timeout helps nobody)."""
        give_up = time.monotonic() + self.timeout
        while time.monotonic() < give_up:
            if not self.peer.connected:
                raise PeerError(
                    f"benchmark target {self.peer.name!r} was lost ({self.peer.lost_reason}) before its {kind!r} "
                    "answer",
                    self.peer.name,
                )
            for note in self.agent.notifications(timeout=min(0.5, max(give_up - time.monotonic(), 0.0))):
                message = _unpack(note.payload)
                if message and message.get("type") == kind and message.get("id") == request_id:
                    return message
        raise PeerError(
            f"benchmark target {self.peer.name!r} sent no {kind!r} answer within {self.timeout} s", self.peer.name
        )

    def digest(self, region: str, offsets: Sequence[int] | np.ndarray, width: int) -> str:
        """The target's blake2b of windows ``[offsets[i], +width)`` of its pool ``region``."""
        request_id = next(self._ids)
        self.agent.notify(
            self.peer,
            _pack(
                {
                    "type": "digest",
                    "id": request_id,
                    "region": region,
                    "offsets": [int(o) for o in offsets],
                    "width": int(width),
                }
            ),
        )
        return str(self._receive("digest", request_id)["digest"])

    def close(self, stop_target: bool) -> None:
        """Say goodbye (and, for a target this tool started, tell it to exit)."""
        try:
            self.agent.notify(self.peer, _pack({"type": "exit" if stop_target else "bye"}))
        except PeerError:
            pass  # the target is already gone: nothing to say goodbye to


class TargetRunner:
    """A target this tool starts: a child process (`kvxfer-bench target`), or a thread for ``local``."""

    def __init__(
        self, backend: str, kinds: Sequence[str], nbytes: int, device: int = 0, timeout: float = CONTROL_TIMEOUT
    ) -> None:
        self.process: subprocess.Popen | None = None
        self.target: Target | None = None
        self.thread: threading.Thread | None = None
        if backend == "local":  # same-process backend: the target must live in this process
            self.target = Target(backend, kinds, nbytes, device=device)
            self.thread = threading.Thread(target=self.target.serve, name="kvxfer-bench-target", daemon=True)
            self.thread.start()
            self.address = self.target.address
            return
        command = [
            sys.executable,
            "-m",
            "kvxfer.bench.cli",
            "target",
            "--backend",
            backend,
            "--memory",
            ",".join(kinds),
            "--nbytes",
            str(nbytes),
            "--device",
            str(device),
            "--listen",
            "127.0.0.1:0",
            "--parent-pid",
            str(os.getpid()),
        ]
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
        self.address = self._read_address(timeout)

    def _read_address(self, timeout: float) -> str:
        if self.process is None or self.process.stdout is None:
            raise PeerError("benchmark target process has no stdout to read", "kvxfer-bench-target")
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        give_up = time.monotonic() + timeout
        try:
            while time.monotonic() < give_up:
                if not selector.select(timeout=0.2):
                    if self.process.poll() is not None:
                        break
                    continue
                line = self.process.stdout.readline()
                if not line:
                    break
                if " listening on " in line:
                    return line.split(" listening on ", 1)[1].split(";", 1)[0].strip()
        finally:
            selector.close()
        try:
            code = self.process.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        self.close(timeout=5.0)
        if code is None:
            raise PeerError(
                f"benchmark target process did not start listening within {timeout} s", "kvxfer-bench-target"
            )
        raise PeerError(
            f"benchmark target process exited with code {code} before listening; see its messages above",
            "kvxfer-bench-target",
        )

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the target to exit after its ``exit`` message; kill it past ``timeout``."""
        if self.target is not None:
            self.target.stopped.set()
            if self.thread is not None:
                self.thread.join(timeout)
            self.target.close()
            self.target = None
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None
