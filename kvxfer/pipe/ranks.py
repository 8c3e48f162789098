"""Which heads of which remote rank land in which local rank, for any pair of TP sizes where one divides the
other (and for replicated heads: TP larger than the model's KV heads, MLA's single latent head)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LayoutMismatchError
from ..spec import KVCacheSpec


@dataclass(frozen=True)
class HeadRoute:
    """Heads ``global_heads`` move between remote rank ``remote`` (an index into the pipe's remote specs) and
    the local rank: ``local_heads`` and ``remote_heads`` are the same heads as each side's local head indices."""

    remote: int
    global_heads: tuple[int, int]
    local_heads: tuple[int, int]
    remote_heads: tuple[int, int]

    @property
    def num_heads(self) -> int:
        """How many heads the route moves."""
        return self.global_heads[1] - self.global_heads[0]


def check_compatible(local: KVCacheSpec, remote: KVCacheSpec) -> None:
    """LayoutMismatchError unless the two caches hold the same model's KV (layouts and block sizes may differ)."""
    checks = [
        ("model", local.model, remote.model),
        ("dtype", local.dtype, remote.dtype),
        ("head_dim", local.head_dim, remote.head_dim),
        ("num_layers", local.num_layers, remote.num_layers),
        ("total_kv_heads", local.total_kv_heads, remote.total_kv_heads),
        ("num_kv_parts", local.num_kv_parts, remote.num_kv_parts),
    ]
    for field, mine, theirs in checks:
        if field == "model" and (not mine or not theirs):
            continue  # an unnamed model is not checked
        if mine != theirs:
            raise LayoutMismatchError(f"KV caches do not match: local {field}={mine!r}, remote {field}={theirs!r}")
    sizes = sorted((local.tp_size, remote.tp_size))
    if sizes[1] % sizes[0]:
        raise LayoutMismatchError(
            f"TP sizes must divide one another, got local {local.tp_size} and remote {remote.tp_size}"
        )


def route_heads(local: KVCacheSpec, remotes: Sequence[KVCacheSpec], every_replica: bool = False) -> list[HeadRoute]:
    """The routes that fill (or drain) every head of the local rank from the given remote ranks.

    Where several remote ranks hold the same heads (replication), a reader picks one of them by its own rank, so
    the readers of a replicated head spread over its replicas; a writer (``every_replica``) must fill them all.
    """
    for remote in remotes:
        check_compatible(local, remote)
    g0, g1 = local.head_range()
    holders: dict[tuple[int, int], list[int]] = {}
    for index, remote in enumerate(remotes):
        holders.setdefault(remote.head_range(), []).append(index)
    routes, covered = [], 0
    for (q0, q1), candidates in sorted(holders.items()):
        low, high = max(g0, q0), min(g1, q1)
        if low >= high:
            continue
        chosen = candidates if every_replica else [candidates[local.tp_rank % len(candidates)]]
        routes += [HeadRoute(index, (low, high), (low - g0, high - g0), (low - q0, high - q0)) for index in chosen]
        covered += high - low
    if covered != g1 - g0:
        have = sorted(holders)
        raise LayoutMismatchError(
            f"remote ranks hold heads {have}; they do not cover this rank's heads [{g0}, {g1})"
            " exactly once (pass every remote rank that holds them)"
        )
    return routes


def rank_pairs(prefill_tp: int, decode_tp: int, total_kv_heads: int) -> list[tuple[int, int, tuple[int, int]]]:
    """(prefill rank, decode rank, global heads) for every route of a prefill TP -> decode TP transfer."""

    def spec(rank: int, size: int) -> KVCacheSpec:
        heads = max(total_kv_heads // size, 1)
        return KVCacheSpec(1, 1, 1, heads, 1, tp_rank=rank, tp_size=size, total_kv_heads=total_kv_heads)

    prefill = [spec(r, prefill_tp) for r in range(prefill_tp)]
    return [
        (route.remote, d, route.global_heads)
        for d in range(decode_tp)
        for route in route_heads(spec(d, decode_tp), prefill)
    ]
