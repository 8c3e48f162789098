"""Transfer plans: local descriptors paired with one peer's, validated and coalesced once, posted many times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .backends.base import prepare_plan
from .descs import Descs, check_no_overlap, coalesce_pairs
from .errors import ConfigError, DescriptorError, UsageError

if TYPE_CHECKING:
    from .agent import Agent
    from .backends.base import Backend, Op
    from .memory import MemoryKind, Region
    from .peer import Peer


class RegionTable:
    """Sorted region indices with their spans, to check many descriptors against many regions at once."""

    def __init__(
        self,
        indices: Sequence[int],
        addrs: Sequence[int],
        nbytes: Sequence[int],
        kinds: Sequence[MemoryKind] | None = None,
    ) -> None:
        order = np.argsort(np.asarray(indices, dtype=np.int64))
        self.indices = np.asarray(indices, dtype=np.int64)[order]
        self.addr = np.asarray(addrs, dtype=np.uint64)[order]
        self.end = self.addr + np.asarray(nbytes, dtype=np.uint64)[order]
        self.kinds = None if kinds is None else [kinds[i] for i in order]

    def check(self, descs: Descs, argument: str, owner: str) -> set[MemoryKind]:
        """DescriptorError naming the first descriptor of ``descs`` that is not inside a registered region;
        otherwise the set of memory kinds the descriptors' regions live in."""
        if not len(self.indices):
            raise DescriptorError(f"{argument}: {owner} has no registered region")
        if len(self.indices) == 1 and self._inside_one(descs):  # the common case: a few reductions, no search
            return {self.kinds[0]} if self.kinds is not None else set()
        if len(self.indices) == 1:
            position = np.zeros(1, dtype=np.intp)
            known = descs.region == self.indices[0]
            low, high = self.addr[0], self.end[0]
        else:
            position = np.minimum(np.searchsorted(self.indices, descs.region), len(self.indices) - 1)
            known = self.indices[position] == descs.region
            low, high = self.addr[position], self.end[position]
        # Compare by subtraction: addr + nbytes could wrap around 2**64 (and high - addr must not underflow).
        inside = known & (descs.addr >= low) & (descs.addr <= high) & (descs.nbytes <= high - descs.addr)
        if not inside.all():
            i = int(np.flatnonzero(~inside)[0])
            why = "names an unknown or deregistered region" if not known[i] else "lies outside its region"
            raise DescriptorError(
                f"{argument}[{i}] (addr {int(descs.addr[i]):#x}, nbytes {int(descs.nbytes[i])}, region "
                f"{int(descs.region[i])}) {why} of {owner}"
            )
        used = np.flatnonzero(np.bincount(position.ravel(), minlength=len(self.indices)))
        return {self.kinds[int(p)] for p in used} if self.kinds is not None else set()

    def _inside_one(self, descs: Descs) -> bool:
        """True if every descriptor lies inside the only region (False: check piece by piece, to name the first)."""
        if not len(descs):
            return True
        regions, addr = descs.region, descs.addr
        if not (regions.min() == regions.max() == self.indices[0]):
            return False
        ends = addr + descs.nbytes
        # No wrap-around (every end above its start), then the extremes decide.
        return bool(addr.min() >= self.addr[0] and ends.max() <= self.end[0] and (ends > addr).all())


