"""Attention in plain torch: paged (prefill, chunked prefill, batched decode) and dense (the no-cache reference).

Queries hold ``num_heads`` heads, keys/values ``num_kv_heads``; each KV head serves ``num_heads // num_kv_heads``
consecutive query heads (grouped-query attention). Scores and softmax are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    """Where the new tokens of a batch of sequences sit in the paged KV cache.

    Sequence ``i`` contributes ``query_lens[i]`` new tokens, the last ones of its ``context_lens[i]`` tokens (the
    earlier ones are already in the cache). Tokens are concatenated in sequence order.

    ``slots``: int64[num_tokens], device: cache slot (block * block_size + offset) of each new token.
    ``block_tables``: int64[num_seqs, max_blocks], device: each sequence's block ids, padded with 0.
    ``context_lens_tensor``: int64[num_seqs], device.
    """

    slots: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    context_lens_tensor: torch.Tensor

    @property
    def is_decode(self) -> bool:
        """True when every sequence adds exactly one token (the batched decode path applies)."""
        return all(n == 1 for n in self.query_lens)

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        query_lens: list[int],
        context_lens: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        """Compute slots and padded tables from per-sequence block id lists (host ints)."""
        slots: list[int] = []
        for blocks, query_len, context_len in zip(block_tables, query_lens, context_lens, strict=True):
            positions = range(context_len - query_len, context_len)
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in positions)
        width = max(len(blocks) for blocks in block_tables)
        padded = [blocks + [0] * (width - len(blocks)) for blocks in block_tables]
        return cls(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int64, device=device),
        )


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., num_heads, D] -> [..., num_kv_heads, group, D]."""
    return q.unflatten(-2, (num_kv_heads, q.shape[-2] // num_kv_heads))


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_past: int = 0
) -> torch.Tensor:
    """Attention of ``n`` queries at positions ``num_past .. num_past+n-1`` over keys ``0 .. t-1``, causally.

    q: [n, num_heads, D]; k, v: [t, num_kv_heads, D] with ``t = num_past + n``; any float dtype, one device.
    Returns [n, num_heads, D] in q's dtype.
    """
    n, t = q.shape[0], k.shape[0]
    scores = torch.einsum("nhgd,thd->hgnt", _grouped(q, k.shape[1]).float(), k.float()) * scale
    query_pos = torch.arange(num_past, num_past + n, device=q.device)[:, None]
    future = torch.arange(t, device=q.device)[None, :] > query_pos
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    out = torch.einsum("hgnt,thd->nhgd", probs, v.float())
    return out.flatten(1, 2).to(q.dtype)


def paged_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """Attention of a batch's new tokens over their sequences' cached tokens (the new tokens already written).

    q: [num_tokens, num_heads, D]. keys, values: [num_blocks, block_size, num_kv_heads, D] views of one layer of
    the cache (see :meth:`KVCache.layer`). Returns [num_tokens, num_heads, D].
    """
    if batch.is_decode:
        return _decode_attention(q, keys, values, batch, scale)
    outputs, start = [], 0
    for index, (query_len, context_len) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True)):
        num_blocks = -(-context_len // keys.shape[1])
        blocks = batch.block_tables[index, :num_blocks]
        k = keys[blocks].flatten(0, 1)[:context_len]
        v = values[blocks].flatten(0, 1)[:context_len]
        outputs.append(causal_attention(q[start : start + query_len], k, v, scale, context_len - query_len))
        start += query_len
    return torch.cat(outputs)


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """One query per sequence, sequences of different lengths: gather padded tables, mask past each length."""
    k = keys[batch.block_tables].flatten(1, 2)  # [b, max_blocks * block_size, kv_heads, D]
    v = values[batch.block_tables].flatten(1, 2)
    scores = torch.einsum("bhgd,bthd->bhgt", _grouped(q, k.shape[2]).float(), k.float()) * scale
    beyond = torch.arange(k.shape[1], device=q.device)[None, :] >= batch.context_lens_tensor[:, None]
    probs = scores.masked_fill(beyond[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v.float())
    return out.flatten(1, 2).to(q.dtype)
