"""One request in flight through the router: its legs, its deadline, its events for the HTTP side, its timing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from .openai_schema import ApiError
from .protocol import Sampling

Phase = Literal["queued", "prefilling", "decoding", "done"]


@dataclass(frozen=True, slots=True)
class TokensEvent:
    """New tokens for the client; ``finish`` set on the last; ``timing`` on the first (the TTFT breakdown)."""

    token_ids: tuple[int, ...]
    finish: str | None
    timing: dict[str, float | str | bool] | None = None


Event = TokensEvent | ApiError


@dataclass(eq=False)
class Flight:
    """A request the router admitted. ``decode`` is the worker that streams its tokens; ``prefill`` the prefill
    worker (None: the decode worker prefills locally). ``sent_to`` names every worker that holds state for it (each
    gets an ``abort`` when the request ends early)."""

    rid: str
    prompt: tuple[int, ...]
    sampling: Sampling
    priority: str
    decode: str
    prefill: str | None
    block_hashes: tuple[bytes, ...]
    deadline_s: float  # absolute time.time(), sent to workers
    arrival: float = field(default_factory=time.perf_counter)
    phase: Phase = "queued"
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    sent_to: set[str] = field(default_factory=set)
    requeued: bool = False
    dispatched_at: float | None = None  # perf_counter when the first message went to a worker
    queued_at: float | None = None
    queue_wait_s: float = 0.0  # time in the router's prefill queue
    prefill_timing: dict[str, float] = field(default_factory=dict)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_generated: int = 0
    predicted_cached_tokens: int = 0  # prompt tokens the router expects the decode worker to have cached
    predicted_ttft_s: float = 0.0  # the policy's estimate at admission

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    def breakdown(self, worker_timing: dict[str, float] | None, now: float) -> dict[str, float | str | bool]:
        """The TTFT breakdown reported to the client: queue, prefill, transfer, first_step (seconds), ttft,
        router overhead, KV bytes moved and where the prefill ran."""
        worker = worker_timing or {}
        if self.prefill is not None:  # the router's queue, the prefill worker's, the decode worker's (blocks)
            queue = self.queue_wait_s + self.prefill_timing.get("queue_s", 0.0) + worker.get("queue_s", 0.0)
            prefill = self.prefill_timing.get("prefill_s", 0.0)
        else:  # queue_wait_s > 0: it waited for a prefill pool that went away
            queue = self.queue_wait_s + worker.get("queue_s", 0.0)
            prefill = worker.get("prefill_s", 0.0)
        router = (self.dispatched_at - self.arrival) if self.dispatched_at is not None else 0.0
        return {
            "ttft_s": now - self.arrival,
            "queue_s": queue,
            "prefill_s": prefill,
            "transfer_s": worker.get("transfer_s", 0.0),
            "first_step_s": worker.get("first_step_s", 0.0),
            "router_s": router,
            "kv_bytes": int(worker.get("kv_bytes", 0)),
            "prefill_worker": self.prefill or self.decode,
            "decode_worker": self.decode,
            "disaggregated": self.prefill is not None,
            "cached_tokens": int(worker.get("cached_tokens", 0)),
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "predicted_ttft_s": self.predicted_ttft_s,
        }
