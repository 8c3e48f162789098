"""Per-block checksums of KV that mean the same on both sides of a transfer, whatever the layouts.

The unit is (token chunk, model head): tokens ``[u * unit_tokens, (u + 1) * unit_tokens)`` of the sequence and one
global KV head, over every layer and part, hashed (CRC-32) in a canonical order [layer, part, token, dim]. A sender
hashes its own blocks (unit = its block size) and heads; a receiver with another block size, layout or TP slice
hashes the same units of the heads it holds and compares.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from ..errors import HandshakeError, TransferError
from ..memory import MemoryKind, Region
from ..spec import BlockIds, KVCacheSpec, KVLayout, Selection

if TYPE_CHECKING:
    from ..kernels import KVCopyPlan


@dataclass(frozen=True)
class Checksums:
    """CRC-32 of each (token chunk, head): ``values`` uint32[units, heads], host; heads start at global head
    ``first_head``; ``unit_tokens`` tokens per chunk; ``num_tokens`` tokens in all."""

    values: np.ndarray
    unit_tokens: int
    first_head: int
    num_tokens: int

    def encode(self) -> bytes:
        """msgpack bytes, to hand to the receiving process."""
        data: bytes = msgpack.packb(
            [
                self.unit_tokens,
                self.first_head,
                self.num_tokens,
                list(self.values.shape),
                self.values.astype("<u4").tobytes(),
            ],
            use_bin_type=True,
        )
        return data

    @classmethod
    def decode(cls, data: bytes) -> Checksums:
        """Inverse of :meth:`encode`; HandshakeError for anything else."""
        try:
            unit, first, tokens, shape, raw = msgpack.unpackb(data, raw=False)
            values = np.frombuffer(raw, dtype="<u4").reshape(shape).astype(np.uint32)
            return cls(values, int(unit), int(first), int(tokens))
        except (TypeError, ValueError, msgpack.UnpackException) as error:
            raise HandshakeError(f"checksums are malformed: {error}") from None


def compute(
    region: Region,
    spec: KVCacheSpec,
    block_ids: BlockIds,
    *,
    num_tokens: int | None = None,
    unit_tokens: int | None = None,
    heads: tuple[int, int] | None = None,
    layers: Selection = None,
) -> Checksums:
    """Checksums of ``num_tokens`` tokens in blocks ``block_ids`` (int[n], host) of the cache in ``region``.

    ``heads``: local head range (default all); ``unit_tokens`` defaults to the spec's block size.
    """
    from .. import kernels  # lazy: `import kvxfer` loads no kernel planner

    ids = np.asarray(block_ids, dtype=np.int64)
    tokens = len(ids) * spec.block_size if num_tokens is None else int(num_tokens)
    unit = spec.block_size if unit_tokens is None else int(unit_tokens)
    h0, h1 = (0, spec.num_kv_heads) if heads is None else heads
    layer_ids = np.arange(spec.num_layers) if layers is None else np.asarray(layers, dtype=np.int64)
    stage = kernels.staging_spec(spec, tokens, num_layers=len(layer_ids), heads=(h0, h1), layout=KVLayout.NHD)
    plan = kernels.plan_kv_copy(
        spec,
        stage,
        ids,
        [0],
        num_tokens=tokens,
        src_layers=layer_ids,
        dst_layers=np.arange(len(layer_ids)),
        src_heads=(h0, h1),
    )
    canonical = _gather_to_host(region, stage, plan)
    # [layer, part, token, head, dim] -> [unit, head, layer, part, token-in-unit, dim], tokens padded with zeros
    shape = (len(layer_ids), spec.num_kv_parts, tokens, h1 - h0, spec.head_dim * spec.itemsize)
    data = canonical.reshape(shape)
    units = -(-tokens // unit)
    padded = np.zeros((shape[0], shape[1], units * unit, shape[3], shape[4]), dtype=np.uint8)
    padded[:, :, :tokens] = data
    blocks = padded.reshape(shape[0], shape[1], units, unit, shape[3], shape[4]).transpose(2, 4, 0, 1, 3, 5)
    rows = np.ascontiguousarray(blocks).reshape(units * shape[3], -1)
    values = np.fromiter((zlib.crc32(row.data) for row in rows), dtype=np.uint32, count=len(rows))
    return Checksums(values.reshape(units, shape[3]), unit, spec.head_range()[0] + h0, tokens)


def verify(expected: Checksums, actual: Checksums, who: str) -> None:
    """TransferError naming the first (chunk, head) whose checksum differs."""
    offset = actual.first_head - expected.first_head
    heads = actual.values.shape[1]
    if (
        expected.unit_tokens != actual.unit_tokens
        or offset < 0
        or offset + heads > expected.values.shape[1]
        or expected.values.shape[0] != actual.values.shape[0]
    ):
        raise TransferError(
            f"checksums from {who} do not cover what arrived (units {expected.values.shape}, "
            f"heads from {expected.first_head}; got {actual.values.shape} from {actual.first_head})"
        )
    mismatch = np.argwhere(expected.values[:, offset : offset + heads] != actual.values)
    if len(mismatch):
        unit, head = (int(x) for x in mismatch[0])
        raise TransferError(
            f"checksum mismatch for data from {who}: tokens [{unit * actual.unit_tokens}, "
            f"{(unit + 1) * actual.unit_tokens}) of head {actual.first_head + head} "
            f"({len(mismatch)} chunk-heads differ)"
        )


def _gather_to_host(region: Region, stage: KVCacheSpec, plan: KVCopyPlan) -> np.ndarray:
    from .. import kernels  # lazy: `import kvxfer` loads no kernel planner

    if region.kind is MemoryKind.HOST:
        out = np.empty(stage.nbytes, dtype=np.uint8)
        kernels.copy_kv(region.as_numpy(), out, plan)
        return out
    from ..devices import cupy_module

    cupy = cupy_module()
    with cupy.cuda.Device(region.device):
        out = cupy.empty(stage.nbytes, dtype=cupy.uint8)
        kernels.copy_kv_pointers(
            region.addr,
            region.nbytes,
            out.data.ptr,
            out.nbytes,
            plan,
            device=region.device,
            stream=cupy.cuda.get_current_stream(),
        )
        host: np.ndarray = cupy.asnumpy(out)
        return host
