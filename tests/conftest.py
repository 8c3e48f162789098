"""Marks and shared fixtures. GPU and UCX tests skip themselves on machines that lack them."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def _gpu_count() -> int:
    try:
        from kvxfer.devices import device_count

        return device_count()
    except Exception:
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
            if problem:
                item.add_marker(pytest.mark.skip(reason=f"UCX unavailable: {problem}"))
