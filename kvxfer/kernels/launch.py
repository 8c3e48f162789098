"""The shape of one launch of csrc/kv_copy.cu: vector width, thread groups, grid, and the kernel's arguments.

Pure Python: the CUDA launcher and the host emulation in the tests compute launches with the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .copy_plan import KernelTables

#: Threads per CTA (passed to csrc/kv_copy.cu with -D, like every KernelTuning field but ``waves``).
THREADS_PER_CTA = 256


@dataclass(frozen=True)
class KernelTuning:
    """Compile-time and launch knobs of the kernel; the defaults are what every call uses.

    ``unroll``: 16-byte loads each thread keeps in flight. ``prefetch``: load the next box's table entries while
    copying the current one. ``min_ctas``: CTAs per SM the compiler must fit (caps registers; 5 fits 48 registers,
    unroll 8 needs 3). ``waves``: grid size in multiples of the CTAs resident at once (None: one thread group
    per box, no striding).
    """

    unroll: int = 4
    prefetch: bool = True
    min_ctas: int = 5
    waves: float | None = 1.0

    def defines(self) -> tuple[str, ...]:
        """The -D options of this tuning."""
        return (f"-DKVXFER_THREADS={THREADS_PER_CTA}", f"-DKVXFER_UNROLL={self.unroll}",
                f"-DKVXFER_PREFETCH={int(self.prefetch)}", f"-DKVXFER_MIN_CTAS={self.min_ctas}")


DEFAULT_TUNING = KernelTuning()
#: Loads in flight per thread by default (groups are sized from it).
UNROLL = DEFAULT_TUNING.unroll


@dataclass(frozen=True)
class LaunchShape:
    """One launch of csrc/kv_copy.cu: entry ``kvxfer_copy_v{vector_bytes}``, ``num_ctas`` x THREADS_PER_CTA.

    ``src_addr``/``dst_addr``: the pointer arguments (region start + base); ``scalars``: the remaining kernel
    arguments in order, as NumPy scalars of the kernel's C types.
    """

    vector_bytes: int
    num_ctas: int
    src_addr: int
    dst_addr: int
    scalars: tuple[Any, ...]


def vector_bytes(tables: KernelTables, src_addr: int, dst_addr: int) -> int:
    """The widest load/store (1..16 bytes) that every address of the copy is aligned to."""
    return math.gcd(tables.alignment, src_addr, dst_addr)


def launch_shape(tables: KernelTables, src_addr: int, dst_addr: int, max_ctas: int | None = None,
                 unroll: int = UNROLL) -> LaunchShape:
    """Kernel arguments for regions starting at ``src_addr``/``dst_addr`` (device pointers as ints).

    The vector width is the widest power of two (<= 16) dividing both addresses and ``tables.alignment``. Small
    boxes share a CTA: a group of threads (32..256, a power of two) copies one box, sized so each thread has about
    ``unroll`` vectors. ``max_ctas`` caps the grid (the groups then stride over boxes).
    """
    vector = vector_bytes(tables, src_addr, dst_addr)
    row_vectors = tables.row_nbytes // vector
    box_vectors = tables.max_segment_tokens * tables.row_heads * row_vectors
    group = 1 << max(0, -(-box_vectors // unroll) - 1).bit_length()
    group = min(THREADS_PER_CTA, max(32, group))
    groups_per_cta = THREADS_PER_CTA // group
    num_ctas = -(-tables.num_boxes // groups_per_cta)
    if max_ctas is not None:
        num_ctas = max(1, min(num_ctas, int(max_ctas)))
    row_mul, row_shr = fast_divisor(row_vectors)
    head_mul, head_shr = fast_divisor(tables.row_heads)
    i32, i64, u32 = np.int32, np.int64, np.uint32
    scalars = (i32(tables.num_segments), i32(tables.num_layer_parts), i32(tables.row_heads), i32(row_vectors),
               i64(tables.src_token_stride), i64(tables.src_head_stride), i64(tables.dst_token_stride),
               i64(tables.dst_head_stride), u32(row_mul), u32(row_shr), u32(head_mul), u32(head_shr),
               i32(group.bit_length() - 1))
    return LaunchShape(vector, num_ctas, src_addr + tables.src_base, dst_addr + tables.dst_base, scalars)


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
