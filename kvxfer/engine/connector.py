"""Connectors: the glue between a reference engine and :class:`~kvxfer.KVPipe` (what vLLM calls a KV connector).

Pull mode (the default)::

    prefill rank                                   decode rank
    ready = p.prefill(request, decode_group)  -->  d.receive(ready)        # reserve blocks, start the pull
    (blocks held under one lease per decode rank)  d.poll() / d.wait()     # admit when pulled, else cancel
    p.poll()  # frees blocks whose leases ended    (the pipe releases the leases when the pull ends)

Push mode (layers stream while the prefill computes)::

    wanted = d.reserve_push(request, prefill_group)  -->  p.push(wanted)  -->  d.poll() admits

Every rank of a TP group makes the same calls in the same order (the engines' contract); ``poll``, ``wait`` and
``drain`` agree across the group with one small all-reduce, so block tables and prefix caches stay identical on
every rank. Before any request, each side :meth:`connect`\\ s to the other group's :class:`RankInfo` list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..agent import Agent
from ..control import BlocksExpired, PushOutcome
from ..errors import ConfigError, KvxferError
from ..pipe.ranks import check_compatible, route_heads
from ..spec import KVCacheSpec
from .messages import RankInfo

logger = logging.getLogger("kvxfer")

#: How many recent notes about unknown requests a connector remembers (they may arrive before the request).
MAX_REMEMBERED = 4096


class Connector:
    """What both sides share: the registered cache, the peer groups, notes, and agreement across the TP group."""

    role: ClassVar[str] = ""

    def __init__(self, engine: Any, agent: Agent, region: str = "kv") -> None:
        self.engine, self.agent, self.region_name = engine, agent, region
        self.tp = engine.runner.model.tp
        tensor = engine.cache.tensor
        if not any(r.name == region for r in agent.regions):
            agent.register(tensor, name=region)
        self._lock = threading.Lock()
        self._groups: dict[str, list[RankInfo]] = {}
        self._connected: dict[str, bytes] = {}
        #: Agent names of this engine's TP group, in rank order (peers name the group by its rank 0's agent).
        self.group_agents: tuple[str, ...] = self._gather_names()
        agent.control.on(BlocksExpired, self._on_expired)
        agent.control.on(PushOutcome, self._on_push_outcome)

    def _gather_names(self) -> tuple[str, ...]:
        if self.tp.size == 1:
            return (self.agent.name,)
        import torch.distributed as dist

        names: list[Any] = [None] * self.tp.size
        dist.all_gather_object(names, self.agent.name, group=self.tp.group)
        return tuple(names)

    @property
    def spec(self) -> KVCacheSpec:
        """This rank's KV cache spec."""
        return self.engine.spec

    def info(self) -> RankInfo:
        """What the other side's ranks need to reach this rank (send it to them; see :meth:`connect`)."""
        return RankInfo(self.role, self.agent.name, self.agent.metadata(), self.spec)

    def _connect_group(self, group: Sequence[RankInfo | bytes], role: str) -> str:
        """Connect to every rank of a peer group (rank order); returns the group's name (its rank 0's agent)."""
        infos = [RankInfo.decode(i) if isinstance(i, (bytes, bytearray)) else i for i in group]
        if not infos:
            raise ConfigError(f"{self.role} connector: connect needs the {role} group's RankInfo list, got none")
        size = len(infos)
        for index, info in enumerate(infos):
            if info.role != role or info.spec.tp_rank != index or info.spec.tp_size != size:
                raise ConfigError(
                    f"{self.role} connector: entry {index} must be the {role} rank {index} of {size}, "
                    f"got role {info.role!r} rank {info.spec.tp_rank} of {info.spec.tp_size}"
                )
            check_compatible(self.spec, info.spec)  # model, dtype, heads, layers: before any byte moves
        for info in infos:
            if self._connected.get(info.agent_name) != info.metadata:
                self.agent.connect(info.metadata)
                self._connected[info.agent_name] = info.metadata
        name = infos[0].agent_name
        self._groups[name] = list(infos)
        return name

    @property
    def groups(self) -> list[str]:
        """Names of the connected peer groups."""
        return list(self._groups)

    def group(self, name: str) -> list[RankInfo]:
        """The RankInfo list of a connected peer group."""
        try:
            return self._groups[name]
        except KeyError:
            raise ConfigError(
                f"{self.role} connector: unknown peer group {name!r}; connected: {sorted(self._groups)}"
            ) from None

    # ---- agreement across the TP group -------------------------------------------------------------------------

    def _agree(self, values: list[int]) -> list[int]:
        """Element-wise sums of ``values`` over this engine's TP group (every rank calls it in the same order)."""
        if self.tp.size == 1 or not values:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64, device=self.engine.runner.model.device)
        return self.tp.all_reduce(tensor).tolist()

    # ---- notes -------------------------------------------------------------------------------------------------

    def _send(self, peer: str, verb: str, *fields: Any) -> bool:
        """A note to another connector ("expired" key, or "pushed" / "push-failed" request_id token token_time),
        sent as a typed control message; False (logged) if it cannot be sent."""
        message: BlocksExpired | PushOutcome
        if verb == "expired":
            message = BlocksExpired(*fields)
        elif verb in ("pushed", "push-failed"):
            request_id, token, token_time = fields
            message = PushOutcome(request_id, verb == "pushed", int(token), float(token_time))
        else:
            raise ConfigError(f"{self.role} connector: unknown note {verb!r}")
        try:
            self.agent.control.send(peer, message)
            return True
        except KvxferError as error:
            logger.warning("%s connector %s: cannot send %s to %s: %s", self.role, self.agent.name, verb, peer, error)
            return False

    def _on_expired(self, peer: str, message: BlocksExpired) -> None:
        self._note(peer, "expired", [message.key])

    def _on_push_outcome(self, peer: str, message: PushOutcome) -> None:
        self._note(
            peer, "pushed" if message.ok else "push-failed", [message.request_id, message.token, message.token_time]
        )

    def _note(self, peer: str, verb: str, fields: list[Any]) -> None:
        logger.warning("%s connector %s: unexpected note %r from %s", self.role, self.agent.name, verb, peer)


def routes_of(source: KVCacheSpec, targets: Sequence[KVCacheSpec], every_replica: bool = False) -> set[int]:
    """Indices of ``targets`` that a pipe on rank ``source`` exchanges heads with (KVPipe's own rank mapping):
    one replica of each replicated head (what a pull reads), or with ``every_replica`` all of them (what a push
    writes, KVPipe.write_routes)."""
    return {route.remote for route in route_heads(source, list(targets), every_replica)}


def group_specs(spec: KVCacheSpec, size: int) -> list[KVCacheSpec]:
    """The specs of every rank of a TP group whose rank ``spec.tp_rank`` has ``spec`` (ranks differ only there)."""
    return [spec.replace(tp_rank=rank, tp_size=size) for rank in range(size)]
