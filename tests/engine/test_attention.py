"""Paged attention equals dense causal attention (torch SDPA) for both layouts and block sizes 1 and 16."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from kvxfer.engine import AttentionBatch, KVCache, causal_attention, paged_attention
from kvxfer.spec import KVCacheSpec

pytestmark = pytest.mark.timeout(60)

HEADS, KV_HEADS, DIM, LENGTHS = 4, 2, 8, (1, 5, 16, 17, 40)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over one whole sequence: q [t, H, D], k/v [t, Hkv, D] -> [t, H, D]."""
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1),
        is_causal=True,
    )
    return out.transpose(0, 1)


@pytest.fixture(params=[("NHD", 1), ("NHD", 16), ("HND", 1), ("HND", 16)], ids=lambda p: f"{p[0]}-bs{p[1]}")
def filled(request: pytest.FixtureRequest) -> tuple:
    """A cache holding every sequence's K/V in shuffled blocks, plus the per-sequence tensors and tables."""
    layout, block_size = request.param
    generator = torch.Generator().manual_seed(7)
    needed = [-(-n // block_size) for n in LENGTHS]
    spec = KVCacheSpec(
        num_layers=2,
        num_blocks=sum(needed) + 3,
        block_size=block_size,
        num_kv_heads=KV_HEADS,
        head_dim=DIM,
        dtype="float32",
        layout=layout,
    )
    cache = KVCache(spec)
    order = torch.randperm(spec.num_blocks, generator=generator).tolist()
    tables, seqs = [], []
    for n, count in zip(LENGTHS, needed, strict=True):
        table, order = order[:count], order[count:]
        q, k, v = (torch.randn(n, h, DIM, generator=generator) for h in (HEADS, KV_HEADS, KV_HEADS))
        slots = torch.tensor([table[t // block_size] * block_size + t % block_size for t in range(n)])
        cache.write(1, slots, k, v)
        tables.append(table)
        seqs.append((q, k, v))
    return cache, tables, seqs


def _run(cache: KVCache, tables: list[list[int]], seqs: list[tuple], query_lens: list[int]) -> list[torch.Tensor]:
    batch = AttentionBatch.build(tables, query_lens, list(LENGTHS), cache.block_size, torch.device("cpu"))
    q = torch.cat([s[0][-n:] for s, n in zip(seqs, query_lens, strict=True)])
    keys, values = cache.layer(1)
    out = paged_attention(q, keys, values, batch, DIM**-0.5)
    return list(out.split(query_lens))


def test_prefill_whole_prompts(filled: tuple) -> None:
    cache, tables, seqs = filled
    for out, (q, k, v) in zip(_run(cache, tables, seqs, list(LENGTHS)), seqs, strict=True):
        torch.testing.assert_close(out, _reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_chunked_prefill_attends_to_cached_prefix(filled: tuple) -> None:
    cache, tables, seqs = filled
    chunks = [min(n, 7) for n in LENGTHS]
    for out, (q, k, v), c in zip(_run(cache, tables, seqs, chunks), seqs, chunks, strict=True):
        torch.testing.assert_close(out, _reference(q, k, v)[-c:], rtol=1e-5, atol=1e-5)


def test_batched_decode_over_different_lengths(filled: tuple) -> None:
    cache, tables, seqs = filled
    batch_lens = [1] * len(LENGTHS)
    assert AttentionBatch.build(tables, batch_lens, list(LENGTHS), cache.block_size, torch.device("cpu")).is_decode
    for out, (q, k, v) in zip(_run(cache, tables, seqs, batch_lens), seqs, strict=True):
        torch.testing.assert_close(out, _reference(q, k, v)[-1:], rtol=1e-5, atol=1e-5)


def test_dense_causal_attention_matches_sdpa() -> None:
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(9, h, DIM, generator=generator) for h in (HEADS, KV_HEADS, KV_HEADS))
    torch.testing.assert_close(causal_attention(q, k, v, DIM**-0.5), _reference(q, k, v), rtol=1e-5, atol=1e-5)
    tail = causal_attention(q[-3:], k, v, DIM**-0.5, num_past=6)
    torch.testing.assert_close(tail, _reference(q, k, v)[-3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("waste", [1e9, -1e9], ids=["padded-grid", "one-by-one"])
def test_mixed_decode_and_prefill_batch(filled: tuple, monkeypatch: pytest.MonkeyPatch, waste: float) -> None:
    """One batch mixing one-token sequences with chunks of others, on the padded grid or sequence by sequence."""
    from kvxfer.engine import attention

    monkeypatch.setattr(attention, "PADDED_PREFILL_WASTE", waste)
    cache, tables, seqs = filled
    chunks = [1, 3, 1, 16, 9]
    batch = AttentionBatch.build(tables, chunks, list(LENGTHS), cache.block_size, torch.device("cpu"))
    assert (batch.prefill is not None) == (waste > 0) and batch.decode_rows is not None
    assert batch.decode_rows.tolist() == [0, 4]
    for out, (q, k, v), c in zip(_run(cache, tables, seqs, chunks), seqs, chunks, strict=True):
        torch.testing.assert_close(out, _reference(q, k, v)[-c:], rtol=1e-5, atol=1e-5)
