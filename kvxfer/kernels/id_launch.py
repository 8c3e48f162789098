"""Launching csrc/id_copy.cu: once per pair of regions an :class:`IdLaunch` (entry, header, grid cap); per request
one buffer of ids copied from a pinned ring slot and one launch (no table planning, no event created).

Needs cupy at call time only (through ``_cuda.cupy_module``, which the tests replace with a host emulation).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import _cuda
from .id_copy import HEADER_LEN, MAX_COUNT, IdCopyForm, fill_buffer
from .launch import DEFAULT_TUNING
from .table_ring import Completion, TableRing, table_ring

_CSRC = Path(__file__).with_name("csrc")


@dataclass(frozen=True)
class IdLaunch:
    """How requests of one :class:`IdCopyForm` between two regions launch: ``entry`` with ``vector``-byte loads,
    CTAs of ``threads`` threads in groups of ``groups_per_cta``, at most ``max_ctas`` CTAs (groups stride over the
    rest), base pointers ``src_addr``/``dst_addr`` (region start + base) and the request-independent ``header``."""

    form: IdCopyForm
    entry: str
    vector: int
    threads: int
    groups_per_cta: int
    max_ctas: int
    src_addr: int
    dst_addr: int
    header: np.ndarray
    #: resolved by :func:`prepare` (else looked up per call): the compiled entry, the pointer arguments, the
    #: device's ring of upload slots
    function: Any = field(default=None, compare=False)
    pointers: tuple[np.uint64, np.uint64] = field(default=(np.uint64(0), np.uint64(0)), compare=False)
    ring: TableRing | None = field(default=None, compare=False)

    def fits(self, num_tokens: int, num_layers: int) -> bool:
        """True when a request of ``num_tokens`` tokens and ``num_layers`` layers stays within the kernel's 32-bit
        counts (else the table path, which checks its own limits, takes it)."""
        form = self.form
        boxes = -(-num_tokens // form.small) * form.pieces * num_layers * form.src_spec.num_kv_parts
        return 0 <= num_tokens and num_tokens + form.small <= MAX_COUNT and boxes <= MAX_COUNT

    def num_ctas(self, num_boxes: int) -> int:
        """CTAs of a launch over ``num_boxes`` boxes."""
        return max(1, min(-(-num_boxes // self.groups_per_cta), self.max_ctas))


def id_launch(form: IdCopyForm, src_ptr: int, dst_ptr: int, max_ctas: int) -> IdLaunch:
    """The launch of ``form`` between regions starting at ``src_ptr``/``dst_ptr`` (pure: no GPU needed)."""
    vector = math.gcd(form.alignment, src_ptr, dst_ptr)
    threads, unroll = DEFAULT_TUNING.threads, DEFAULT_TUNING.unroll
    group = form.group_threads(vector, threads, unroll)
    body = "run" if form.full.contiguous else "rows"
    wide = "" if form.narrow else "wide_"
    return IdLaunch(
        form,
        f"kvxfer_ids_{body}_{wide}v{vector}",
        vector,
        threads,
        threads // group,
        max(1, max_ctas),
        src_ptr + form.src_base,
        dst_ptr + form.dst_base,
        form.header(vector, group),
    )


def prepare(form: IdCopyForm, src_ptr: int, dst_ptr: int, device: int) -> IdLaunch:
    """:func:`id_launch` on ``device`` (compiles the kernel once), with the table path's grids: one group per box
    for run entries (boxes contiguous on both sides), one wave of resident CTAs striding over boxes for rows
    entries (launch.DEFAULT_TUNING and RUN_TUNING say why)."""
    shape = id_launch(form, src_ptr, dst_ptr, 2**31 - 1)
    function = kernel(shape.entry, device)
    cap = 2**31 - 1
    if not form.full.contiguous:
        cap = _cuda.resident_ctas_of(int(function.num_regs), device, DEFAULT_TUNING.threads)
    launch = id_launch(form, src_ptr, dst_ptr, cap)
    pointers = (np.uint64(launch.src_addr), np.uint64(launch.dst_addr))
    return replace(launch, function=function, pointers=pointers, ring=table_ring(device))


@functools.cache
def _module(device: int) -> Any:
    cupy = _cuda.cupy_module()
    code = (_CSRC / "kv_copy.cu").read_text() + "\n" + (_CSRC / "id_copy.cu").read_text()
    with cupy.cuda.Device(device):
        return cupy.RawModule(code=code, options=("--std=c++17", *DEFAULT_TUNING.defines()))


@functools.cache
def kernel(entry: str, device: int) -> Any:
    """The compiled ``entry`` of csrc/id_copy.cu on ``device``."""
    cupy = _cuda.cupy_module()
    with cupy.cuda.Device(device):
        return _module(device).get_function(entry)


def clear_caches() -> None:
    """Forget compiled modules (tests swap cupy stand-ins)."""
    _module.cache_clear()
    kernel.cache_clear()


class Finished:
    """The completion of a request with nothing to copy."""

    done = True

    def synchronize(self) -> None:
        """Nothing to wait for."""


FINISHED = Finished()


def launch_ids(
    launch: IdLaunch,
    src_ids: np.ndarray,
    dst_ids: np.ndarray,
    src_layers: np.ndarray,
    dst_layers: np.ndarray,
    num_tokens: int,
    *,
    device: int,
    stream: Any,
) -> Completion | Finished:
    """Copy tokens ``[0, num_tokens)`` of blocks ``src_ids`` into ``dst_ids`` (int64 arrays, host, checked by the
    caller: in range, as many as the tokens need, destinations unique), layers ``src_layers`` -> ``dst_layers``
    (int64[k], host), every K/V part; one launch on ``stream`` (a cupy stream; the current device must be
    ``device``). Returns what says when the copy is done. ConfigError when :meth:`IdLaunch.fits` is False."""
    form = launch.form
    num_segments = -(-num_tokens // form.small) * form.pieces
    num_boxes = num_segments * len(src_layers) * form.src_spec.num_kv_parts
    if num_tokens < 0 or num_tokens + form.small > MAX_COUNT or num_boxes > MAX_COUNT:  # IdLaunch.fits, inlined
        raise ConfigError(f"a KV copy of {num_tokens} tokens and {len(src_layers)} layers is too large for one launch")
    if num_boxes == 0:
        return FINISHED
    function = launch.function if launch.function is not None else kernel(launch.entry, device)
    grid, block = (max(1, min(-(-num_boxes // launch.groups_per_cta), launch.max_ctas)),), (launch.threads,)
    pointers = (
        launch.pointers if launch.function is not None else (np.uint64(launch.src_addr), np.uint64(launch.dst_addr))
    )

    def fill(host: np.ndarray) -> None:
        fill_buffer(host, launch.header, num_segments, src_ids, dst_ids, src_layers, dst_layers, num_tokens)

    def run(buffer: Any) -> None:
        function(grid, block, (*pointers, buffer), stream=stream)

    entries = HEADER_LEN + len(src_ids) + len(dst_ids) + 2 * len(src_layers)
    ring = launch.ring if launch.ring is not None else table_ring(device)
    completion = ring.launch_with(_cuda.cupy_module(), entries, fill, run, stream, lambda: stream, completion=True)
    assert completion is not None  # asked for
    return completion
