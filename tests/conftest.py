"""Marks and shared fixtures. GPU and UCX tests skip themselves on machines that lack them (UCX ones error instead
when KVXFER_REQUIRE_UCX=1)."""

from __future__ import annotations

import functools
import os

import pytest

from kvxfer.errors import BackendUnavailableError

# Test-only switch, read here with plain os.environ (kvxfer's own settings go through kvxfer/environment.py; this
# one never reaches the package): KVXFER_REQUIRE_UCX=1 turns "UCX unavailable" from a skip of every `ucx` test into
# an error of each, so that CI (.ci/run sets it) cannot pass with the UCX backend silently untested.
REQUIRE_UCX_VARIABLE = "KVXFER_REQUIRE_UCX"


def _ucx_required() -> bool:
    return os.environ.get(REQUIRE_UCX_VARIABLE, "").strip() == "1"


@functools.lru_cache(maxsize=1)
def _gpu_count() -> int:
    try:
        from kvxfer.devices import device_count

        return device_count()
    except (ImportError, RuntimeError, BackendUnavailableError):  # no kvxfer/cupy, or cupy's CUDARuntimeError
        return 0


@functools.lru_cache(maxsize=1)
def _ucx_problem() -> str | None:
    try:
        from kvxfer.backends.ucx import ucx_available
    except ImportError as error:
        return f"kvxfer.backends.ucx not importable: {error}"
    problem = ucx_available()
    return problem


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords and _gpu_count() < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with cupy"))
        if "multi_gpu" in item.keywords and _gpu_count() < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
        if "ucx" in item.keywords:
            problem = _ucx_problem()
            if problem and not _ucx_required():  # required: pytest_runtest_setup below errors instead
                item.add_marker(pytest.mark.skip(reason=f"UCX unavailable: {problem}"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """With KVXFER_REQUIRE_UCX=1, a `ucx` test on a machine whose UCX cannot load errors in setup (not skipped).
    Runs after the skip marks are applied, so a `gpu`+`ucx` test on a machine without a GPU still just skips."""
    if "ucx" in item.keywords and _ucx_required():
        problem = _ucx_problem()
        if problem:
            pytest.fail(f"UCX unavailable but {REQUIRE_UCX_VARIABLE}=1: {problem}", pytrace=False)
