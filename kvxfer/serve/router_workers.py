"""The router's view of its workers: who registered, their last load report, liveness, and the in-flight counts.

Embedded discovery: a worker is known from its ``register`` until ``heartbeat_timeout_s`` passes without a ``load``
(its heartbeat); then :meth:`WorkerRegistry.expire` drops it and the router fails over its requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .protocol import Load, PeerInfo, Register

#: Seconds without a ``load`` after which a worker counts as dead.
HEARTBEAT_TIMEOUT_S = 2.0


@dataclass
class WorkerEntry:
    """One registered worker: its registration, last load and the requests the router has in flight on it."""

    info: Register
    last_seen: float
    load: Load | None = None
    in_flight_prefills: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    pending_prefill: dict[str, int] = field(default_factory=dict)  # rid -> prompt tokens sent, not prefilled yet
    pending_prefill_tokens: int = 0

    def add_pending(self, rid: str, num_tokens: int) -> None:
        """Prompt tokens handed to this worker to prefill (counted until its first token / ``prefilled``)."""
        self.pending_prefill[rid] = num_tokens
        self.pending_prefill_tokens += num_tokens

    def clear_pending(self, rid: str) -> None:
        self.pending_prefill_tokens -= self.pending_prefill.pop(rid, 0)

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens waiting for this worker's prefill: its last report, or what the router sent since, if more
        (reports come every 0.25 s; a burst of requests must not all see an idle worker)."""
        reported = self.load.queued_prefill_tokens if self.load is not None else 0
        return max(reported, self.pending_prefill_tokens)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def free_blocks(self) -> int:
        return self.load.free_blocks if self.load is not None else self.info.num_blocks

    @property
    def active_blocks(self) -> int:
        return self.load.active_blocks if self.load is not None else 0

    def prefill_capacity(self) -> int:
        """How many more prefill requests this worker may take now (at most ``max_batch`` at once)."""
        return self.info.max_batch - len(self.in_flight_prefills)

    def snapshot(self) -> dict[str, object]:
        """A JSON-able summary (for ``/kvxfer/workers``)."""
        load = self.load
        return {
            "name": self.name,
            "role": self.role,
            "device": self.info.device,
            "model": self.info.model,
            "block_size": self.info.block_size,
            "num_blocks": self.info.num_blocks,
            "free_blocks": self.free_blocks,
            "active_blocks": self.active_blocks,
            "running": load.running if load else 0,
            "waiting": load.waiting if load else 0,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "prefill_tokens_per_s": load.prefill_tokens_per_s if load else 0.0,
            "decode_tokens_per_s": load.decode_tokens_per_s if load else 0.0,
            "links": {peer: list(rate) for peer, rate in (load.links if load else {}).items()},
            "in_flight": len(self.requests),
            "in_flight_prefills": len(self.in_flight_prefills),
            "last_seen_s_ago": round(time.monotonic() - self.last_seen, 3),
        }


class WorkerRegistry:
    """Registered workers by name; ``version`` changes whenever membership does (to re-send ``peers``)."""

    def __init__(
        self, models: frozenset[str], heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, max_workers: int = 1024
    ) -> None:
        self.models = models  # the names a worker may register the served model under
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_workers = max_workers
        self.workers: dict[str, WorkerEntry] = {}
        self.version = 0

    def register(self, message: Register) -> WorkerEntry | str:
        """Add (or replace) a worker; returns the entry, or why it was refused (a string)."""
        if message.model not in self.models:
            return f"worker {message.name!r} serves model {message.model!r}, this router serves {sorted(self.models)}"
        if message.name not in self.workers and len(self.workers) >= self.max_workers:
            return f"worker {message.name!r} refused: {self.max_workers} workers registered already"
        entry = WorkerEntry(message, time.monotonic())
        self.workers[message.name] = entry
        self.version += 1
        return entry

    def update(self, name: str, load: Load) -> bool:
        """Record a heartbeat; False for a worker that is not registered (it should register again)."""
        entry = self.workers.get(name)
        if entry is None:
            return False
        entry.load = load
        entry.last_seen = time.monotonic()
        return True

    def touch(self, name: str) -> None:
        """Any message from a worker proves it alive."""
        entry = self.workers.get(name)
        if entry is not None:
            entry.last_seen = time.monotonic()

    def expire(self, now: float | None = None) -> list[WorkerEntry]:
        """Drop and return the workers silent for longer than the heartbeat timeout."""
        now = time.monotonic() if now is None else now
        dead = [w for w in self.workers.values() if now - w.last_seen > self.heartbeat_timeout_s]
        for entry in dead:
            self.remove(entry.name)
        return dead

    def remove(self, name: str) -> WorkerEntry | None:
        entry = self.workers.pop(name, None)
        if entry is not None:
            self.version += 1
        return entry

    def by_role(self, *roles: str) -> list[WorkerEntry]:
        return [w for w in self.workers.values() if w.role in roles]

    def count(self, role: str) -> int:
        return sum(1 for w in self.workers.values() if w.role == role)

    def peers(self) -> tuple[PeerInfo, ...]:
        """Every worker as the others need it (the ``peers`` message)."""
        return tuple(
            PeerInfo(w.name, w.role, w.info.rank_info) for w in self.workers.values() if w.info.rank_info
        )  # agg workers move no KV: they have no agent to connect to

    def block_size(self) -> int | None:
        """The block size of the decode-capable workers (they must agree for prefix hashes to match)."""
        sizes = {w.info.block_size for w in self.by_role("decode", "agg")}
        return sizes.pop() if len(sizes) == 1 else None
