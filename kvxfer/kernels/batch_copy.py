"""One-launch copies of many (source, destination, nbytes) spans on a GPU: the descriptor-list counterpart of
the KV box copy. Used by backends for plans of arbitrary descriptors; pointers may be peer or IPC-mapped.

Spans are split on the host into pieces of at most ``PIECE_NBYTES`` so every CTA gets a similar share; the piece
tables go to the device once per plan and are cached by the caller.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import Stream, cupy_module

PIECE_NBYTES = 64 << 10
THREADS = 256
_SOURCE = Path(__file__).with_name("csrc") / "batch_copy.cu"


def split_pieces(
    sources: np.ndarray, destinations: np.ndarray, sizes: np.ndarray, piece: int = PIECE_NBYTES
) -> np.ndarray:
    """uint64[3, m] table (sources, destinations, sizes) with every span cut into pieces of <= ``piece`` bytes.

    ``sources``, ``destinations``, ``sizes``: uint64[n] host arrays. Vectorized: no loop per span.
    """
    sizes = np.asarray(sizes, dtype=np.uint64)
    counts = ((sizes + np.uint64(piece - 1)) // np.uint64(piece)).astype(np.int64)
    owner = np.repeat(np.arange(len(sizes)), counts)
    first = np.cumsum(counts) - counts
    offsets = ((np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * piece).astype(np.uint64)
    table = np.empty((3, len(owner)), dtype=np.uint64)
    table[0] = np.asarray(sources, dtype=np.uint64)[owner] + offsets
    table[1] = np.asarray(destinations, dtype=np.uint64)[owner] + offsets
    table[2] = np.minimum(sizes[owner] - offsets, np.uint64(piece))
    return table


@functools.cache
def _kernel(device: int) -> Any:
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=_SOURCE.read_text(), options=("--std=c++17",)).get_function("kvxfer_batch_copy")


#: Resident CTAs of 256 threads per SM the grid is sized for (the copy strides over pieces beyond that).
CTAS_PER_SM = 8


@functools.cache
def _multiprocessors(device: int) -> int:
    return int(cupy_module().cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def to_device(table: np.ndarray, device: int) -> Any:
    """The piece table as a cupy uint64[3, m] array on ``device``."""
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        return cupy.asarray(table)


def launch(device_table: Any, device: int, stream: Stream, ctas_per_sm: int = CTAS_PER_SM) -> None:
    """Copy every piece of ``device_table`` (from :func:`to_device`) with one launch on ``stream``."""
    count = int(device_table.shape[1])
    if count == 0:
        return
    cupy = cupy_module()
    with cupy.cuda.Device(device):
        grid = min(count, _multiprocessors(device) * ctas_per_sm)
        _kernel(device)(
            (grid,), (THREADS,), (device_table[0], device_table[1], device_table[2], np.int64(count)), stream=stream
        )
