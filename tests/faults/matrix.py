"""The fault matrix (issue 14): a survivor agent in this process, a victim agent in a child process, a stream of
READ or WRITE transfers between them, SIGKILL or SIGSTOP of the victim at a random point; then everything the
survivor holds is counted against what it held before (test helper, not a test).

Paths: ``cma`` (UCX backend, cross-memory attach), ``ucx-direct`` (UCX puts/gets over shared memory), ``tcp``
(UCX over tcp, peer error mode), ``staged`` (UCX staged messages over shared memory), ``staged-tcp``, and
``cuda_ipc`` (CUDA memory, GPU machines). The local backend is in-process: no peer process to kill.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import kvxfer
from kvxfer.errors import KvxferError
from tests.backends.ucx.remote import RemoteAgent, random_fill

DEADLINE = 1.0  # every transfer's handle deadline (s); a final state must come within DEADLINE + 1 s
REGION = 8 << 20
FRAGMENT = 4 << 10

# path -> (UcxConfig settings of the survivor, fragments per transfer)
UCX_PATHS: dict[str, tuple[dict[str, Any], int]] = {
    "cma": ({}, 1024),
    "ucx-direct": ({"cma": "off", "stage_below": 0}, 256),
    "tcp": ({"cma": "off", "error_mode": "peer", "stage_below": 0}, 256),
    "staged": ({"cma": "off"}, 1024),
    "staged-tcp": ({"cma": "off", "error_mode": "peer"}, 512),
}
PATHS = [*UCX_PATHS, "cuda_ipc"]


def counters(agent: kvxfer.Agent) -> dict[str, int]:
    """What the survivor holds now: process resources, agent state, and the UCX backend's internals."""
    with open("/proc/self/statm", encoding="ascii") as file:
        statm = file.read().split()
    held = {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "rss_kib": int(statm[1]) * os.sysconf("SC_PAGE_SIZE") // 1024,
        "regions": len(agent.regions),
        "handles": len(agent._active),
        "peers": len(agent._peers),
    }
    from kvxfer.backends.ucx import UcxBackend

    for backend in agent._backends:
        if isinstance(backend, UcxBackend):
            services = backend.services
            held.update(
                {
                    "ucx_requests": len(services.ledger.active) + len(services.ledger.awaiting),
                    "ucx_sends": services.worker.sends_in_flight,
                    "ucx_receives": len(services.worker.inbox.receives),
                    "ucx_endpoints": services.worker.watched_endpoints,
                    "ucx_closing": services.links.closing,
                    "ucx_links": len(services.links),
                }
            )
    return held


#: counters that must come back exactly to their baseline after every trial (RSS is measured, not compared)
EXACT = (
    "fds",
    "threads",
    "regions",
    "handles",
    "ucx_requests",
    "ucx_sends",
    "ucx_receives",
    "ucx_endpoints",
    "ucx_closing",
)


#: counters that are 0 once the survivor holds nothing for any victim (what a baseline is taken at)
IN_FLIGHT = (
    "handles",
    "peers",
    "ucx_requests",
    "ucx_sends",
    "ucx_receives",
    "ucx_endpoints",
    "ucx_closing",
    "ucx_links",
)


@dataclass
class Trial:
    """One trial's outcome."""

    path: str
    sig: str
    op: str
    delay: float
    outcomes: list[str] = field(default_factory=list)
    final_after: float = 0.0  # seconds from the signal to the in-flight transfer's final state
    hang: bool = False
    leaks: dict[str, tuple[int, int]] = field(default_factory=dict)
    rss_kib: int = 0


