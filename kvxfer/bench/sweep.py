"""`kvxfer-bench sweep`: bandwidth and latency over backend x memory kinds x op x fragment size x batch x threads.

The initiator (this process) posts READs or WRITEs against a target (a second process the tool starts, a thread
for the in-process ``local`` backend, or a target started by hand on another host: ``--peer host:port``). Per
repetition and per thread: *prep* = building both sides' Descs and the plan, *post* = ``agent.read``/``write``
returning, *completion* = post to ``wait()`` returning; the request time is the wall time from the first post to
the last completion over all threads. As in nixlbench, each thread's request is prepared once and posted every
repetition; prep is timed ``repeats`` times on its own. After warm-up, ``repeats`` repetitions give median and p99;
GB/s (1e9 B/s) is bytes / median request time. Each row carries a ceiling measured in the same run and the ratio
to it: one contiguous copy of the row's bytes on its memory path (memcpy, device/peer copy, pinned h2d/d2h; ``--ceiling
perftest``: ucx_perftest at the row's fragment size for ucx host rows), and a byte check: sampled windows are
overwritten with fresh random bytes on the initiator, one more transfer runs, and both sides' blake2b digests of
the windows must match.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..agent import Agent
from ..descs import Descs
from ..errors import BackendUnavailableError, ConfigError, KvxferError
from ..handle import Timeouts
from . import ceiling as ceilings
from .cases import Case, Pool, expand, sample_windows, use_device
from .target import TargetLink, TargetRunner

#: Keys of every sweep row, in table order (the JSON schema: tests pin it; add keys at the end only).
ROW_KEYS = (
    "system",
    "backend",
    "peer",
    "initiator",
    "target",
    "op",
    "block_size",
    "batch_size",
    "threads",
    "request_bytes",
    "gbps",
    "avg_lat_us",
    "median_us",
    "p99_us",
    "prep_avg_us",
    "prep_p99_us",
    "post_avg_us",
    "post_p99_us",
    "completion_avg_us",
    "completion_p99_us",
    "path",
    "ceiling",
    "ceiling_gbps",
    "ratio",
    "verified",
    "nixl_gbps",
    "vs_nixl",
)
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class SweepConfig:
    """What `kvxfer-bench sweep` runs (see `kvxfer-bench sweep --help` for each field)."""

    backends: tuple[str, ...] = ("ucx",)
    memory: tuple[tuple[str, str], ...] = (("host", "host"),)
    ops: tuple[str, ...] = ("READ", "WRITE")
    sizes: tuple[int, ...] = tuple(4096 << i for i in range(15))
    batches: tuple[int, ...] = (16,)
    threads: tuple[int, ...] = (1,)
    warmup: int = 2
    repeats: int = 10
    verify: int = 4
    peer: str | None = None
    token: str | None = None
    initiator_gpu: int = 0
    target_gpu: int = 0
    ceiling: str = "copy"
    ceiling_nbytes: int | None = None
    timeout: float = 120.0
    compare: tuple[str, ...] = ()
    max_request: int = 1 << 30

    def cases(self) -> list[Case]:
        """The grid, without cases over ``max_request`` bytes."""
        return [
            c
            for c in expand(self.backends, self.memory, self.ops, self.sizes, self.batches, self.threads)
            if c.nbytes <= self.max_request
        ]


@dataclass
class SweepResult:
    """Rows (ROW_KEYS each), the ceilings measured, and notes (skipped work; cases that failed start "FAILED")."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    ceilings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _stats(seconds: Sequence[float]) -> tuple[float, float]:
    """(mean, p99) in microseconds."""
    return float(np.mean(seconds)) * 1e6, float(np.percentile(seconds, 99)) * 1e6


def empty_row() -> dict[str, Any]:
    """A row with every ROW_KEYS key set to None."""
    return dict.fromkeys(ROW_KEYS)


def timing_row(
    case: Case, prep: list[float], post: list[float], completion: list[float], request: list[float]
) -> dict[str, Any]:
    """The timing columns of a row from per-repetition seconds (shared by kvxfer and NIXL rows)."""
    median = float(np.median(request))
    row = empty_row()
    row.update(
        op=case.op,
        block_size=case.fragment,
        batch_size=case.batch,
        threads=case.threads,
        request_bytes=case.nbytes,
        gbps=case.nbytes / median / 1e9,
        avg_lat_us=float(np.mean(request)) / case.batch * 1e6,
        median_us=median * 1e6,
        p99_us=float(np.percentile(request, 99)) * 1e6,
    )
    for name, values in (("prep", prep), ("post", post), ("completion", completion)):
        row[f"{name}_avg_us"], row[f"{name}_p99_us"] = _stats(values) if values else (None, None)
    return row


