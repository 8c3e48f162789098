"""Fixtures of the kernel tests."""

from __future__ import annotations

import ctypes

import pytest

from tests.kernels import emulator as emulation


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The host emulation of csrc/kv_copy.cu (skips the test without a C++ compiler)."""
    lib = emulation.build(tmp_path_factory.mktemp("kv_copy"))
    if lib is None:
        pytest.skip("needs a C++ compiler (g++) to build the host emulation of kv_copy.cu")
    return lib


@pytest.fixture(scope="session")
def id_emulator(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The host emulation of csrc/id_copy.cu (skips the test without a C++ compiler)."""
    lib = emulation.build_ids(tmp_path_factory.mktemp("id_copy"))
    if lib is None:
        pytest.skip("needs a C++ compiler (g++) to build the host emulation of id_copy.cu")
    return lib
