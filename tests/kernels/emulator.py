"""Build and call the host emulation of csrc/kv_copy.cu (host_shim.h + host_harness.cpp, compiled with g++)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kvxfer.kernels as kernels
from kvxfer.kernels.launch import DEFAULT_TUNING, KernelTuning, LaunchShape

_HERE = Path(__file__).parent
_CSRC = Path(kernels.__file__).parent / "csrc"

_c = ctypes
_ARGTYPES = [
    _c.c_char_p,
    _c.c_int,
    _c.c_int,
    _c.c_void_p,
    _c.c_void_p,
    _c.c_void_p,
    _c.c_void_p,
    _c.c_void_p,
    _c.c_void_p,
    _c.c_void_p,
    _c.c_int,
    _c.c_int,
    _c.c_uint,
    _c.c_uint,
    _c.c_int,
    _c.c_int,
    _c.c_longlong,
    _c.c_longlong,
    _c.c_longlong,
    _c.c_longlong,
    _c.c_uint,
    _c.c_uint,
    _c.c_uint,
    _c.c_uint,
    _c.c_int,
]


def build(directory: Path, tuning: KernelTuning = DEFAULT_TUNING) -> ctypes.CDLL | None:
    """Compile the emulation (with ``tuning``'s -D options) into ``directory``; None without a C++ compiler."""
    lib = _compile(directory, tuning, "host_harness.cpp", "libkv_copy_host.so")
    if lib is not None:
        lib.kvxfer_emulate.argtypes = _ARGTYPES
        lib.kvxfer_emulate.restype = ctypes.c_longlong
    return lib


def build_ids(directory: Path, tuning: KernelTuning = DEFAULT_TUNING) -> ctypes.CDLL | None:
    """Compile the emulation of csrc/id_copy.cu (after kv_copy.cu) into ``directory``; None without g++."""
    lib = _compile(directory, tuning, "id_harness.cpp", "libid_copy_host.so")
    if lib is not None:
        lib.kvxfer_ids_emulate.argtypes = [_c.c_char_p, _c.c_int, _c.c_int, *[_c.c_void_p] * 7]
        lib.kvxfer_ids_emulate.restype = ctypes.c_longlong
    return lib


def launch_ids(
    lib: ctypes.CDLL,
    entry: str,
    num_ctas: int,
    threads: int,
    src: int,
    dst: int,
    read_span: tuple[int, int],
    write_span: tuple[int, int],
    buffer: int,
) -> int:
    """Run one launch of an id_copy.cu entry serially; returns the number of out-of-bounds or misaligned accesses."""
    result = int(lib.kvxfer_ids_emulate(entry.encode(), num_ctas, threads, src, dst, *read_span, *write_span, buffer))
    if result < 0:
        raise ValueError(f"emulation refused {entry!r} with {threads} threads (code {result})")
    return result


def _compile(directory: Path, tuning: KernelTuning, harness: str, name: str) -> ctypes.CDLL | None:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    library = directory / name
    command = [
        compiler,
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",
        *tuning.defines(),
        f"-I{_CSRC}",
        f"-I{_HERE}",
        str(_HERE / harness),
        "-o",
        str(library),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return ctypes.CDLL(str(library))


def launch(
    lib: ctypes.CDLL,
    entry: str,
    num_ctas: int,
    threads: int,
    src: int,
    dst: int,
    read_span: tuple[int, int],
    write_span: tuple[int, int],
    table: int,
    scalars: Sequence[Any],
) -> int:
    """Run one launch serially; returns the number of out-of-bounds or misaligned accesses."""
    result = int(
        lib.kvxfer_emulate(
            entry.encode(),
            num_ctas,
            threads,
            src,
            dst,
            read_span[0],
            read_span[1],
            write_span[0],
            write_span[1],
            table,
            *(int(x) for x in scalars),
        )
    )
    if result < 0:
        raise ValueError(f"emulation refused {entry!r} with {threads} threads (code {result})")
    return result


def launch_shape(
    lib: ctypes.CDLL, shape: LaunchShape, read_span: tuple[int, int], write_span: tuple[int, int], table: int
) -> int:
    """:func:`launch` with the entry, grid and arguments of ``shape``."""
    return launch(
        lib,
        shape.entry,
        shape.num_ctas,
        shape.threads,
        shape.src_addr,
        shape.dst_addr,
        read_span,
        write_span,
        table,
        shape.scalars,
    )
