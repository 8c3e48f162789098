"""Attention in plain torch: paged (prefill, chunked prefill, batched decode) and dense (the no-cache reference).

Queries hold ``num_heads`` heads, keys/values ``num_kv_heads``; each KV head serves ``num_heads // num_kv_heads``
consecutive query heads (grouped-query attention). Scores and softmax are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Padded batched prefill runs while its padded score matrix is at most this many times the exact one (plus a
#: constant for tiny batches); beyond that (one long prompt beside short ones) sequences run one by one.
PADDED_PREFILL_WASTE = 2.0
_PADDED_PREFILL_SLACK = 4096


@dataclass
class PrefillLayout:
    """The sequences of a batch adding several tokens, laid out as a padded [num_seqs, max_query_len] grid.

    ``rows``: int64[n], device: rows of the batch's tokens that belong to these sequences (in order).
    ``grid_rows``: int64[s, max_query_len], device: token row of each grid cell (padding repeats a valid row).
    ``grid_positions``: int64[s, max_query_len], device: position of each cell's query in its sequence (padding
    continues past the context length, so its keys stay those of the sequence: no empty softmax row).
    ``grid_index``: int64[n], device: flat grid cell of each of ``rows``.
    ``block_tables``: int64[s, w], device; ``context_lens``: int64[s], device.
    """

    rows: torch.Tensor
    grid_rows: torch.Tensor
    grid_positions: torch.Tensor
    grid_index: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor


@dataclass
class AttentionBatch:
    """Where the new tokens of a batch of sequences sit in the paged KV cache.

    Sequence ``i`` contributes ``query_lens[i]`` new tokens, the last ones of its ``context_lens[i]`` tokens (the
    earlier ones are already in the cache). Tokens are concatenated in sequence order.

    ``slots``: int64[num_tokens], device: cache slot (block * block_size + offset) of each new token.
    ``block_tables``: int64[num_seqs, max_blocks], device: each sequence's block ids, padded with 0.
    ``context_lens_tensor``: int64[num_seqs], device.
    ``write_rows``: None, or int64[num_tokens], device: token ``write_rows[j]``'s K/V goes to ``slots[j]`` (a batch
    padded to a fixed size points its padding rows at a real row's slot and K/V, so the duplicate writes are
    identical and the padding never touches another slot).
    ``decode_rows`` / ``prefill``: for a batch mixing one-token and longer sequences, the one-token sequences'
    rows (int64[d], device; their tables and lengths in ``decode_tables`` / ``decode_lens``) and the padded layout
    of the others (None: they run one by one, see :data:`PADDED_PREFILL_WASTE`).
    """

    slots: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    context_lens_tensor: torch.Tensor
    write_rows: torch.Tensor | None = None
    decode_rows: torch.Tensor | None = None
    decode_tables: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    prefill: PrefillLayout | None = None

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
        batch = cls(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=_padded_tables(block_tables, device),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int64, device=device),
        )
        if not batch.is_decode:
            batch._split(block_tables, block_size, device)
        return batch

    def _split(self, block_tables: list[list[int]], block_size: int, device: torch.device) -> None:
        """Index the decode rows and lay the longer sequences out on a padded grid."""
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        single = [i for i, n in enumerate(self.query_lens) if n == 1]
        multi = [i for i, n in enumerate(self.query_lens) if n > 1]
        if single:
            self.decode_rows = torch.tensor([starts[i] for i in single], dtype=torch.int64, device=device)
            self.decode_tables = _padded_tables([block_tables[i] for i in single], device)
            self.decode_lens = torch.tensor([self.context_lens[i] for i in single], dtype=torch.int64, device=device)
        width = max(self.query_lens[i] for i in multi)
        longest = max(self.context_lens[i] for i in multi)
        exact = sum(self.query_lens[i] * self.context_lens[i] for i in multi)
        if len(multi) * width * longest > PADDED_PREFILL_WASTE * exact + _PADDED_PREFILL_SLACK:
            return
        grid_rows: list[list[int]] = []
        grid_positions: list[list[int]] = []
        grid_index: list[int] = []
        rows: list[int] = []
        for cell, i in enumerate(multi):
            n, first = self.query_lens[i], self.context_lens[i] - self.query_lens[i]
            grid_rows.append([starts[i] + min(j, n - 1) for j in range(width)])
            grid_positions.append(list(range(first, first + width)))
            grid_index.extend(range(cell * width, cell * width + n))
            rows.extend(range(starts[i], starts[i] + n))
        blocks = -(-longest // block_size)
        self.prefill = PrefillLayout(
            rows=torch.tensor(rows, dtype=torch.int64, device=device),
            grid_rows=torch.tensor(grid_rows, dtype=torch.int64, device=device),
            grid_positions=torch.tensor(grid_positions, dtype=torch.int64, device=device),
            grid_index=torch.tensor(grid_index, dtype=torch.int64, device=device),
            block_tables=_padded_tables([block_tables[i][:blocks] for i in multi], device),
            context_lens=torch.tensor([self.context_lens[i] for i in multi], dtype=torch.int64, device=device),
        )


def _padded_tables(block_tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """int64[len(block_tables), longest], device: the tables padded with block 0."""
    width = max(len(blocks) for blocks in block_tables)
    return torch.tensor(
        [blocks + [0] * (width - len(blocks)) for blocks in block_tables], dtype=torch.int64, device=device
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
    the cache (see :meth:`KVCache.layer`). Returns [num_tokens, num_heads, D]. An all-decode batch runs without
    host synchronization and with shapes fixed by its tensors (what a CUDA graph capture needs).
    """
    if batch.is_decode:
        return decode_attention(q, keys, values, batch.block_tables, batch.context_lens_tensor, scale)
    out = torch.empty_like(q)
    if batch.decode_rows is not None:
        assert batch.decode_tables is not None and batch.decode_lens is not None  # set together by build()
        rows = batch.decode_rows
        out[rows] = decode_attention(q[rows], keys, values, batch.decode_tables, batch.decode_lens, scale)
    if batch.prefill is not None:
        out[batch.prefill.rows] = _prefill_attention(q, keys, values, batch.prefill, scale)
        return out
    start = 0
    for index, (query_len, context_len) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True)):
        if query_len > 1:
            num_blocks = -(-context_len // keys.shape[1])
            blocks = batch.block_tables[index, :num_blocks]
            k = keys[blocks].flatten(0, 1)[:context_len]
            v = values[blocks].flatten(0, 1)[:context_len]
            out[start : start + query_len] = causal_attention(
                q[start : start + query_len], k, v, scale, context_len - query_len
            )
        start += query_len
    return out


def _prefill_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: PrefillLayout, scale: float
) -> torch.Tensor:
    """Several sequences' new tokens at once on a padded grid, causal within each sequence; [len(rows), H, D]."""
    k = keys[layout.block_tables].flatten(1, 2)  # [s, t, kv_heads, D]
    v = values[layout.block_tables].flatten(1, 2)
    grid = _grouped(q[layout.grid_rows], k.shape[2]).float()  # [s, l, kv_heads, group, D]
    scores = torch.einsum("slhgd,sthd->shglt", grid, k.float()) * scale
    key_pos = torch.arange(k.shape[1], device=q.device)
    hidden = (key_pos[None, None, :] > layout.grid_positions[:, :, None]) | (
        key_pos[None, None, :] >= layout.context_lens[:, None, None]
    )  # [s, l, t]
    probs = scores.masked_fill(hidden[:, None, None], float("-inf")).softmax(dim=-1)
    out = torch.einsum("shglt,sthd->slhgd", probs, v.float()).flatten(2, 3).flatten(0, 1)
    return out[layout.grid_index].to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, sequences of different lengths: gather padded tables, mask past each length.

    q: [b, H, D]; block_tables: int64[b, w], device (padded with any valid block); context_lens: int64[b], device,
    each in [1, w * block_size]. No host synchronization, no shape that depends on tensor values.
    """
    k = keys[block_tables].flatten(1, 2)  # [b, w * block_size, kv_heads, D]
    v = values[block_tables].flatten(1, 2)
    scores = torch.einsum("bhgd,bthd->bhgt", _grouped(q, k.shape[2]).float(), k.float()) * scale
    beyond = torch.arange(k.shape[1], device=q.device)[None, :] >= context_lens[:, None]
    probs = scores.masked_fill(beyond[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v.float())
    return out.flatten(1, 2).to(q.dtype)