class Ceilings:
    """Ceilings measured during a sweep, each once: a contiguous copy of a row's bytes on its memory path (or of
    ``ceiling_nbytes`` when set), or ucx_perftest per fragment size and op (``ceiling="perftest"``)."""

    def __init__(self, config: SweepConfig) -> None:
        self.config = config
        self.measured: dict[tuple, dict[str, Any]] = {}
        self.notes: list[str] = []

    def for_row(self, case: Case, source: str, destination: str) -> dict[str, Any]:
        """The ceiling row of ``case`` moving from ``source`` to ``destination`` memory ("host" / "cuda:N")."""
        perftest = self.config.ceiling == "perftest" and case.backend in ("ucx", "nixl")
        if perftest and source == destination == "host" and not self.notes:
            key: tuple = ("perftest", case.fragment, case.op)
            if key not in self.measured:
                try:
                    self.measured[key] = ceilings.perftest(case.fragment, case.op)
                except BackendUnavailableError as error:
                    self.notes.append(f"--ceiling perftest fell back to copy ceilings: {error}")
            if key in self.measured:
                return self.measured[key]
        nbytes = self.config.ceiling_nbytes or case.nbytes
        key = ("copy", source, destination, nbytes)
        if key not in self.measured:
            self.measured[key] = ceilings.path_ceiling(source, destination, nbytes)
        return self.measured[key]


class _Initiator:
    """The posting side for one backend: agent, pools, link to the target."""

    def __init__(self, backend: str, kinds: Sequence[str], nbytes: int, config: SweepConfig, address: str) -> None:
        self.config = config
        use_device(kinds, config.initiator_gpu)
        self.agent = Agent("kvxfer-bench-initiator", backends=[backend], timeouts=Timeouts(transfer=config.timeout))
        try:
            self.pools = {kind: Pool(kind, nbytes, config.initiator_gpu, seed=101 + i) for i, kind in enumerate(kinds)}
            self.regions = {kind: self.agent.register(pool.array, name=kind) for kind, pool in self.pools.items()}
            self.link = TargetLink(self.agent, address, config.token)
        except Exception:
            self.agent.close()
            raise
        self.peer = self.link.peer

    def check_target(self, case: Case) -> None:
        region = self.link.regions.get(case.target)
        if region is None:
            raise ConfigError(
                f"the target has no {case.target!r} memory: it offers {sorted(self.link.regions)}; "
                f"start it with --memory {case.target}"
            )
        if region["nbytes"] < case.nbytes:
            raise ConfigError(
                f"the target's {case.target!r} pool has {region['nbytes']} bytes; case {case} needs "
                f"{case.nbytes}: start it with --nbytes {case.nbytes} or more"
            )

    def measure(self, case: Case) -> dict[str, Any]:
        """One row: warm-up, repetitions, byte check."""
        self.check_target(case)
        config, agent, peer = self.config, self.agent, self.peer
        local_region, remote_region = self.regions[case.initiator], peer.region(case.target)
        local_offsets, remote_offsets = case.offsets()
        post = agent.read if case.op == "READ" else agent.write

        def prepare(thread: int) -> tuple[Any, float]:
            start = time.perf_counter()
            plan = agent.plan(
                Descs.from_ranges(local_region, local_offsets[thread], case.fragment),
                peer,
                Descs.from_ranges(remote_region, remote_offsets[thread], case.fragment),
            )
            return plan, time.perf_counter() - start

        def transfer(plan: Any, barrier: threading.Barrier | None) -> tuple[float, float, float]:
            if barrier is not None:
                barrier.wait(config.timeout)
            start = time.perf_counter()
            with post(plan) as handle:
                posted = time.perf_counter()
                handle.wait(config.timeout)
                return start, posted, time.perf_counter()

        # As nixlbench: a request is prepared once and posted every repetition; prep is timed on its own.
        prep = [prepare(t % case.threads)[1] for t in range(config.repeats)]
        plans = [prepare(t)[0] for t in range(case.threads)]
        posts, completions, requests = [], [], []
        with ThreadPoolExecutor(case.threads) as crew:
            for repetition in range(config.warmup + config.repeats):
                if case.threads == 1:
                    times = [transfer(plans[0], None)]
                else:
                    barrier = threading.Barrier(case.threads)
                    times = list(crew.map(lambda plan, barrier=barrier: transfer(plan, barrier), plans))
                if repetition >= config.warmup:
                    posts += [posted - start for start, posted, _ in times]
                    completions += [done - posted for _, posted, done in times]
                    requests.append(max(t[2] for t in times) - min(t[0] for t in times))
        row = timing_row(case, prep, posts, completions, requests)
        data_path = getattr(plans[0].backend, "data_path", None)
        row.update(
            system="kvxfer",
            backend=case.backend,
            initiator=self.pools[case.initiator].label,
            target=self.link.regions[case.target]["label"],
            path=data_path(plans[0]) if callable(data_path) else case.backend,
            verified=self.verify(case, plans, local_offsets, remote_offsets) if config.verify else None,
        )
        return row

    def verify(self, case: Case, plans: list[Any], local: list[np.ndarray], remote: list[np.ndarray]) -> bool:
        """Fresh bytes into sampled initiator windows, one more transfer, then both sides' digests must match."""
        local_windows, remote_windows, width = sample_windows(case, local, remote, self.config.verify, case.seed)
        pool = self.pools[case.initiator]
        pool.scramble(local_windows, width, seed=case.seed + 1)
        post = self.agent.read if case.op == "READ" else self.agent.write
        for plan in plans:
            with post(plan) as handle:
                handle.wait(self.config.timeout)
        return pool.digest(local_windows, width) == self.link.digest(case.target, remote_windows, width)

    def close(self, stop_target: bool) -> None:
        try:
            self.link.close(stop_target)
        finally:
            self.agent.close()


