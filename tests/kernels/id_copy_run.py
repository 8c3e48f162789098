"""Run one launch of csrc/id_copy.cu in the host emulation, for a table-path plan's request (shared by the kernel
and pipe tests)."""

from __future__ import annotations

import ctypes

import numpy as np

from kvxfer.kernels import KVCopyPlan
from kvxfer.kernels.id_copy import buffer_entries, fill_buffer
from kvxfer.kernels.id_launch import IdLaunch
from tests.kernels import emulator as emulation


def run_emulated(lib: ctypes.CDLL, launch: IdLaunch, plan: KVCopyPlan, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy ``plan``'s request from ``src`` to ``dst`` (uint8 host buffers) by ``launch``; asserts no access left
    its buffer or was misaligned."""
    form = launch.form
    num_segments = form.num_segments(plan.num_tokens)
    buffer = np.zeros(buffer_entries(len(plan.src_block_ids), len(plan.dst_block_ids), len(plan.src_layers)), np.int64)
    fill_buffer(
        buffer,
        launch.header,
        num_segments,
        plan.src_block_ids,
        plan.dst_block_ids,
        plan.src_layers,
        plan.dst_layers,
        plan.num_tokens,
    )
    boxes = num_segments * len(plan.src_layers) * form.src_spec.num_kv_parts
    violations = emulation.launch_ids(
        lib,
        launch.entry,
        launch.num_ctas(boxes),
        launch.threads,
        launch.src_addr,
        launch.dst_addr,
        (src.ctypes.data, src.ctypes.data + src.nbytes),
        (dst.ctypes.data, dst.ctypes.data + dst.nbytes),
        buffer.ctypes.data,
    )
    assert violations == 0, "out-of-bounds or misaligned accesses"