class TransferPlan:
    """Local :class:`Descs` paired i <-> i with a peer's, validated once.

    ``prepared_local`` / ``prepared_remote`` are the lists as given (what :meth:`select` indexes);
    ``local`` / ``remote`` are the coalesced pairs a backend moves. Build with :meth:`Agent.plan`.
    """

    def __init__(
        self, agent: Agent, peer: Peer, backend: Backend, local: Descs, remote: Descs, coalesce: bool = True
    ) -> None:
        self.agent = agent
        self.peer = peer
        self.backend = backend
        self.prepared_local = local
        self.prepared_remote = remote
        self.local, self.remote = coalesce_pairs(local, remote) if coalesce else (local, remote)
        self.nbytes = local.total_nbytes
        self.local_regions = _unique_regions(self.local)
        self.remote_regions = _unique_regions(self.remote)
        self.on_device = bool((self.local.device >= 0).any() or (self.remote.device >= 0).any())
        self._checked_ops: set[str] = set()

    def local_regions_objects(self) -> list[Region]:
        """The local Region objects this plan touches."""
        return [self.agent.region_at(i) for i in self.local_regions]

    def __len__(self) -> int:
        """Number of coalesced pairs the backend moves."""
        return len(self.local)

    def select(self, local_idx: Sequence[int] | np.ndarray, remote_idx: Sequence[int] | np.ndarray) -> TransferPlan:
        """A plan pairing ``prepared_local[local_idx[k]]`` with ``prepared_remote[remote_idx[k]]``.

        ``local_idx``, ``remote_idx``: int[n] host arrays of equal length. Entries are checked for range and
        equal sizes; the regions were validated when this plan was built.
        """
        local_ids, remote_ids = (
            _indices(local_idx, "local_idx", self.prepared_local),
            _indices(remote_idx, "remote_idx", self.prepared_remote),
        )
        if local_ids.shape != remote_ids.shape:
            raise DescriptorError(f"local_idx has {local_ids.size} entries, remote_idx has {remote_ids.size}")
        local, remote = self.prepared_local[local_ids], self.prepared_remote[remote_ids]
        check_pair_sizes(local, remote)
        plan = TransferPlan(self.agent, self.peer, self.backend, local, remote)
        prepare_plan(self.backend, plan)
        return plan

    def check_destination(self, op: Op | str) -> None:
        """DescriptorError if the destination side of ``op`` (an Op, or "read" / "write") writes a byte twice
        (checked once per op)."""
        key = str(op)  # an Op's str is its value
        if key in self._checked_ops:
            return
        if key not in ("read", "write"):
            raise ConfigError(f"op must be 'read' or 'write', got {op!r}")
        if key == "read":
            check_no_overlap(self.local, "local_descs (destination of a read)")
        else:
            check_no_overlap(self.remote, "remote_descs (destination of a write)")
        self._checked_ops.add(key)

    def check_owner(self, agent: Agent) -> None:
        """UsageError unless this plan was built by ``agent`` for a peer that is still connected."""
        if agent is not self.agent:
            raise UsageError(f"plan was built by agent {self.agent.name!r}, not {agent.name!r}")
        if not self.peer.connected:
            raise UsageError(f"plan's peer {self.peer.name!r} is disconnected; connect again and rebuild the plan")

    def __repr__(self) -> str:
        return (
            f"TransferPlan(peer={self.peer.name!r}, backend={self.backend.caps.name}, pairs={len(self)}, "
            f"nbytes={self.nbytes})"
        )


def _unique_regions(descs: Descs) -> tuple[int, ...]:
    first = int(descs.region[0]) if len(descs) else -1
    if bool((descs.region == first).all()):  # usually one region: skip the sort np.unique does
        return (first,)
    return tuple(int(r) for r in np.unique(descs.region))


def check_pair_sizes(local: Descs, remote: Descs) -> None:
    """DescriptorError unless the two lists have equal lengths and equal sizes pairwise."""
    if len(local) != len(remote):
        raise DescriptorError(f"local_descs has {len(local)} descriptors, remote_descs has {len(remote)}")
    if len(local) == 0:
        raise DescriptorError("a plan needs at least one descriptor pair, got none")
    differ = local.nbytes != remote.nbytes
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        raise DescriptorError(
            f"descriptor pair {i}: local nbytes {int(local.nbytes[i])} != remote nbytes {int(remote.nbytes[i])}"
        )


def _indices(values: Sequence[int] | np.ndarray, argument: str, descs: Descs) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise DescriptorError(f"{argument} must be a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= len(descs)):
        bad = int(array.min()) if int(array.min()) < 0 else int(array.max())
        raise DescriptorError(f"{argument} must lie in [0, {len(descs)}), got {bad}")
    return array.astype(np.int64, copy=False)