def run(config: SweepConfig, on_row: Callable[[Case, dict[str, Any]], None] | None = None) -> SweepResult:
    """Measure every case of ``config``; ``on_row(case, row)`` after each (progress)."""
    result = SweepResult()
    cases = config.cases()
    dropped = len(
        expand(config.backends, config.memory, config.ops, config.sizes, config.batches, config.threads)
    ) - len(cases)
    if dropped:
        result.notes.append(f"{dropped} case(s) over --max-request {config.max_request} bytes skipped")
    if not cases:
        return result
    limits = Ceilings(config)
    local_peer = config.peer is None or config.peer.rpartition(":")[0] in _LOOPBACK
    for backend in config.backends:
        mine = [c for c in cases if c.backend == backend]
        if mine:
            result.rows += _run_backend(backend, mine, config, limits, local_peer, on_row, result.notes)
    if "nixl" in config.compare:
        from . import nixl

        nixl.compare(config, cases, result, limits, on_row)
    result.ceilings = list(limits.measured.values())
    result.notes += limits.notes
    return result


def _run_backend(
    backend: str,
    cases: list[Case],
    config: SweepConfig,
    limits: Ceilings,
    local_peer: bool,
    on_row: Callable[[Case, dict[str, Any]], None] | None,
    notes: list[str],
) -> list[dict[str, Any]]:
    nbytes = max(c.nbytes for c in cases)
    runner = None
    address = config.peer
    if address is None:
        runner = TargetRunner(backend, sorted({c.target for c in cases}), nbytes, config.target_gpu)
        address = runner.address
    rows = []
    try:
        initiator = _Initiator(backend, sorted({c.initiator for c in cases}), nbytes, config, address)
        try:
            for case in cases:
                try:
                    row = initiator.measure(case)
                except KvxferError as error:  # keep the rows measured so far; say what failed
                    notes.append(f"FAILED {case}: {type(error).__name__}: {error}")
                    if not initiator.peer.connected:
                        notes.append(f"{backend}: the target is gone; the remaining cases of {backend} were skipped")
                        break
                    continue
                row["peer"] = config.peer or "loopback"
                attach_ceiling(row, case, limits, local_peer)
                rows.append(row)
                if on_row:
                    on_row(case, row)
        finally:
            initiator.close(stop_target=runner is not None)
    finally:
        if runner is not None:
            runner.close()
    return rows


def attach_ceiling(row: dict[str, Any], case: Case, limits: Ceilings, local_peer: bool) -> None:
    """Set ceiling, ceiling_gbps and ratio of ``row``. A peer on another host is bounded here by the local
    memory's own copy (the network is not measured)."""
    initiator = row["initiator"]
    target = row["target"] if local_peer else initiator
    source, destination = (target, initiator) if case.op == "READ" else (initiator, target)
    measured = limits.for_row(case, source, destination)
    row["ceiling"] = f"{measured['ceiling']} {measured['path']}" + ("" if local_peer else " (local)")
    row["ceiling_gbps"] = measured["gbps"]
    row["ratio"] = row["gbps"] / measured["gbps"] if measured["gbps"] else None
