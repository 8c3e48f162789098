"""DecodeGraphs: the decode step (whole model forward + LM head) as CUDA graphs, one per shape bucket.

A decode batch of ``n`` sequences is padded to the smallest batch bucket ``b >= n`` and its block tables to the
smallest width bucket ``w`` covering its longest sequence; each (b, w) is captured once, lazily, on first use, and
replayed after. The step's inputs live in one static int64 device buffer per (b, w), filled with one host-to-device
copy from a pinned buffer. Padding rows read block 0 with a context of one token and write their K/V to the first
row's slot with the first row's K/V (identical duplicate writes), so padding never changes another slot.

Without capture (CPU, tensor parallelism, or ``capture=False``) the same padded, static-shape step runs eagerly:
tests check it against the unpadded path on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .attention import AttentionBatch
from .kv_cache import KVCache
from .model import Model

_log = logging.getLogger(__name__)

#: Batch sizes captured (a batch is padded to the next one; larger batches run eagerly).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)

#: Warm-up forwards on a side stream before a capture (torch's recipe: lazy inits happen outside the graph).
_WARMUP = 2

#: int64 fields per row before the block table: token, position, slot, context length, write row.
_FIELDS = 5


def width_buckets(max_blocks: int) -> list[int]:
    """Block table widths: every width to 16, then eight steps per doubling (18, 20, ... 32, 36, ... 64, 72, ...),
    and ``max_blocks`` last. Past 16 blocks at most an eighth of a table is padding (attention reads all of it)."""
    if max_blocks < 1:
        raise ConfigError(f"width_buckets: max_blocks must be >= 1, got {max_blocks}")
    widths, base = list(range(1, 17)), 16
    while widths[-1] < max_blocks:
        widths.extend(base + base * step // 8 for step in range(1, 9))
        base *= 2
    return sorted({w for w in widths if w < max_blocks} | {max_blocks})


@dataclass
class _Entry:
    """One (batch, width) bucket: its static inputs, the views the model reads, its graph and output."""

    inputs: torch.Tensor  # int64[batch * (_FIELDS + width)], device
    batch: AttentionBatch
    token_ids: torch.Tensor
    positions: torch.Tensor
    batch_size: int
    graph: torch.cuda.CUDAGraph | None = None
    eager: bool = False  # its capture failed: run it eagerly from now on
    output: torch.Tensor | None = None  # float32[batch, vocab], device


class DecodeGraphs:
    """Padded, shape-static decode steps over ``model`` and ``cache``, captured as CUDA graphs when ``capture``.

    ``max_blocks``: the most blocks one sequence can hold (its table width). ``batch_sizes``: the batch buckets.
    """

    def __init__(
        self,
        model: Model,
        cache: KVCache,
        max_blocks: int,
        *,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        capture: bool = True,
    ) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ConfigError(f"DecodeGraphs: batch_sizes must be non-empty and >= 1, got {batch_sizes}")
        self.model, self.cache = model, cache
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.widths = width_buckets(max_blocks)
        self.capture = capture and cache.device.type == "cuda"
        self.num_captures = 0
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None  # shared by every bucket's graph
        size = self.batch_sizes[-1] * (_FIELDS + self.widths[-1])
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=self.capture)
        self._copied = torch.cuda.Event() if self.capture else None  # the last copy out of the pinned buffer

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def bucket(self, batch_size: int, num_blocks: int) -> tuple[int, int] | None:
        """The (batch, width) bucket of a batch, or None when it is larger than the largest one."""
        if batch_size > self.batch_sizes[-1] or num_blocks > self.widths[-1]:
            return None
        batch = next(b for b in self.batch_sizes if b >= batch_size)
        return batch, next(w for w in self.widths if w >= max(num_blocks, 1))

    @torch.inference_mode()
    def logits(self, token_ids: list[int], block_tables: list[list[int]], context_lens: list[int]) -> torch.Tensor:
        """float32[n, vocab], device: logits of one new token per sequence (the token at ``context_lens[i] - 1``).

        The K/V of each new token is written to the cache first. The result is a view of a static buffer: read it
        before the next call. ``block_tables[i]`` must cover ``context_lens[i]`` tokens.
        """
        n = len(token_ids)
        key = self.bucket(n, max(len(blocks) for blocks in block_tables))
        if key is None:
            raise ConfigError(
                f"DecodeGraphs.logits: batch of {n} exceeds the largest bucket {self.batch_sizes[-1]} "
                f"or its tables exceed {self.widths[-1]} blocks"
            )
        entry = self._entries.get(key) or self._new_entry(*key)
        self._fill(entry, key, token_ids, block_tables, context_lens)
        if self.capture and entry.graph is None and not entry.eager:
            self._capture(entry)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.output = self._forward(entry)
        assert entry.output is not None  # set by the forward or the capture above
        return entry.output[:n]

    def _new_entry(self, batch: int, width: int) -> _Entry:
        inputs = torch.zeros(batch * (_FIELDS + width), dtype=torch.int64, device=self.cache.device)
        fields = inputs[: batch * _FIELDS].view(_FIELDS, batch)
        entry = _Entry(
            inputs=inputs,
            batch=AttentionBatch(
                slots=fields[2],
                block_tables=inputs[batch * _FIELDS :].view(batch, width),
                query_lens=[1] * batch,
                context_lens=[1] * batch,  # host lengths are not read on the decode path; the tensor below is
                context_lens_tensor=fields[3],
                write_rows=fields[4],
            ),
            token_ids=fields[0],
            positions=fields[1],
            batch_size=batch,
        )
        self._entries[(batch, width)] = entry
        return entry

    def _fill(
        self,
        entry: _Entry,
        key: tuple[int, int],
        token_ids: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> None:
        batch, width = key
        n, block_size = len(token_ids), self.cache.block_size
        if self._copied is not None:  # the previous step's copy may still read the pinned buffer
            self._copied.synchronize()
        host = self._host[: batch * (_FIELDS + width)].numpy()
        host[:] = 0
        fields = host[: batch * _FIELDS].reshape(_FIELDS, batch)
        tables = host[batch * _FIELDS :].reshape(batch, width)
        positions = [length - 1 for length in context_lens]
        fields[0, :n] = token_ids
        fields[1, :n] = positions
        fields[2, :n] = [
            blocks[p // block_size] * block_size + p % block_size
            for blocks, p in zip(block_tables, positions, strict=True)
        ]
        fields[2, n:] = fields[2, 0]
        fields[3, :n] = context_lens
        fields[3, n:] = 1
        fields[4, :n] = np.arange(n)
        for row, blocks in enumerate(block_tables):
            tables[row, : len(blocks)] = blocks
        entry.inputs.copy_(self._host[: entry.inputs.numel()], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _forward(self, entry: _Entry) -> torch.Tensor:
        hidden = self.model(entry.token_ids, entry.positions, self.cache, entry.batch)
        return self.model.logits(hidden)

    def _capture(self, entry: _Entry) -> None:
        """Warm up on a side stream, then capture (the warm-ups write the same K/V the replay writes again)."""
        device = self.cache.device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)  # warm-ups and capture on one stream (its cuBLAS workspace exists)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_WARMUP):
                self._forward(entry)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a KV transfer thread of the same process may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                output = self._forward(entry)
        except RuntimeError as error:  # e.g. another thread synchronized with the capturing stream
            _log.warning("DecodeGraphs: capture of batch %d failed, running it eagerly: %s", entry.batch_size, error)
            torch.cuda.set_stream(current)  # a failed capture_end leaves the capture stream current
            entry.eager = True
            return
        entry.output, entry.graph = output, graph
        self.num_captures += 1
