"""The fault matrix, bounded for CI (issue 14): each path x {SIGKILL, SIGSTOP} once (op drawn at random, seeded),
with the survivor's resources counted before and after every trial. ``test_soak`` is the long version
(``KVXFER_FAULT_TRIALS`` trials, default 24; run with 240 for the soak numbers in the report)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from .matrix import DEADLINE, UCX_PATHS, Survivor, summary

SIGNALS = (signal.SIGKILL, signal.SIGSTOP)


def _check(trials: list) -> dict:
    numbers = summary(trials)
    print(json.dumps(numbers))
    assert numbers["hangs"] == 0, numbers
    assert numbers["late"] == 0, f"a final state came later than the deadline + 1 s: {numbers}"
    assert numbers["leaks"] == 0, numbers
    for trial in trials:  # every trial ended with at least one failure or refusal once the peer was signalled
        assert trial.outcomes, trial
    return numbers


@pytest.mark.ucx
@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", list(UCX_PATHS))
def test_fault_matrix(path: str) -> None:
    rng = np.random.default_rng(sum(map(ord, path)))
    survivor = Survivor(path)
    try:
        trials = [survivor.trial(signal.SIGKILL, "WRITE", rng)]  # warm-up: its counts are the baseline
        for sig in SIGNALS:
            trials.append(survivor.trial(sig, str(rng.choice(["READ", "WRITE"])), rng))
    finally:
        survivor.close()
    _check(trials[1:])


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_fault_matrix_cuda_ipc() -> None:
    rng = np.random.default_rng(7)
    survivor = Survivor("cuda_ipc")
    try:
        trials = [survivor.trial(signal.SIGKILL, "WRITE", rng)]
        for sig in SIGNALS:
            for op in ("READ", "WRITE"):
                trials.append(survivor.trial(sig, op, rng))
    finally:
        survivor.close()
    _check(trials[1:])


@pytest.mark.ucx
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak() -> None:
    """Random path x signal x op for KVXFER_FAULT_TRIALS trials (test-only variable, read here)."""
    total = int(os.environ.get("KVXFER_FAULT_TRIALS", "24"))
    rng = np.random.default_rng(2026)
    survivors = {path: Survivor(path) for path in UCX_PATHS}
    trials: dict[str, list] = {path: [] for path in UCX_PATHS}
    try:
        for survivor in survivors.values():
            survivor.trial(signal.SIGKILL, "WRITE", rng)  # warm-up
        for survivor in survivors.values():  # fds, threads and RSS are the process's: baselines after all warm-ups
            survivor.baseline = None
            survivor.baseline = survivor.settle()
        for _ in range(total):
            path = str(rng.choice(list(UCX_PATHS)))
            sig = SIGNALS[int(rng.integers(2))]
            trials[path].append(survivors[path].trial(sig, str(rng.choice(["READ", "WRITE"])), rng))
    finally:
        for survivor in survivors.values():
            survivor.close()
    everything = [t for path in trials.values() for t in path]
    per_path = {path: summary(ts) for path, ts in trials.items() if ts}
    print(json.dumps({"deadline": DEADLINE, "per_path": per_path}))
    _check(everything)
