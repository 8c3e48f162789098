"""The router's glue around the pure policy: worker states and link rates from the registry, the HTTP answer to a
rejection, and where a request's prefill runs (with a short reason for the metrics)."""

from __future__ import annotations

from typing import cast

from . import policy
from .openai_schema import ApiError
from .policy_config import PolicyConfig
from .router_workers import WorkerEntry, WorkerRegistry


def worker_state(entry: WorkerEntry) -> policy.WorkerState:
    """What the policy knows of ``entry``: its last load report, with the router's own count of the prompt tokens
    it sent since (so a burst does not see an idle worker)."""
    load = entry.load
    backlog = 0.0
    if load is not None and load.decode_tokens_per_s > 0:
        backlog = load.waiting / load.decode_tokens_per_s
    return policy.WorkerState(
        entry.name,
        cast("policy.Role", entry.role),  # Register's schema admits only protocol.ROLES
        entry.info.block_size,
        entry.free_blocks,
        entry.active_blocks,
        entry.queued_prefill_tokens,
        load.prefill_tokens_per_s if load else 0.0,
        backlog,
    )


def link_rates(registry: WorkerRegistry) -> dict[tuple[str, str], policy.LinkRate]:
    """(prefill, decode) -> the rate the decode worker's pipe measured pulling from that prefill worker."""
    links = {}
    for entry in registry.workers.values():
        if entry.load is not None:
            for peer, (rate, latency) in entry.load.links.items():
                links[(peer, entry.name)] = policy.LinkRate(rate, latency)
    return links


def kv_bytes_per_token(registry: WorkerRegistry) -> int:
    """KV bytes per token of the served model (every worker reports the same)."""
    for entry in registry.workers.values():
        return entry.info.kv_bytes_per_token
    return 0


def rejection(decision: policy.Decision) -> ApiError:
    """The answer to a request the policy did not admit: 429 + Retry-After (overload), else 503 (no worker)."""
    if decision.rejection == "overload":
        return ApiError(
            429,
            f"rejected early: {decision.reason}",
            code="rate_limit_exceeded",
            kind="rate_limit_error",
            retry_after_s=decision.retry_after_s,
        )
    return ApiError(
        503,
        f"no worker can take the request: {decision.reason}",
        code="no_worker",
        kind="service_unavailable",
        retry_after_s=decision.retry_after_s or 1.0,
    )


def placement(
    config: PolicyConfig,
    registry: WorkerRegistry,
    decision: policy.Decision,
    mode: str,
    workers: list[policy.WorkerState],
    num_tokens: int,
    queue_size: int,
) -> tuple[str | None, str]:
    """Where the prefill runs (a prefill worker's name, or None: the decode worker) and a short reason for the
    metrics; ``mode`` "local" / "remote" overrides the policy (the request's ``kvxfer.prefill``)."""
    if mode == "local":
        return None, "forced"
    if mode == "remote":
        chosen = policy.choose_prefill(workers)
        if chosen is None:
            raise ApiError(
                503,
                "kvxfer.prefill=remote but no prefill worker is registered",
                code="no_prefill_worker",
                kind="service_unavailable",
                retry_after_s=1.0,
            )
        return chosen.name, "forced"
    if decision.prefill is not None:
        return decision.prefill, "long_prompt"
    if num_tokens - decision.cached_tokens <= config.max_local_prefill_length:
        return None, "short_prompt"
    if registry.workers[decision.decode].role == "agg":  # type: ignore[index]
        return None, "agg_worker"
    if queue_size >= config.max_prefill_queue_size:
        return None, "queue_full"
    return None, "no_prefill_worker"
