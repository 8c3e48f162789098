"""The router's policy: pure functions from a snapshot of the cluster to one routing decision.

No I/O, no clocks, no randomness, no threads: the router gathers :class:`WorkerState` (from workers' ``load``
reports), :class:`LinkRate` (measured by the pipe on each prefill->decode link), the prefix overlap per worker (from
:class:`~kvxfer.serve.prefix_index.PrefixIndex`) and its queue length, and calls :func:`route`. The rules:

- :func:`should_prefill_remotely` -- conditional disaggregation: remote prefill only when the prompt tokens not cached
  on the chosen decode worker exceed ``max_local_prefill_length``, the prefill queue is under its limit and a live
  prefill worker exists; otherwise the decode (or agg) worker prefills itself.
- :func:`choose_decode` -- the live decode/agg worker with room and the lowest cost (uncached prompt blocks, load,
  expected KV transfer time over that prefill->decode link); ties broken by name.
- :func:`choose_prefill` -- the live prefill worker with the fewest queued prefill tokens; ties broken by name.
- :func:`predict_ttft` and :func:`admit` -- early rejection by priority against the TTFT SLO, with a Retry-After.

Thresholds and weights live in :class:`PolicyConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .policy_config import PolicyConfig

Priority = Literal["high", "normal", "low"]
Role = Literal["prefill", "decode", "agg"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
ROLES: tuple[Role, ...] = ("prefill", "decode", "agg")
Rejection = Literal["overload", "no_worker"]


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What the router knows about one worker (from its last ``load`` report).

    ``free_blocks`` / ``active_blocks`` are KV cache blocks of ``block_size`` tokens; ``queued_prefill_tokens`` the
    prompt tokens admitted but not yet prefilled; ``prefill_tokens_per_s`` its measured prefill rate (0: not measured
    yet); ``decode_backlog_s`` how long a new request waits for its first decode step; ``alive`` False once dropped.
    """

    name: str
    role: Role
    block_size: int
    free_blocks: int
    active_blocks: int
    queued_prefill_tokens: int
    prefill_tokens_per_s: float
    decode_backlog_s: float
    alive: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"WorkerState.role: expected one of {ROLES}, got {self.role!r}")
        if self.block_size < 1:
            raise ConfigError(f"WorkerState.block_size: expected >= 1, got {self.block_size!r}")


@dataclass(frozen=True, slots=True)
class LinkRate:
    """Rate measured on one prefill->decode link: bytes per second and per-transfer latency in seconds."""

    bytes_per_s: float
    latency_s: float


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request as the policy sees it: its size, its prompt's block hashes (``PrefixIndex``), its priority."""

    request_id: str
    num_prompt_tokens: int
    block_hashes: tuple[bytes, ...]
    priority: Priority = "normal"
    kv_bytes_per_token: int = 0

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ConfigError(f"RouteRequest.priority: expected one of {PRIORITIES}, got {self.priority!r}")
        if self.num_prompt_tokens < 0 or self.kv_bytes_per_token < 0:
            raise ConfigError(
                f"RouteRequest: expected num_prompt_tokens, kv_bytes_per_token >= 0, got "
                f"{self.num_prompt_tokens}, {self.kv_bytes_per_token}"
            )


@dataclass(frozen=True, slots=True)
class DecodeChoice:
    """The decode worker :func:`choose_decode` picked, with what it computed for it."""

    worker: WorkerState
    cached_tokens: int
    remote: bool
    transfer_s: float
    cost: float


@dataclass(frozen=True, slots=True)
class TTFTEstimate:
    """Predicted time to first token and its parts, in seconds."""

    queue_s: float
    prefill_s: float
    transfer_s: float
    decode_backlog_s: float

    @property
    def total_s(self) -> float:
        """The sum of the parts."""
        return self.queue_s + self.prefill_s + self.transfer_s + self.decode_backlog_s


