"""The NumPy KV copy: the spec every GPU kernel is tested against, bit for bit.

Elements are moved as unsigned integers of the spec's element size, so any dtype (bf16, fp8, ...) is copied
exactly. Readable first: each side is viewed as a 6-D strided array over ``spec.AXES`` and one fancy-indexed
assignment moves every (layer, part, token, head) row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..devices import Array
from ..errors import ConfigError
from ..spec import KVCacheSpec
from .copy_plan import KVCopyPlan

if TYPE_CHECKING:
    import torch

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def host_bytes(array: Array, argument: str, *, writeable: bool = False) -> np.ndarray:
    """A uint8[nbytes] view of a C-contiguous host array (numpy, or a torch CPU tensor). No copy."""
    if type(array).__module__.startswith("torch"):
        if array.device.type != "cpu":
            raise ConfigError(f"{argument}: expected a host array, got a torch tensor on {array.device}")
        if not array.is_contiguous():
            raise ConfigError(f"{argument}: torch tensor of shape {tuple(array.shape)} must be contiguous")
        array = array.reshape(-1).view(_torch_uint8()).numpy()
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"{argument}: expected a numpy array or torch CPU tensor, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ConfigError(f"{argument}: array of shape {array.shape} must be C-contiguous")
    if writeable and not array.flags.writeable:
        raise ConfigError(f"{argument}: array is read-only")
    return array.reshape(-1).view(np.uint8)


def element_view(data: np.ndarray, spec: KVCacheSpec, argument: str, *, writeable: bool = False) -> np.ndarray:
    """``data`` (uint8[n], host) seen as ``spec``: a 6-D unsigned-int view over (layer, block, kv, head, token, dim)."""
    spec.check_fits(data.nbytes, argument=argument)
    itemsize = spec.itemsize
    usable = data[: data.nbytes - data.nbytes % itemsize]
    elements = usable.view(_UINT_OF_SIZE[itemsize])[spec.offset :]
    return np.lib.stride_tricks.as_strided(elements, shape=spec.shape, strides=spec.byte_strides, writeable=writeable)


def copy_kv(src: Array, dst: Array, plan: KVCopyPlan) -> None:
    """Run ``plan`` on host arrays: ``src`` laid out by ``plan.src_spec``, ``dst`` by ``plan.dst_spec``.

    ``src``/``dst``: whole C-contiguous host buffers (numpy arrays or torch CPU tensors of any dtype). Only the
    bytes the plan names in ``dst`` change.
    """
    source = element_view(host_bytes(src, "src"), plan.src_spec, "src")
    target = element_view(host_bytes(dst, "dst", writeable=True), plan.dst_spec, "dst", writeable=True)
    target[_row_index(plan, "dst")] = source[_row_index(plan, "src")]


def _row_index(plan: KVCopyPlan, side: str) -> tuple[np.ndarray, ...]:
    """Fancy index over (layer, block, kv, head, token) selecting rows shaped [layer, part, token, head]."""
    spec: KVCacheSpec = getattr(plan, f"{side}_spec")
    tokens = np.arange(plan.num_tokens, dtype=np.int64)
    blocks = getattr(plan, f"{side}_block_ids")[tokens // spec.block_size]
    slots = tokens % spec.block_size
    h0, h1 = getattr(plan, f"{side}_heads")
    layers = getattr(plan, f"{side}_layers")
    return (
        layers[:, None, None, None],
        blocks[None, None, :, None],
        plan.parts[None, :, None, None],
        np.arange(h0, h1, dtype=np.int64)[None, None, None, :],
        slots[None, None, :, None],
    )


def _torch_uint8() -> torch.dtype:
    import torch  # only reached with a torch tensor in hand, so torch is already imported

    return torch.uint8