class Survivor:
    """The agent that stays: one per path, reused across trials so that leaks accumulate."""

    def __init__(self, path: str) -> None:
        self.path = path
        if path == "cuda_ipc":
            import cupy

            from kvxfer.backends.cuda_ipc import CudaIpcBackend

            backend: Any = CudaIpcBackend()
            self.memory: Any = cupy.zeros(REGION, dtype=cupy.uint8)
            self.fragments = 1024
        else:
            from kvxfer.backends.ucx import UcxBackend
            from kvxfer.backends.ucx.config import UcxConfig

            settings, self.fragments = UCX_PATHS[path]
            backend = UcxBackend(UcxConfig(**settings))
            self.memory = np.zeros(REGION, dtype=np.uint8)
            random_fill(self.memory, seed=1)
        # The backend's own deadline is longer than the handles' (DEADLINE, given per transfer): a slow warm-up
        # on a loaded machine is not a fault, and a stopped peer's transfers end at the handle's deadline.
        self.agent = kvxfer.Agent(
            f"survivor-{path}", backends=[backend], timeouts=kvxfer.Timeouts(transfer=30.0, close=2.0)
        )
        self.region = self.agent.register(self.memory, name="buf")
        self.baseline: dict[str, int] | None = None

    def close(self) -> None:
        self.agent.close()

    def settle(self, seconds: float = 3.0) -> dict[str, int]:
        """Counters once the survivor has let go of the last victim (waits up to ``seconds`` for it).

        Without a baseline yet, "let go" means quiescent (nothing in flight, no peer, link or endpoint, not even
        one still closing): a baseline taken while the warm-up's endpoint was still closing (a send in flight, a
        closing link and its fd) made a later, fully released trial count as a "leak" of (1, 0)."""
        give_up = time.monotonic() + seconds
        while True:
            now = counters(self.agent)
            if self.baseline is None:
                if all(now[k] == 0 for k in IN_FLIGHT if k in now):
                    return now
                if time.monotonic() > give_up:
                    raise AssertionError(f"the warm-up trial never let go of its victim within {seconds} s: {now}")
            elif all(now[k] == self.baseline[k] for k in EXACT if k in self.baseline) or time.monotonic() > give_up:
                return now
            time.sleep(0.02)

    def trial(self, sig: int, op: str, rng: np.random.Generator) -> Trial:
        """Start a victim, stream transfers at it, signal it after a random delay, then count."""
        delay = float(rng.uniform(0.0, 0.03))
        result = Trial(self.path, signal.Signals(sig).name, op, delay)
        device = 0 if self.path == "cuda_ipc" else -1
        backend = "cuda_ipc" if device >= 0 else "ucx"
        with RemoteAgent("victim", REGION, device=device, backend=backend) as victim:
            peer = self.agent.connect(victim.metadata)
            offsets = rng.permutation(REGION // FRAGMENT)[: self.fragments] * FRAGMENT
            plan = self.agent.plan(
                kvxfer.Descs.from_ranges(self.region, offsets, FRAGMENT),
                peer,
                kvxfer.Descs.from_ranges(peer.region("buf"), offsets[::-1].copy(), FRAGMENT),
            )
            move = self.agent.write if op == "WRITE" else self.agent.read
            move(plan).wait(30)  # warm: connections, page faults
            signalled = threading.Event()
            signalled_at = [0.0]

            def fire() -> None:
                victim.kill(sig)
                signalled_at[0] = time.monotonic()
                signalled.set()

            timer = threading.Timer(delay, fire)
            timer.start()
            try:
                stop = time.monotonic() + delay + 3 * DEADLINE
                while time.monotonic() < stop:
                    try:
                        handle = move(plan, timeout=DEADLINE)
                    except KvxferError as error:  # refused at post: the peer is known lost
                        result.outcomes.append(f"refused:{type(error).__name__}")
                        break
                    began = time.monotonic()
                    try:
                        handle.wait(DEADLINE + 5.0)
                        result.outcomes.append("done")
                    except KvxferError as error:
                        result.outcomes.append(type(error).__name__)
                    ended = time.monotonic()
                    if ended - began > DEADLINE + 1.0:
                        result.hang = True
                    if signalled.is_set() and began <= signalled_at[0] + DEADLINE:
                        result.final_after = max(result.final_after, ended - max(began, signalled_at[0]))
                    handle.release()
                    if signalled.is_set() and result.outcomes[-1] != "done":
                        break
            finally:
                timer.join()
                if sig == signal.SIGSTOP:
                    victim.kill(signal.SIGKILL)  # a stopped peer that later dies: what it held must go too
                victim.process.join(10)
            self.agent.disconnect(peer)
        now = self.settle()
        if self.baseline is None:
            self.baseline = now
        else:
            result.leaks = {k: (self.baseline[k], now[k]) for k in EXACT if k in now and now[k] != self.baseline[k]}
        result.rss_kib = now["rss_kib"]
        return result


def summary(trials: list[Trial]) -> dict[str, Any]:
    """Counts for the report: trials, hangs, late final states, leaks, RSS growth per 100 trials."""
    late = [t for t in trials if t.final_after > DEADLINE + 1.0]
    leaks = [t for t in trials if t.leaks]
    rss = [t.rss_kib for t in trials]
    growth = (rss[-1] - rss[len(rss) // 4]) / max(1, len(rss) - 1 - len(rss) // 4) * 100 if len(rss) > 4 else 0.0
    return {
        "trials": len(trials),
        "hangs": sum(t.hang for t in trials),
        "late": len(late),
        "leaks": len(leaks),
        "leak_examples": [(t.path, t.sig, t.op, t.leaks) for t in leaks[:5]],
        "rss_growth_kib_per_100": round(growth, 1),
        "max_final_after_s": round(max((t.final_after for t in trials), default=0.0), 3),
    }
