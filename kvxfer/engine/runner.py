"""ModelRunner: a model, its paged KV cache and block manager, and one forward step over a batch of sequences.

Shared by PrefillEngine and DecodeEngine; it owns no scheduling policy.
"""

from __future__ import annotations

import torch

from ..environment import read as read_env
from ..errors import ConfigError
from ..spec import KVCacheSpec
from .attention import AttentionBatch
from .block_manager import BlockManager
from .config import CacheConfig
from .graphs import DecodeGraphs
from .kv_cache import KVCache
from .model import LayerCallback, Model
from .request import Request, Sequence
from .sampling import request_seed, sample, suppress_stops


class ModelRunner:
    """Runs ``model`` over sequences whose K/V live in this runner's :class:`KVCache`.

    ``num_computed_tokens`` counts every token run through the model (prefix cache hits are not), for tests and
    metrics.

    ``cuda_graphs``: run decode steps (every sequence adds one token) through :class:`DecodeGraphs`. None (the
    default) enables it on a CUDA device with one TP rank when ``KVXFER_CUDA_GRAPHS=1`` (off by default until the
    graphs have run on a GPU: they were written on a machine without one); True also enables the
    padded static path where nothing is captured (CPU, TP), False disables it. ``graphs`` is None when disabled.
    """

    def __init__(self, model: Model, cache_config: CacheConfig, *, cuda_graphs: bool | None = None) -> None:
        self.model, self.cache_config = model, cache_config
        config, tp = model.config, model.tp
        self.spec = KVCacheSpec(
            num_layers=config.num_layers,
            num_blocks=cache_config.num_blocks,
            block_size=cache_config.block_size,
            num_kv_heads=model.num_local_kv_heads,
            head_dim=config.head_dim,
            dtype=config.dtype,
            layout=cache_config.layout,
            tp_rank=tp.rank,
            tp_size=tp.size,
            total_kv_heads=config.num_kv_heads,
            model=config.name,
        )
        self.cache = KVCache(self.spec, model.device)
        self.blocks = BlockManager(cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.num_computed_tokens = 0
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs is None:
            cuda_graphs = (
                read_env("KVXFER_CUDA_GRAPHS", "0") == "1" and model.device.type == "cuda" and model.tp.size == 1
            )
        if cuda_graphs:
            self.graphs = DecodeGraphs(
                model, self.cache, -(-self.max_sequence_tokens // self.block_size), capture=model.tp.size == 1
            )

    @property
    def block_size(self) -> int:
        return self.cache_config.block_size

    def allocate(self, seq: Sequence) -> None:
        """Give a new sequence blocks for all its tokens, reusing cached prefix blocks (OutOfBlocksError if full).

        At least the last token is left to compute, so the step that finishes the sequence yields logits.
        """
        prefix = self.blocks.match_prefix(seq.token_ids, max_tokens=seq.num_tokens - 1)
        needed = self.blocks.blocks_for(seq.num_tokens) - len(prefix)
        seq.block_ids = self.blocks.allocate(needed, prefix)
        seq.num_computed = len(prefix) * self.block_size
        seq.num_cached_tokens = seq.num_computed

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether :meth:`allocate` would succeed now."""
        prefix = self.blocks.match_prefix(seq.token_ids, max_tokens=seq.num_tokens - 1)
        revived = sum(1 for block in prefix if self.blocks.ref_count(block) == 0)
        return self.blocks.blocks_for(seq.num_tokens) - len(prefix) <= self.blocks.num_free - revived

    @property
    def max_sequence_tokens(self) -> int:
        """A sequence stops (finish reason "length") at this many tokens: model positions, or the whole cache."""
        return min(self.model.config.max_position, self.cache_config.num_blocks * self.block_size)

    def check_fits(self, request: Request) -> None:
        """ConfigError unless the prompt plus one token fits in :attr:`max_sequence_tokens`."""
        length = len(request.prompt_token_ids) + 1
        limit = self.max_sequence_tokens
        if length > limit:
            raise ConfigError(
                f"request {request.request_id!r}: prompt of {length - 1} tokens must be shorter than "
                f"{limit} (max_position {self.model.config.max_position}, cache "
                f"{self.cache_config.num_blocks} x {self.block_size} tokens)"
            )

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks (cached prefixes stay findable until evicted)."""
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = 0

    @torch.inference_mode()
    def step(self, work: list[tuple[Sequence, int]], on_layer_done: LayerCallback | None = None) -> list[int | None]:
        """Compute the next ``count`` tokens of each (sequence, count); blocks must already cover them.

        A sequence whose tokens are now all computed gets one sampled token appended (and may finish). Returns the
        sampled token per entry, None where the sequence still has tokens to compute (chunked prefill).
        """
        device = self.model.device
        token_ids: list[int] = []
        positions: list[int] = []
        tables: list[list[int]] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        for seq, count in work:
            start = seq.num_computed
            token_ids.extend(seq.token_ids[start : start + count])
            positions.extend(range(start, start + count))
            tables.append(seq.block_ids)
            query_lens.append(count)
            context_lens.append(start + count)
        graphs = self.graphs
        if (
            graphs is not None
            and on_layer_done is None
            and len(token_ids) == len(work)
            and graphs.bucket(len(work), max(len(blocks) for blocks in tables)) is not None
        ):
            logits: torch.Tensor | None = graphs.logits(token_ids, tables, context_lens)
        else:
            logits = None
            batch = AttentionBatch.build(tables, query_lens, context_lens, self.block_size, device)
            hidden = self.model(
                torch.tensor(token_ids, dtype=torch.int64, device=device),
                torch.tensor(positions, dtype=torch.int64, device=device),
                self.cache,
                batch,
                on_layer_done,
            )
        last_rows, finishing = [], []
        end = 0
        for index, (seq, count) in enumerate(work):
            end += count
            seq.num_computed += count
            seq.num_computed_tokens += count
            self.blocks.commit(seq.block_ids, seq.token_ids, seq.num_computed)
            if seq.num_computed == seq.num_tokens:
                last_rows.append(end - 1)
                finishing.append(index)
        self.num_computed_tokens += len(token_ids)
        results: list[int | None] = [None] * len(work)
        if not finishing:
            return results
        if logits is None:
            logits = self.model.logits(hidden[last_rows])
        elif len(last_rows) < len(work):
            logits = logits[last_rows]
        seqs = [work[i][0] for i in finishing]
        params, steps = [s.request.sampling for s in seqs], [len(s.output_token_ids) for s in seqs]
        logits = suppress_stops(logits, params, steps, self.model.config.eos_token_ids)
        tokens = sample(logits, params, [request_seed(s.request_id, s.request.sampling) for s in seqs], steps)
        for index, seq, token in zip(finishing, seqs, tokens, strict=True):
            seq.append(token, self.model.config.eos_token_ids, self.max_sequence_tokens)
            results[index] = token
        return results
