"""An agent's table of registered regions: names, indices, and how many transfers in flight use each."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

from .errors import ConfigError, RegistrationError
from .memory import Region
from .plan import RegionTable


class RegionRegistry:
    """Regions by index. Indices are never reused, so a stale descriptor can never alias a new region."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[int, Region] = {}
        self._next_index = 0
        self._pins: Counter[int] = Counter()
        self._table: RegionTable | None = None

    def add(self, region: Region, name: str | None) -> int:
        """Give ``region`` an index and a unique name; return the index."""
        with self._lock:
            index = self._next_index
            name = f"region{index}" if name is None else name
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise ConfigError(f"name must be a string of 1..256 characters, got {name!r}")
            if any(r.name == name for r in self._regions.values()):
                raise RegistrationError(f"a region named {name!r} is already registered")
            self._next_index += 1
            region.name, region.index = name, index
            self._regions[index] = region
            self._table = None
            return index

    def check_no_overlap(self, region: Region, owner: str) -> None:
        """RegistrationError if ``region`` shares a byte with a registered region of the same memory kind."""
        for other in self.all():
            if other.kind is region.kind and other.addr < region.end and region.addr < other.end:
                raise RegistrationError(
                    f"[{region.addr:#x}, +{region.nbytes}) overlaps region {other.name!r} "
                    f"[{other.addr:#x}, +{other.nbytes}) already registered with {owner}: register one region "
                    "and describe parts with Descs"
                )

    def remove(self, index: int) -> None:
        """Forget the region at ``index``."""
        with self._lock:
            self._regions.pop(index, None)
            self._table = None

    def get(self, index: int) -> Region:
        """The region at ``index``; RegistrationError if there is none."""
        try:
            return self._regions[index]
        except KeyError:
            raise RegistrationError(f"no region is registered at index {index}") from None

    def all(self) -> list[Region]:
        """Registered regions in index order."""
        with self._lock:
            return [self._regions[i] for i in sorted(self._regions)]

    def table(self) -> RegionTable:
        """The spans of all registered regions, for vectorized descriptor checks (cached until a change)."""
        with self._lock:
            if self._table is None:
                regions = [self._regions[i] for i in sorted(self._regions)]
                self._table = RegionTable(
                    [r.index for r in regions],
                    [r.addr for r in regions],
                    [r.nbytes for r in regions],
                    [r.kind for r in regions],
                )
            return self._table

    def check_live(self, indices: Iterable[int]) -> None:
        """RegistrationError if any of ``indices`` was deregistered."""
        missing = [i for i in indices if i not in self._regions]
        if missing:
            raise RegistrationError(f"the plan uses region index {missing[0]}, which was deregistered")

    def pin(self, indices: Iterable[int]) -> None:
        """Count one more transfer in flight on each region."""
        with self._lock:
            self._pins.update(indices)

    def unpin(self, indices: Iterable[int]) -> None:
        """Count one fewer transfer in flight on each region."""
        with self._lock:
            self._pins.subtract(indices)

    def in_use(self, index: int) -> bool:
        """True while a transfer in flight uses the region."""
        return self._pins[index] > 0
