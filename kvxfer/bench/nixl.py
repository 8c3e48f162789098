"""`--compare nixl`: NIXL (its UCX backend) on the same work as a sweep, when the ``nixl`` package is installed.

Both NIXL sides run in processes of their own (spawned), so NIXL's UCX never shares a process with kvxfer's. Per
case the initiator moves the same fragments (the same slots: :meth:`Case.offsets`) with the same warm-up and
repetitions; *prep* = ``prep_xfer_dlist`` of both sides + ``make_prepped_xfer`` (timed alone, ``repeats`` times; the
timed transfers repost one prepared handle per thread, as nixlbench does), *post* = ``transfer()``, *completion* =
post to ``check_xfer_state() == "DONE"``. Several threads' requests are
posted back to back and polled together (NIXL progresses them on its own thread). The byte check is the sweep's.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from .cases import Case, Pool, sample_windows, use_device

_MEMORY_TYPE = {"host": "DRAM", "cuda": "VRAM"}
_CHILD_TIMEOUT = 600.0


def unavailable_reason() -> str | None:
    """None when NIXL's Python package is importable here, else why not."""
    # find_spec only: importing nixl here would load NIXL's own UCX into the process that runs kvxfer's
    if importlib.util.find_spec("nixl") is None:
        return "NIXL is not installed (pip install nixl)"
    return None


class _Side:
    """A NIXL agent with one random pool per memory kind (in a child process)."""

    def __init__(self, name: str, kinds: list[str], nbytes: int, device: int, seed: int) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        use_device(kinds, device)
        self.agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        self.pools = {kind: Pool(kind, nbytes, device, seed + i) for i, kind in enumerate(kinds)}
        self.addresses = {
            kind: (_pointer(pool), pool.device if kind == "cuda" else 0) for kind, pool in self.pools.items()
        }
        for kind in self.pools:
            address, device_id = self.addresses[kind]
            self.agent.register_memory([(address, nbytes, device_id, "")], _MEMORY_TYPE[kind])
        self.remote_name = ""
        self.remote_addresses: dict[str, tuple[int, int]] = {}

    def hello(self) -> tuple[bytes, dict[str, tuple[int, int]], dict[str, str]]:
        return self.agent.get_agent_metadata(), self.addresses, {k: p.label for k, p in self.pools.items()}

    def connect(self, metadata: bytes, addresses: dict[str, tuple[int, int]]) -> None:
        self.remote_name = self.agent.add_remote_agent(metadata)
        self.remote_addresses = addresses

    def _descs(self, base: tuple[int, int], offsets: np.ndarray, fragment: int) -> np.ndarray:
        descs = np.empty((len(offsets), 3), dtype=np.uint64)
        descs[:, 0] = np.uint64(base[0]) + offsets.astype(np.uint64)
        descs[:, 1] = fragment
        descs[:, 2] = base[1]
        return descs

    def _prepare(self, case: Case, local: np.ndarray, remote: np.ndarray) -> tuple[Any, Any, Any, float]:
        """(handle, local dlist, remote dlist, seconds) of one prepared request."""
        began = time.perf_counter()
        local_side = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            self._descs(self.addresses[case.initiator], local, case.fragment),
            _MEMORY_TYPE[case.initiator],
        )
        remote_side = self.agent.prep_xfer_dlist(
            self.remote_name,
            self._descs(self.remote_addresses[case.target], remote, case.fragment),
            _MEMORY_TYPE[case.target],
        )
        index = np.arange(case.batch, dtype=np.int32)
        handle = self.agent.make_prepped_xfer(case.op, local_side, index, remote_side, index)
        return handle, local_side, remote_side, time.perf_counter() - began

    def _release(self, prepared: list[tuple[Any, Any, Any, float]]) -> None:
        for handle, local_side, remote_side, _ in prepared:
            self.agent.release_xfer_handle(handle)
            self.agent.release_dlist_handle(local_side)
            self.agent.release_dlist_handle(remote_side)

    def run_case(self, case: Case, warmup: int, repeats: int, verify: int, timeout: float) -> dict[str, Any]:
        """Timings of ``case`` (seconds per repetition and request) and, with ``verify``, the byte-check data."""
        local, remote = case.offsets()
        prep = []
        for repetition in range(repeats):  # timed alone, as the sweep times kvxfer's plans
            once = [self._prepare(case, local[repetition % case.threads], remote[repetition % case.threads])]
            prep.append(once[0][3])
            self._release(once)
        prepared = [self._prepare(case, local[t], remote[t]) for t in range(case.threads)]
        post, completion, request = [], [], []
        try:
            for repetition in range(warmup + repeats):
                times = self._repetition(prepared, timeout)
                if repetition >= warmup:
                    post += [t[1] - t[0] for t in times]
                    completion += [t[2] - t[1] for t in times]
                    request.append(max(t[2] for t in times) - min(t[0] for t in times))
            result: dict[str, Any] = {"prep": prep, "post": post, "completion": completion, "request": request}
            if verify:
                local_windows, remote_windows, width = sample_windows(case, local, remote, verify, case.seed)
                pool = self.pools[case.initiator]
                pool.scramble(local_windows, width, seed=case.seed + 1)
                self._repetition(prepared, timeout)
                result["verify"] = (pool.digest(local_windows, width), remote_windows, width)
        finally:
            self._release(prepared)
        return result

    def _repetition(
        self, prepared: list[tuple[Any, Any, Any, float]], timeout: float
    ) -> list[tuple[float, float, float]]:
        """(start, posted, done) per request: all posted back to back, then polled together."""
        started, posted = [], []
        for handle, *_ in prepared:
            started.append(time.perf_counter())
            state = self.agent.transfer(handle)
            posted.append(time.perf_counter())
            if state == "ERR":
                raise RuntimeError("NIXL transfer() returned ERR")
        done = [0.0] * len(prepared)
        give_up = time.monotonic() + timeout
        while not all(done):
            for i, (handle, *_) in enumerate(prepared):
                if not done[i]:
                    state = self.agent.check_xfer_state(handle)
                    if state == "DONE":
                        done[i] = time.perf_counter()
                    elif state == "ERR":
                        raise RuntimeError("NIXL transfer ended in state ERR")
            if time.monotonic() > give_up:
                raise TimeoutError(f"NIXL transfer not DONE within {timeout} s")
        return list(zip(started, posted, done, strict=True))