@dataclass(frozen=True, slots=True)
class Admission:
    """Outcome of :func:`admit`: ``retry_after_s`` is set when rejected."""

    admitted: bool
    retry_after_s: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What :func:`route` decided. ``prefill`` None: the decode worker prefills locally. When not admitted,
    ``rejection`` says why ("overload": 429 with ``retry_after_s``; "no_worker": no live decode worker with room)."""

    admitted: bool
    decode: str | None
    prefill: str | None
    disaggregated: bool
    predicted_ttft_s: float
    expected_transfer_s: float
    retry_after_s: float | None
    reason: str
    cached_tokens: int = 0
    rejection: Rejection | None = None
    estimate: TTFTEstimate | None = None


def cached_prompt_tokens(num_prompt_tokens: int, cached_blocks: int, block_size: int) -> int:
    """Prompt tokens a worker can reuse: whole cached blocks, leaving at least one token to compute (as the engine's
    ``match_prefix(..., max_tokens=len(prompt) - 1)`` does)."""
    limit = max(num_prompt_tokens - 1, 0)
    return min(cached_blocks * block_size, limit - limit % block_size)


def transfer_time(cfg: PolicyConfig, num_tokens: int, kv_bytes_per_token: int, link: LinkRate | None) -> float:
    """Expected seconds to move the KV of ``num_tokens`` tokens over ``link`` (default rate when unmeasured)."""
    if num_tokens <= 0:
        return 0.0
    if link is None or link.bytes_per_s <= 0:
        return cfg.default_link_latency_s + num_tokens * kv_bytes_per_token / cfg.default_link_bytes_per_s
    return link.latency_s + num_tokens * kv_bytes_per_token / link.bytes_per_s


def should_prefill_remotely(
    cfg: PolicyConfig, num_prompt_tokens: int, cached_tokens: int, queue_size: int, prefill_available: bool
) -> bool:
    """Conditional disaggregation: True when the uncached prompt exceeds ``max_local_prefill_length``, the prefill
    queue holds fewer than ``max_prefill_queue_size`` requests and a live prefill worker exists."""
    return (
        num_prompt_tokens - cached_tokens > cfg.max_local_prefill_length
        and queue_size < cfg.max_prefill_queue_size
        and prefill_available
    )


def decode_cost(
    cfg: PolicyConfig, worker: WorkerState, uncached_blocks: int, prompt_blocks: int, transfer_s: float
) -> float:
    """Cost of decoding on ``worker`` (lower is better); each term is roughly in [0, 1] before its weight: the
    uncached fraction of the prompt's blocks, the worker's block utilisation, the transfer time as a share of the
    TTFT SLO."""
    capacity = worker.active_blocks + worker.free_blocks
    load = worker.active_blocks / capacity if capacity > 0 else 1.0
    cache = uncached_blocks / prompt_blocks if prompt_blocks > 0 else 0.0
    return cfg.cache_weight * cache + cfg.load_weight * load + cfg.transfer_weight * transfer_s / cfg.ttft_slo_s


def choose_prefill(workers: Sequence[WorkerState]) -> WorkerState | None:
    """The live prefill worker with the fewest queued prefill tokens (ties: smallest name); None if there is none."""
    best: WorkerState | None = None
    for worker in workers:
        if (
            worker.role == "prefill"
            and worker.alive
            and (best is None or (worker.queued_prefill_tokens, worker.name) < (best.queued_prefill_tokens, best.name))
        ):
            best = worker
    return best


def choose_decode(
    cfg: PolicyConfig,
    req: RouteRequest,
    workers: Sequence[WorkerState],
    cached_blocks: Mapping[str, int],
    links: Mapping[tuple[str, str], LinkRate],
    prefill: WorkerState | None,
    queue_size: int,
) -> DecodeChoice | None:
    """The live decode/agg worker with room for the uncached prompt and the lowest :func:`decode_cost`; for each,
    whether it would prefill remotely (only role "decode" takes remote KV) decides if a transfer is priced. Ties go
    to the smallest name. None when no worker qualifies."""
    tokens = req.num_prompt_tokens
    limit = tokens - 1 if tokens > 0 else 0  # as cached_prompt_tokens: at least one token is computed
    best: tuple[float, str, WorkerState, int, bool, float] | None = None  # one DecodeChoice built at the end
    for worker in workers:
        if not worker.alive or worker.role == "prefill":
            continue
        size = worker.block_size
        cached = cached_blocks.get(worker.name, 0) * size
        cached = min(cached, limit - limit % size)
        uncached = tokens - cached
        uncached_blocks = -(-uncached // size)
        if uncached_blocks > worker.free_blocks:
            continue
        remote = worker.role == "decode" and should_prefill_remotely(
            cfg, tokens, cached, queue_size, prefill is not None
        )
        transfer_s = 0.0
        if remote and prefill is not None:
            transfer_s = transfer_time(cfg, uncached, req.kv_bytes_per_token, links.get((prefill.name, worker.name)))
        cost = decode_cost(cfg, worker, uncached_blocks, -(-tokens // size), transfer_s)
        if best is None or cost < best[0] or (cost == best[0] and worker.name < best[1]):
            best = (cost, worker.name, worker, cached, remote, transfer_s)
    if best is None:
        return None
    return DecodeChoice(best[2], best[3], best[4], best[5], best[0])


def prefill_rate(cfg: PolicyConfig, worker: WorkerState) -> float:
    """The worker's measured prefill rate in tokens/s, or the configured default before it measured one."""
    return worker.prefill_tokens_per_s if worker.prefill_tokens_per_s > 0 else cfg.default_prefill_tokens_per_s


