"""The shape of one launch of csrc/kv_copy.cu: entry, vector width, thread groups, grid, and the kernel arguments.

Pure Python: the CUDA launcher and the host emulation in the tests compute launches with the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .tables import KernelTables

#: Threads per SM the register cap of each unroll aims at (48 registers for 4 loads in flight, 80 for 8).
_THREADS_PER_SM = {1: 1280, 2: 1280, 4: 1280, 8: 768}


@dataclass(frozen=True)
class KernelTuning:
    """Compile-time and launch knobs of the kernel; :data:`DEFAULT_TUNING` is what every call uses.

    ``unroll``: 16-byte loads each thread keeps in flight (1, 2, 4 or 8). ``threads``: threads per CTA (a power of
    two, 32..1024). ``waves``: grid size in multiples of the CTAs resident at once, groups striding over boxes; None:
    one thread group per box, no striding (the per-box grid). ``prefetch``: with a striding grid, load the next
    box's table entries while copying the current one. ``runs``: use the run entry (no index math) for plans whose
    boxes are contiguous on both sides; False runs them through the rows entry (for comparison). ``streaming``:
    16-byte loads and stores with the .cs (evict-first) cache hint. ``min_ctas``: CTAs per SM the compiler must fit,
    which caps registers (None: from ``unroll`` and ``threads``).
    """

    unroll: int = 4
    threads: int = 256
    waves: float | None = None
    prefetch: bool = True
    runs: bool = True
    streaming: bool = False
    min_ctas: int | None = None

    def __post_init__(self) -> None:
        if self.unroll not in _THREADS_PER_SM:
            raise ConfigError(f"KernelTuning.unroll must be one of {sorted(_THREADS_PER_SM)}, got {self.unroll}")
        if self.threads not in (32, 64, 128, 256, 512, 1024):
            raise ConfigError(f"KernelTuning.threads must be a power of two in [32, 1024], got {self.threads}")
        if self.waves is not None and not self.waves > 0:
            raise ConfigError(f"KernelTuning.waves must be > 0 or None, got {self.waves}")

    @property
    def ctas_per_sm(self) -> int:
        """The ``__launch_bounds__`` minimum of CTAs per SM."""
        if self.min_ctas is not None:
            return self.min_ctas
        return max(1, _THREADS_PER_SM[self.unroll] // self.threads)

    def defines(self) -> tuple[str, ...]:
        """The -D options of this tuning (``waves`` and ``runs`` are launch-time only)."""
        return (
            f"-DKVXFER_THREADS={self.threads}",
            f"-DKVXFER_UNROLL={self.unroll}",
            f"-DKVXFER_PREFETCH={int(self.prefetch)}",
            f"-DKVXFER_MIN_CTAS={self.ctas_per_sm}",
            f"-DKVXFER_STREAMING={int(self.streaming)}",
        )


#: What calls use unless they pass a tuning, chosen per kernel entry from the H200 run of 2026-11-22
#: (python -m kvxfer.bench.kernels, GPU-only timing, 2 GiB rows, ratio to a memcpy of the same bytes):
#: - rows entries (boxes that need index math: gathers, scatters, NHD<->HND): one wave of resident CTAs striding
#:   over boxes. Per-box grid gave 0.853-0.865 at 4 KiB and 0.906-0.931 at 32 KiB; one wave 0.915-0.934 and
#:   0.925-0.940 (2 MiB: 0.931 either way).
#: - run entries (boxes contiguous on both sides: TP split/merge of HND blocks): the per-box grid, 0.935-0.941 at
#:   4 KiB, 0.908-0.911 at 32 KiB (one wave: 0.909 / 0.880; unroll 8: 0.918 / 0.916).
DEFAULT_TUNING = KernelTuning(waves=1.0)
RUN_TUNING = KernelTuning()


def default_tuning(contiguous: bool) -> KernelTuning:
    """The tuning a launch uses when none is given: RUN_TUNING for run-entry plans, else DEFAULT_TUNING."""
    return RUN_TUNING if contiguous else DEFAULT_TUNING


#: Kept for callers of the old module constant: threads per CTA of the default tuning.
THREADS_PER_CTA = DEFAULT_TUNING.threads


@dataclass(frozen=True)
class LaunchShape:
    """One launch of csrc/kv_copy.cu: ``entry`` on ``num_ctas`` x ``threads``.

    ``src_addr``/``dst_addr``: the pointer arguments (region start + base); ``scalars``: the remaining kernel
    arguments after the table, in order, as NumPy scalars of the kernel's C types.
    """

    entry: str
    vector_bytes: int
    num_ctas: int
    threads: int
    src_addr: int
    dst_addr: int
    scalars: tuple[Any, ...]


def vector_bytes(tables: KernelTables, src_addr: int, dst_addr: int) -> int:
    """The widest load/store (1..16 bytes) that every address of the copy is aligned to."""
    return math.gcd(tables.alignment, src_addr, dst_addr)


def entry_name(tables: KernelTables, vector: int, tuning: KernelTuning) -> str:
    """The kernel entry for ``tables`` at ``vector``-byte loads: run, rows (32-bit offsets) or rows_wide."""
    if tables.contiguous and tuning.runs:
        return f"kvxfer_run_v{vector}"
    return f"kvxfer_rows_v{vector}" if tables.narrow else f"kvxfer_rows_wide_v{vector}"


def launch_shape(
    tables: KernelTables, src_addr: int, dst_addr: int, tuning: KernelTuning, max_ctas: int | None = None
) -> LaunchShape:
    """Kernel arguments for regions starting at ``src_addr``/``dst_addr`` (device pointers as ints).

    The vector width is the widest power of two (<= 16) dividing both addresses and ``tables.alignment``. Small
    boxes share a CTA: a group of threads (32..``tuning.threads``, a power of two) copies one box, sized so each
    thread has about ``tuning.unroll`` vectors of the largest box. ``max_ctas`` caps the grid (the groups then
    stride over boxes).
    """
    vector = vector_bytes(tables, src_addr, dst_addr)
    row_vectors = tables.row_nbytes // vector
    box_vectors = tables.max_count * tables.unit_rows * row_vectors
    group = 1 << max(0, -(-box_vectors // tuning.unroll) - 1).bit_length()
    group = min(tuning.threads, max(32, group))
    groups_per_cta = tuning.threads // group
    num_ctas = -(-tables.num_boxes // groups_per_cta)
    if max_ctas is not None:
        num_ctas = max(1, min(num_ctas, int(max_ctas)))
    seg_mul, seg_shr = fast_divisor(max(1, tables.num_segments))
    row_mul, row_shr = fast_divisor(row_vectors)
    rows_mul, rows_shr = fast_divisor(tables.unit_rows)
    i32, i64, u32 = np.int32, np.int64, np.uint32
    scalars = (
        i32(tables.num_segments),
        i32(tables.num_layer_parts),
        u32(seg_mul),
        u32(seg_shr),
        i32(tables.unit_rows),
        i32(row_vectors),
        i64(tables.src_unit_stride),
        i64(tables.src_row_stride),
        i64(tables.dst_unit_stride),
        i64(tables.dst_row_stride),
        u32(row_mul),
        u32(row_shr),
        u32(rows_mul),
        u32(rows_shr),
        i32(group.bit_length() - 1),
    )
    return LaunchShape(
        entry_name(tables, vector, tuning),
        vector,
        num_ctas,
        tuning.threads,
        src_addr + tables.src_base,
        dst_addr + tables.dst_base,
        scalars,
    )


def fast_divisor(divisor: int) -> tuple[int, int]:
    """(multiplier, shift) so that ``n // divisor == umulhi(n, multiplier) >> shift`` for 0 <= n < 2**31.

    A multiplier of 0 means divisor 1 (the kernel then skips the multiply).
    """
    if not 1 <= divisor < 2**31:
        raise ConfigError(f"divisor must lie in [1, 2**31), got {divisor}")
    if divisor == 1:
        return 0, 0
    log2 = (divisor - 1).bit_length()
    power = 31 + log2
    return ((1 << power) + divisor - 1) // divisor, power - 32
