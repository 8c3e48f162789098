"""PrefillEngine: computes prompts' K/V into its paged cache, returns the first token and the block ids, and holds
the blocks until released (so a decode engine can pull them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from ..spec import KVCacheSpec
from .config import CacheConfig
from .kv_cache import KVCache
from .model import LayerCallback, Model
from .request import Request, Sequence
from .runner import ModelRunner

#: ``on_allocated(request_id, block_ids, num_cached_tokens)``: a request's blocks, before its compute.
AllocationCallback = Callable[[str, tuple[int, ...], int], None]


@dataclass(frozen=True)
class PrefillResult:
    """A computed prompt. ``block_ids`` (host ints, in token order) hold the K/V of all ``num_prompt_tokens``
    prompt tokens: token ``t`` is at block ``block_ids[t // block_size]``, slot ``t % block_size``; the last block
    may be partly filled. ``num_cached_tokens`` came from the prefix cache, ``num_computed_tokens`` were computed.
    """

    request_id: str
    first_token: int
    block_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_computed_tokens: int
    first_token_time: float
    prefill_s: float


class PrefillEngine:
    """Prefill on one TP rank (in a TP group every rank calls the same methods with the same requests; block ids
    and first tokens agree across ranks).

    ``cache.tensor`` is the KV cache to register with an agent and ``spec`` describes it. ``chunk_size`` splits long
    prompts into forward passes of at most that many tokens per sequence (chunked prefill).
    """

    def __init__(
        self,
        model: Model,
        cache_config: CacheConfig | None = None,
        *,
        chunk_size: int | None = None,
        cuda_graphs: bool | None = None,
    ):
        self.runner = ModelRunner(model, cache_config or CacheConfig(), cuda_graphs=cuda_graphs)
        self.chunk_size = chunk_size
        self._held: dict[str, Sequence] = {}

    @property
    def spec(self) -> KVCacheSpec:
        """The KVCacheSpec of this rank's cache."""
        return self.runner.spec

    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @property
    def num_free_blocks(self) -> int:
        return self.runner.blocks.num_free

    @property
    def held_request_ids(self) -> list[str]:
        """Requests whose blocks are held (prefilled, not yet released)."""
        return list(self._held)

    def prefill(
        self,
        request: Request,
        on_layer_done: LayerCallback | None = None,
        on_allocated: AllocationCallback | None = None,
    ) -> PrefillResult:
        """Compute one prompt (reusing cached prefix blocks); see :meth:`prefill_batch`."""
        return self.prefill_batch([request], on_layer_done, on_allocated)[0]

    def prefill_batch(
        self,
        requests: list[Request],
        on_layer_done: LayerCallback | None = None,
        on_allocated: AllocationCallback | None = None,
    ) -> list[PrefillResult]:
        """Compute several prompts in shared forward passes; their blocks are held until :meth:`release`.

        ``on_layer_done(layer)`` is called, in layer order, during the last forward pass: when it is called for
        layer ``l``, layer ``l``'s K/V of every prompt of the batch has been issued (on a GPU: enqueued on the
        current stream). ``on_allocated(request_id, block_ids, num_cached_tokens)`` is called for each request
        once its blocks are known, before any compute (a streaming push needs them early). All or nothing:
        OutOfBlocksError leaves no request admitted.
        """
        for request in requests:
            if request.request_id in self._held:
                raise UsageError(f"PrefillEngine: request id {request.request_id!r} already holds blocks")
            self.runner.check_fits(request)
        if len({r.request_id for r in requests}) != len(requests):
            raise UsageError("PrefillEngine.prefill_batch: request ids must be distinct")
        began = time.perf_counter()
        seqs = [Sequence(request) for request in requests]
        allocated: list[Sequence] = []
        try:
            for seq in seqs:
                self.runner.allocate(seq)
                allocated.append(seq)
            if on_allocated is not None:
                for seq in seqs:
                    on_allocated(seq.request_id, tuple(seq.block_ids), seq.num_cached_tokens)
            self._compute(seqs, on_layer_done)
        except BaseException:
            for seq in allocated:
                self.runner.free(seq)
            raise
        elapsed = time.perf_counter() - began
        results = []
        for seq in seqs:
            self._held[seq.request_id] = seq
            results.append(
                PrefillResult(
                    request_id=seq.request_id,
                    first_token=seq.token_ids[-1],
                    block_ids=tuple(seq.block_ids),
                    num_prompt_tokens=seq.num_prompt_tokens,
                    num_cached_tokens=seq.num_cached_tokens,
                    num_computed_tokens=seq.num_computed_tokens,
                    first_token_time=seq.token_times[-1],
                    prefill_s=elapsed,
                )
            )
        return results

    def _compute(self, seqs: list[Sequence], on_layer_done: LayerCallback | None) -> None:
        limit = self.chunk_size or max(seq.num_tokens for seq in seqs)
        while True:
            # A sequence is done once its first token was sampled (it then has one token more than computed).
            work = [(seq, min(limit, seq.num_tokens - seq.num_computed)) for seq in seqs if not seq.output_token_ids]
            if not work:
                return
            last = all(seq.num_computed + count == seq.num_tokens for seq, count in work)
            # Sampling copies the token to the host, so when this returns every K/V write has completed.
            self.runner.step(work, on_layer_done if last else None)

    def release(self, request_id: str) -> None:
        """Free a prefilled request's blocks (once its K/V was pulled, or abandoned). Full blocks stay in the
        prefix cache until evicted."""
        seq = self._held.pop(request_id, None)
        if seq is None:
            raise UsageError(
                f"PrefillEngine.release: request {request_id!r} holds no blocks (held: {sorted(self._held)[:8]})"
            )
        self.runner.free(seq)

    def __enter__(self) -> PrefillEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        for request_id in list(self._held):
            self.release(request_id)