def _pointer(pool: Pool) -> int:
    return int(pool.array.data.ptr) if pool.kind == "cuda" else int(pool.array.ctypes.data)


def _serve(connection: Any, name: str, kinds: list[str], nbytes: int, device: int, seed: int) -> None:
    """Child-process loop: build the side, answer commands until "close"."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # this child only: keep NIXL's INFO lines off the table
    try:
        side = _Side(name, kinds, nbytes, device, seed)
        connection.send(side.hello())
    except Exception:  # noqa: BLE001 the child reports any failure to its parent, which raises it
        connection.send(RuntimeError(traceback.format_exc()))
        return
    while True:
        command, *args = connection.recv()
        try:
            if command == "close":
                connection.send(None)
                return
            methods: dict[str, Callable[..., Any]] = {
                "connect": side.connect,
                "case": side.run_case,
                "digest": lambda kind, offsets, width: side.pools[kind].digest(offsets, width),
            }
            method = methods[command]
            connection.send(method(*args))
        except Exception:  # noqa: BLE001 the child reports any failure to its parent, which raises it
            connection.send(RuntimeError(traceback.format_exc()))


class _Child:
    """One NIXL side in a spawned process, driven over a pipe."""

    def __init__(self, name: str, kinds: list[str], nbytes: int, device: int, seed: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, name, kinds, nbytes, device, seed), daemon=True)
        self.process.start()
        self.metadata, self.addresses, self.labels = self._answer()

    def call(self, *command: Any) -> Any:
        self.connection.send(command)
        return self._answer()

    def _answer(self) -> Any:
        if not self.connection.poll(_CHILD_TIMEOUT):
            raise TimeoutError(f"NIXL child did not answer within {_CHILD_TIMEOUT} s")
        answer = self.connection.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("close")
            except (OSError, EOFError, TimeoutError, RuntimeError):
                pass  # a child that died already has nothing to close
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


def compare(
    config: Any,
    cases: list[Case],
    result: Any,
    limits: Any,
    on_row: Callable[[Case, dict[str, Any]], None] | None = None,
) -> None:
    """Append NIXL rows for the work of ``cases`` to ``result`` and fill nixl_gbps / vs_nixl of kvxfer rows.

    Skipped with a note (never an error) when NIXL is absent or the target is a ``--peer``."""
    from .sweep import attach_ceiling, timing_row

    reason = unavailable_reason()
    if reason is None and config.peer is not None:
        reason = "NIXL needs a target this tool starts (not --peer)"
    if reason is not None:
        result.notes.append(f"--compare nixl skipped: {reason}")
        return
    works = list({replace(c, backend="nixl"): None for c in cases})
    nbytes = max(c.nbytes for c in works)
    children: list[_Child] = []
    try:
        target = _Child("nixl-target", sorted({c.target for c in works}), nbytes, config.target_gpu, 7)
        children.append(target)
        initiator = _Child("nixl-initiator", sorted({c.initiator for c in works}), nbytes, config.initiator_gpu, 101)
        children.append(initiator)
        initiator.call("connect", target.metadata, target.addresses)
        for work in works:
            timings = initiator.call("case", work, config.warmup, config.repeats, config.verify, config.timeout)
            row = timing_row(work, timings["prep"], timings["post"], timings["completion"], timings["request"])
            row.update(
                system="nixl",
                backend="nixl-ucx",
                peer="loopback",
                initiator=initiator.labels[work.initiator],
                target=target.labels[work.target],
                path="nixl",
            )
            if "verify" in timings:
                digest, windows, width = timings["verify"]
                row["verified"] = digest == target.call("digest", work.target, windows, width)
            attach_ceiling(row, work, limits, True)
            result.rows.append(row)
            if on_row:
                on_row(work, row)
    except Exception as error:  # noqa: BLE001 NIXL failing must not lose the kvxfer rows measured already
        result.notes.append(f"--compare nixl failed: {type(error).__name__}: {str(error)[-1000:]}")
    finally:
        for child in reversed(children):
            child.close()
    _fill_ratios(result.rows)


def _fill_ratios(rows: list[dict[str, Any]]) -> None:
    work = ("initiator", "target", "op", "block_size", "batch_size", "threads")
    nixl = {tuple(r[k] for k in work): r["gbps"] for r in rows if r["system"] == "nixl"}
    for row in rows:
        if row["system"] == "kvxfer":
            theirs = nixl.get(tuple(row[k] for k in work))
            row["nixl_gbps"] = theirs
            row["vs_nixl"] = row["gbps"] / theirs if theirs else None