def predict_ttft(
    cfg: PolicyConfig,
    req: RouteRequest,
    choice: DecodeChoice,
    prefill: WorkerState | None,
    prefill_cached_tokens: int = 0,
    queued_tokens: int = 0,
    pool_rate: float = 0.0,
) -> TTFTEstimate:
    """Predicted TTFT of ``req`` decoded on ``choice``. Local prefill: the decode worker's queued prefill tokens and
    the uncached prompt at its rate. Remote: the router queue's ``queued_tokens`` drained at ``pool_rate`` (the
    prefill pool's tokens/s), then ``prefill``'s own queue and the prompt it does not cache at its rate, then the
    transfer. Both add the decode worker's backlog."""
    decode = choice.worker
    if not choice.remote or prefill is None:
        rate = prefill_rate(cfg, decode)
        uncached = req.num_prompt_tokens - choice.cached_tokens
        return TTFTEstimate(decode.queued_prefill_tokens / rate, uncached / rate, 0.0, decode.decode_backlog_s)
    rate = prefill_rate(cfg, prefill)
    queue_s = prefill.queued_prefill_tokens / rate + (queued_tokens / pool_rate if pool_rate > 0 else 0.0)
    prefill_s = (req.num_prompt_tokens - prefill_cached_tokens) / rate
    return TTFTEstimate(queue_s, prefill_s, choice.transfer_s, decode.decode_backlog_s)


def admit(cfg: PolicyConfig, priority: Priority, predicted_ttft_s: float) -> Admission:
    """Early rejection: high priority is always admitted; normal is rejected beyond ``ttft_slo_s`` x
    ``normal_priority_reject_factor``, low beyond x ``low_priority_reject_factor``. A rejection's Retry-After is the
    excess over that limit (the time the backlog needs to drain by as much), clamped to the configured range."""
    if priority == "high" or not cfg.enable_early_rejection:
        return Admission(True, None, f"{priority} priority admitted")
    factor = cfg.low_priority_reject_factor if priority == "low" else cfg.normal_priority_reject_factor
    limit = cfg.ttft_slo_s * factor
    if predicted_ttft_s <= limit:
        return Admission(
            True, None, f"{priority} priority admitted: predicted TTFT {predicted_ttft_s:.3f} s <= {limit:.3f} s"
        )
    retry = min(max(predicted_ttft_s - limit, cfg.retry_after_min_s), cfg.retry_after_max_s)
    return Admission(
        False,
        retry,
        f"{priority} priority rejected early: predicted TTFT {predicted_ttft_s:.3f} s > "
        f"{limit:.3f} s (SLO {cfg.ttft_slo_s:g} s x {factor:g})",
    )


