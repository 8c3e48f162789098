"""Descriptor lists: struct-of-arrays spans of registered memory, built and checked without a loop per entry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import DescriptorError, RegistrationError
from .memory import Region, RemoteRegion
from .spec import KVCacheSpec

_U64_MAX = np.uint64(2**64 - 1)


class Descs:
    """A list of memory spans, as parallel arrays.

    ``addr``: uint64[n] absolute addresses (in the owning agent's address space), ``nbytes``: uint64[n],
    ``device``: int32[n] (-1 for host), ``region``: int32[n] index of the region in its owner's table.
    ``space`` is the owner of those regions: the local :class:`~kvxfer.agent.Agent` or a remote ``Peer``.
    Build with :meth:`from_ranges` or :meth:`from_blocks`; index with ints, slices or int arrays.
    """

    __slots__ = ("addr", "device", "nbytes", "region", "space")

    def __init__(
        self, addr: np.ndarray, nbytes: np.ndarray, device: np.ndarray, region: np.ndarray, space: Any
    ) -> None:
        self.addr = np.asarray(addr, dtype=np.uint64)
        self.nbytes = np.asarray(nbytes, dtype=np.uint64)
        self.device = np.asarray(device, dtype=np.int32)
        self.region = np.asarray(region, dtype=np.int32)
        self.space = space
        n = len(self.addr)
        if not (self.addr.ndim == 1 and all(a.shape == (n,) for a in (self.nbytes, self.device, self.region))):
            raise DescriptorError(
                f"Descs arrays must be 1-D of one length, got {[a.shape for a in (self.addr, self.nbytes)]}"
            )

    # ---- builders ----------------------------------------------------------------------------------------------

    @classmethod
    def from_ranges(cls, region: Region | RemoteRegion, offsets: Any, nbytes: Any) -> Descs:
        """Spans ``[offsets[i], offsets[i] + nbytes[i])`` of one region.

        ``offsets``: int64[n] host array of byte offsets from the region start; ``nbytes``: an int or int64[n].
        """
        space = _space_of(region)
        offsets_array = _as_int_array(offsets, "offsets")
        sizes = _as_int_array(nbytes, "nbytes", like=offsets_array)
        if offsets_array.size and int(offsets_array.min()) < 0:
            raise DescriptorError(f"offsets must be >= 0, got {int(offsets_array.min())}")
        if sizes.size and int(sizes.min()) <= 0:
            raise DescriptorError(f"nbytes must be > 0, got {int(sizes.min())}")
        if sizes.size:
            # offsets + nbytes would overflow int64 only past 2**63; compare by subtraction instead.
            room = region.nbytes - offsets_array
            outside = np.flatnonzero(sizes > room)
            if outside.size:
                i = int(outside[0])
                raise DescriptorError(
                    f"descriptor {i} (offset {int(offsets_array[i])}, nbytes {int(sizes[i])}) lies outside region "
                    f"{region.name!r} of {region.nbytes} bytes"
                )
        return cls._of_region(region, space, offsets_array, sizes)

    @classmethod
    def from_blocks(
        cls,
        region: Region | RemoteRegion,
        spec: KVCacheSpec,
        block_ids: Any,
        *,
        layers: Any = None,
        heads: tuple[int, int] | None = None,
        parts: Any = None,
    ) -> Descs:
        """The contiguous pieces of KV blocks ``block_ids`` (int[n], host) of a cache laid out by ``spec``.

        ``layers`` (ids, range or slice), ``heads`` (local head range) and ``parts`` (0 = K, 1 = V) narrow the
        selection. Order: layer, block (as given), part, piece — the same on every side for the same arguments.
        """
        space = _space_of(region)
        spec.check_fits(region.nbytes, argument=f"region {region.name!r}")
        spec.check_itemsize(region.itemsize, "spec", f"region {region.name!r}")
        if region.addr == 0:  # start=0 would mean offsets; a region at address 0 exists only in tests of raw ptrs
            offsets, piece_nbytes = spec.block_offsets(block_ids, layers=layers, heads=heads, parts=parts)
            return cls._of_region(region, space, offsets, np.full(offsets.shape, piece_nbytes, dtype=np.int64))
        addr, piece_nbytes = spec.block_offsets(block_ids, layers=layers, heads=heads, parts=parts, start=region.addr)
        n = addr.shape[0]
        return cls(
            addr,
            np.full(n, piece_nbytes, dtype=np.uint64),
            np.full(n, region.device, dtype=np.int32),
            np.full(n, region.index, dtype=np.int32),
            space,
        )

    @classmethod
    def _of_region(cls, region: Region | RemoteRegion, space: Any, offsets: np.ndarray, sizes: np.ndarray) -> Descs:
        n = offsets.shape[0]
        return cls(
            offsets.astype(np.uint64) + np.uint64(region.addr),
            sizes.astype(np.uint64),
            np.full(n, region.device, dtype=np.int32),
            np.full(n, region.index, dtype=np.int32),
            space,
        )

    @classmethod
    def concat(cls, parts: Iterable[Descs]) -> Descs:
        """One list of all of ``parts`` (which must share an owner)."""
        items = list(parts)
        if not items:
            raise DescriptorError("Descs.concat needs at least one Descs")
        spaces = {id(d.space) for d in items}
        if len(spaces) != 1:
            raise DescriptorError("Descs.concat: all parts must describe regions of one agent or one peer")
        return cls(
            np.concatenate([d.addr for d in items]),
            np.concatenate([d.nbytes for d in items]),
            np.concatenate([d.device for d in items]),
            np.concatenate([d.region for d in items]),
            items[0].space,
        )

    # ---- views -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.addr.shape[0])

    def __getitem__(self, index: Any) -> Descs:
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            n = len(self)
            if not -n <= int(index) < n:
                raise IndexError(f"Descs index {int(index)} out of range for {n} descriptors")
            position = int(index) % n
            index = slice(position, position + 1)
        elif not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype.kind not in "iub":
                raise DescriptorError(f"Descs index must be ints, a slice or a bool mask, got dtype {index.dtype}")
            if (
                index.dtype.kind != "b"
                and index.size
                and (int(index.min()) < -len(self) or int(index.max()) >= len(self))
            ):
                raise DescriptorError(f"Descs index out of range for {len(self)} descriptors")
        return Descs(self.addr[index], self.nbytes[index], self.device[index], self.region[index], self.space)

    @property
    def total_nbytes(self) -> int:
        """Sum of all spans."""
        return int(self.nbytes.sum(dtype=np.uint64))

    def __repr__(self) -> str:
        return f"Descs(n={len(self)}, nbytes={self.total_nbytes}, owner={getattr(self.space, 'name', '?')!r})"


def coalesce_pairs(local: Descs, remote: Descs) -> tuple[Descs, Descs]:
    """Merge neighbours i, i+1 that are adjacent on both sides (same regions). Vectorized; order is kept.

    ``local`` and ``remote`` have equal sizes pairwise (checked before). A backwards neighbour's address difference
    wraps around 2**64 and so never equals a size.
    """
    n = len(local)
    if n < 2:
        return local, remote
    sizes = local.nbytes
    joined = (local.addr[1:] - local.addr[:-1]) == sizes[:-1]
    joined &= (remote.addr[1:] - remote.addr[:-1]) == sizes[:-1]
    for regions in (local.region, remote.region):
        if not _uniform(regions):
            joined &= regions[1:] == regions[:-1]
    if not joined.any():
        return local, remote
    starts = np.flatnonzero(np.concatenate(([True], ~joined)))
    local_addr = local.addr[starts]
    # A run's size: its piece count times the piece size, or its last piece's end minus its start (np.add.reduceat
    # costs ~15x more for runs of 2, the K/V pairs of a block).
    if _uniform(sizes):
        merged = np.diff(starts, append=n).astype(np.uint64) * sizes[0]
    else:
        last = np.empty_like(starts)
        last[:-1], last[-1] = starts[1:] - 1, n - 1
        merged = local.addr[last] + sizes[last] - local_addr
    return (
        Descs(local_addr, merged, _take(local.device, starts), _take(local.region, starts), local.space),
        Descs(remote.addr[starts], merged, _take(remote.device, starts), _take(remote.region, starts), remote.space),
    )


def _uniform(values: np.ndarray) -> bool:
    """True if every entry equals the first (one region: the common case)."""
    return bool(values.size == 0 or (values.min() == values.max()))


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]``; a fill when every value is the same (cheaper than a gather)."""
    if values.size and _uniform(values):
        return np.full(index.shape, values[0], dtype=values.dtype)
    return values[index]


def check_no_overlap(descs: Descs, argument: str) -> None:
    """DescriptorError if any two destination spans share a byte (they would be written twice)."""
    n = len(descs)
    if n < 2:
        return
    addr, ends = descs.addr, descs.addr + descs.nbytes
    if not bool(np.all(ends[:-1] <= addr[1:])):  # the common, already sorted case costs one pass
        order = np.argsort(addr, kind="stable")
        addr, ends = addr[order], ends[order]
        clash = np.flatnonzero(ends[:-1] > addr[1:])
        if clash.size:
            i = int(clash[0])
            raise DescriptorError(
                f"{argument}: destination spans overlap (at address {int(addr[i + 1]):#x}); one transfer may not "
                "write a byte twice (duplicate destination blocks?)"
            )


def _space_of(region: Region | RemoteRegion) -> Any:
    if isinstance(region, RemoteRegion):
        return region.peer
    if isinstance(region, Region):
        if not region.registered:
            raise RegistrationError(f"region {region.name!r} is not registered with an agent")
        return region.agent
    raise DescriptorError(f"region must be a Region or RemoteRegion, got {type(region).__name__}")


def _as_int_array(values: Any, argument: str, like: np.ndarray | None = None) -> np.ndarray:
    if like is not None and isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        return np.full(like.shape, int(values), dtype=np.int64)
    array = np.asarray(values)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise DescriptorError(f"{argument} must be a 1-D integer array, got shape {array.shape} dtype {array.dtype}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise DescriptorError(f"{argument} overflows int64: {int(array.max())}")
    array = array.astype(np.int64, copy=False)
    if like is not None and array.shape != like.shape:
        raise DescriptorError(f"{argument} must have {like.shape[0]} entries (one per offset), got {array.shape[0]}")
    return array
