"""ranks: check_compatible refuses caches of another model's KV (either way round) and accepts what only lays
the same KV out differently; KVPipe and the connectors refuse before any byte moves."""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer
from kvxfer import KVCacheSpec, KVPipe, LayoutMismatchError
from kvxfer.pipe.ranks import check_compatible, rank_pairs, route_heads


def spec(**changes) -> KVCacheSpec:
    values = dict(
        num_layers=2,
        num_blocks=8,
        block_size=16,
        num_kv_heads=2,
        head_dim=4,
        dtype="float32",
        layout="HND",
        total_kv_heads=2,
        model="m",
    )
    values.update(changes)
    return KVCacheSpec(**values)


MISMATCHES = [
    (dict(num_kv_heads=4, total_kv_heads=4), "total_kv_heads=2.*total_kv_heads=4"),
    (dict(num_kv_heads=1, tp_size=2, total_kv_heads=2, num_kv_parts=1), "num_kv_parts=2.*num_kv_parts=1"),
    (dict(num_kv_parts=1), "num_kv_parts"),
    (dict(model="other"), "model='m'.*model='other'"),
    (dict(dtype="float16"), "dtype"),
    (dict(head_dim=8), "head_dim"),
    (dict(num_layers=3), "num_layers"),
    (dict(num_kv_heads=1, tp_size=3, total_kv_heads=3), "total_kv_heads"),
]


@pytest.mark.parametrize(
    "change, match",
    MISMATCHES,
    ids=["heads", "parts-tp2", "parts", "model", "dtype", "head_dim", "layers", "heads-tp3"],
)
def test_check_compatible_refuses_another_models_kv(change, match):
    local, remote = spec(), spec(**change)
    with pytest.raises(LayoutMismatchError, match=match):
        check_compatible(local, remote)
    with pytest.raises(LayoutMismatchError, match=match.split(".*")[0].split("=")[0]):
        check_compatible(remote, local)  # either side notices


def test_total_kv_heads_differ_although_each_rank_holds_as_many():
    """Two ranks of 2 heads each: TP 1 of a 2-head model, TP 2 of a 4-head model. The local shapes agree."""
    local, remote = spec(), spec(tp_size=2, tp_rank=1, total_kv_heads=4)
    assert local.num_kv_heads == remote.num_kv_heads
    with pytest.raises(LayoutMismatchError, match="total_kv_heads"):
        check_compatible(local, remote)
    with pytest.raises(LayoutMismatchError, match="total_kv_heads"):
        route_heads(local, [spec(tp_size=2, tp_rank=r, total_kv_heads=4) for r in range(2)])


def test_tp_sizes_must_divide_one_another():
    local = spec(num_kv_heads=3, total_kv_heads=6, tp_size=2)
    remote = spec(num_kv_heads=2, total_kv_heads=6, tp_size=3)
    with pytest.raises(LayoutMismatchError, match="TP sizes must divide"):
        check_compatible(local, remote)
    with pytest.raises(LayoutMismatchError, match="TP sizes must divide"):
        rank_pairs(2, 3, 6)


@pytest.mark.parametrize(
    "change",
    [
        dict(layout="NHD"),
        dict(block_size=4),
        dict(num_blocks=3),
        dict(num_kv_heads=1, tp_size=2, tp_rank=1),
        dict(model=""),
        dict(num_kv_heads=1, tp_size=4, tp_rank=3),
    ],
    ids=["layout", "block_size", "num_blocks", "tp2", "unnamed", "replicated"],
)
def test_check_compatible_accepts_the_same_kv_laid_out_otherwise(change):
    local, remote = spec(), spec(**change)
    check_compatible(local, remote)
    check_compatible(remote, local)


def _agents_with_caches(local_spec, remote_spec):
    decode, prefill = kvxfer.Agent("d-ranks", backends=["local"]), kvxfer.Agent("p-ranks", backends=["local"])
    d_cache = np.full(local_spec.tensor_shape, -7.0, np.float32)
    p_cache = np.ones(remote_spec.tensor_shape, np.float32)
    decode.register(d_cache, name="kv")
    prefill.register(p_cache, name="kv")
    peer = decode.connect(prefill.metadata())
    return decode, prefill, peer, d_cache, p_cache


@pytest.mark.parametrize(
    "change, match",
    [(dict(num_kv_heads=4, total_kv_heads=4), "total_kv_heads"), (dict(num_kv_parts=1), "num_kv_parts")],
    ids=["heads", "parts"],
)
def test_pipe_refuses_mismatched_kv_before_any_byte_moves(change, match):
    local, remote = spec(), spec(**change)
    decode, prefill, peer, d_cache, p_cache = _agents_with_caches(local, remote)
    try:
        with pytest.raises(LayoutMismatchError, match=match):
            KVPipe(decode, local, peer, [remote])
        assert (d_cache == -7).all() and (p_cache == 1).all()
        pipe = KVPipe(decode, local, peer, [spec(layout="NHD", block_size=8)])  # the control: this one connects
        pipe.close()
    finally:
        decode.close()
        prefill.close()
