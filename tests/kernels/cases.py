"""Random KV copy cases and a naive per-element copy: shared by the kernel tests (CPU, host emulation, GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvxfer.kernels import KVCopyPlan, plan_kv_copy
from kvxfer.spec import KVCacheSpec

#: A dtype name per element size.
DTYPE_OF_SIZE = {1: "float8_e4m3fn", 2: "bfloat16", 4: "float32", 8: "float64"}


def random_spec(
    rng: np.random.Generator,
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    itemsize: int,
    num_kv_parts: int = 2,
    layout: str | None = None,
    padded: bool | None = None,
    offset: int | None = None,
    total_kv_heads: int | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> KVCacheSpec:
    """A spec in NHD, HND, or (``padded``) explicit strides: a random order of the outer axes, random padding."""
    layout = layout or str(rng.choice(["NHD", "HND"]))
    padded = bool(rng.integers(0, 2)) if padded is None else padded
    offset = int(rng.integers(0, 4)) if offset is None else offset
    fields = dict(
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=DTYPE_OF_SIZE[itemsize],
        layout=layout,
        num_kv_parts=num_kv_parts,
        offset=offset,
        total_kv_heads=total_kv_heads,
        tp_size=tp_size,
        tp_rank=tp_rank,
    )
    if not padded:
        return KVCacheSpec(**fields)
    sizes = {"layer": num_layers, "block": num_blocks, "kv": num_kv_parts, "head": num_kv_heads, "token": block_size}
    order = list(rng.permutation(list(sizes)))  # innermost first, all outside head_dim
    strides, reach = {}, head_dim
    for axis in order:
        strides[axis] = reach + int(rng.integers(0, 3))
        reach = strides[axis] * sizes[axis]
    fields["strides"] = (*(strides[a] for a in ("layer", "block", "kv", "head", "token")), 1)
    return KVCacheSpec(**fields)


@dataclass
class Case:
    """A plan plus host buffers: ``src`` random, ``dst`` random too (poison: unwritten bytes must stay)."""

    plan: KVCopyPlan
    src: np.ndarray
    dst: np.ndarray


def random_case(
    rng: np.random.Generator,
    *,
    src_spec: KVCacheSpec,
    dst_spec: KVCacheSpec,
    num_tokens: int,
    num_heads: int | None = None,
    layer_subset: bool = True,
    part_subset: bool = True,
    slack: int = 8,
) -> Case:
    """Random non-contiguous block ids, layers, parts and head ranges for ``num_tokens`` tokens."""
    n_src = -(-num_tokens // src_spec.block_size)
    n_dst = -(-num_tokens // dst_spec.block_size)
    src_ids = rng.integers(0, src_spec.num_blocks, size=n_src)  # repeats allowed on the read side
    dst_ids = rng.permutation(dst_spec.num_blocks)[:n_dst]
    layers = src_spec.num_layers
    count = int(rng.integers(1, layers + 1)) if layer_subset else layers
    src_layers = rng.permutation(layers)[:count]
    dst_layers = rng.permutation(dst_spec.num_layers)[:count]
    parts = (
        rng.permutation(src_spec.num_kv_parts)[: int(rng.integers(1, src_spec.num_kv_parts + 1))]
        if part_subset
        else None
    )
    heads = num_heads or int(rng.integers(1, min(src_spec.num_kv_heads, dst_spec.num_kv_heads) + 1))
    h0 = int(rng.integers(0, src_spec.num_kv_heads - heads + 1))
    g0 = int(rng.integers(0, dst_spec.num_kv_heads - heads + 1))
    plan = plan_kv_copy(
        src_spec,
        dst_spec,
        src_ids,
        dst_ids,
        num_tokens=num_tokens,
        src_layers=src_layers,
        dst_layers=dst_layers,
        src_heads=(h0, h0 + heads),
        dst_heads=(g0, g0 + heads),
        parts=parts,
    )
    src = random_bytes(rng, src_spec.nbytes + int(rng.integers(0, slack)))
    dst = random_bytes(rng, dst_spec.nbytes + int(rng.integers(0, slack)))
    return Case(plan, src, dst)


def random_bytes(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    """uint8[nbytes], host, random."""
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8)


def naive_copy(src: np.ndarray, dst: np.ndarray, plan: KVCopyPlan) -> None:
    """The copy, one element at a time, straight from the plan's definition (slow: small cases only)."""
    s, d = plan.src_spec, plan.dst_spec
    size = s.itemsize
    for layer_s, layer_d in zip(plan.src_layers, plan.dst_layers, strict=True):
        for part in plan.parts:
            for token in range(plan.num_tokens):
                block_s, slot_s = plan.src_block_ids[token // s.block_size], token % s.block_size
                block_d, slot_d = plan.dst_block_ids[token // d.block_size], token % d.block_size
                for head in range(plan.num_heads):
                    for dim in range(s.head_dim):
                        a = _element(s, layer_s, block_s, part, plan.src_heads[0] + head, slot_s, dim) * size
                        b = _element(d, layer_d, block_d, part, plan.dst_heads[0] + head, slot_d, dim) * size
                        dst[b : b + size] = src[a : a + size]


def _element(spec: KVCacheSpec, *index: int) -> int:
    return spec.offset + sum(int(i) * st for i, st in zip(index, spec.element_strides, strict=True))