def route(
    cfg: PolicyConfig,
    req: RouteRequest,
    workers: Sequence[WorkerState],
    cached_blocks: Mapping[str, int],
    links: Mapping[tuple[str, str], LinkRate],
    queue_size: int,
    queued_tokens: int = 0,
) -> Decision:
    """Compose the rules into one decision for ``req``.

    ``cached_blocks``: prompt blocks each worker probably caches (``PrefixIndex.matched_blocks``), by name; ``links``:
    measured rates by (prefill, decode) name; ``queue_size`` / ``queued_tokens``: requests and prompt tokens waiting
    in the router's prefill queue.
    """
    prefill = choose_prefill(workers)
    choice = choose_decode(cfg, req, workers, cached_blocks, links, prefill, queue_size)
    if choice is None:
        return Decision(
            False,
            None,
            None,
            False,
            0.0,
            0.0,
            cfg.retry_after_min_s,
            "no live decode/agg worker with room for the prompt",
            rejection="no_worker",
        )
    remote_prefill = prefill if choice.remote else None
    pool_rate, prefill_cached = 0.0, 0
    if remote_prefill is not None:
        pool_rate = sum(prefill_rate(cfg, w) for w in workers if w.role == "prefill" and w.alive)
        prefill_cached = cached_prompt_tokens(
            req.num_prompt_tokens, cached_blocks.get(remote_prefill.name, 0), remote_prefill.block_size
        )
    estimate = predict_ttft(cfg, req, choice, remote_prefill, prefill_cached, queued_tokens, pool_rate)
    ttft = estimate.total_s
    admission = admit(cfg, req.priority, ttft)
    where = _placement_reason(cfg, req, choice, remote_prefill, queue_size)
    return Decision(
        admission.admitted,
        choice.worker.name,
        remote_prefill.name if remote_prefill else None,
        remote_prefill is not None,
        ttft,
        choice.transfer_s,
        admission.retry_after_s,
        f"{admission.reason}; {where}",
        choice.cached_tokens,
        None if admission.admitted else "overload",
        estimate,
    )


def _placement_reason(
    cfg: PolicyConfig, req: RouteRequest, choice: DecodeChoice, prefill: WorkerState | None, queue_size: int
) -> str:
    decode = choice.worker.name
    uncached = req.num_prompt_tokens - choice.cached_tokens
    head = f"decode on {decode} (cost {choice.cost:.3f}, {choice.cached_tokens} prompt tokens cached)"
    limit = cfg.max_local_prefill_length
    if prefill is not None:
        return (
            f"{head}; remote prefill on {prefill.name}: {uncached} uncached tokens > max_local_prefill_length "
            f"{limit}, expected transfer {choice.transfer_s * 1e3:.2f} ms"
        )
    if uncached <= limit:
        why = f"{uncached} uncached tokens <= max_local_prefill_length {limit}"
    elif choice.worker.role == "agg":
        why = "agg worker prefills its own requests"
    elif queue_size >= cfg.max_prefill_queue_size:
        why = f"prefill queue full ({queue_size} >= max_prefill_queue_size {cfg.max_prefill_queue_size})"
    else:
        why = "no live prefill worker"
    return f"{head}; local prefill: {why}"


__all__ = [
    "Admission",
    "Decision",
    "DecodeChoice",
    "LinkRate",
    "PolicyConfig",
    "Priority",
    "RouteRequest",
    "TTFTEstimate",
    "WorkerState",
    "admit",
    "cached_prompt_tokens",
    "choose_decode",
    "choose_prefill",
    "decode_cost",
    "predict_ttft",
    "prefill_rate",
    "route",
    "should_prefill_remotely",
    "transfer_time",
]
