"""Router-side approximate KV index: which prompt block hashes each worker probably holds in its prefix cache.

The router records a request's block hashes against the worker it sent the request to; a later request with the same
prefix then finds that worker's overlap with :meth:`PrefixIndex.matched_blocks`. It is approximate: workers evict
blocks without telling the router, and the index forgets entries on its own bound (least recently used first).

Hashes are the engine's (``kvxfer.engine.block_hashes``): a blake2b chain over full blocks of token ids, so the
router's "cached" matches the workers' prefix caches. :func:`block_hashes` here is the same function in pure Python,
so that the router need not import the engine package (and with it torch); a test asserts both agree.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from ..errors import ConfigError

ROOT = b"kvxfer-prefix-v1"  # the engine's chain start (kvxfer/engine/block_manager.py)


def block_hashes(token_ids: Sequence[int], block_size: int, previous: bytes = ROOT) -> list[bytes]:
    """Hash chain of the full blocks of ``token_ids`` (a partial last block gets no hash); equal to the engine's
    ``kvxfer.engine.block_hashes`` for the same arguments."""
    if block_size < 1:
        raise ConfigError(f"block_hashes: block_size expected >= 1, got {block_size}")
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(",".join(map(str, map(int, token_ids[start:start + block_size]))).encode())
        previous = digest.digest()
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Bounded map worker -> block hashes it probably caches; at most ``max_entries`` (worker, hash) pairs in all,
    the least recently recorded evicted first.

    :meth:`record` touches a chain's blocks from the last to the first, so a block is always at least as recent as
    every block after it in any chain recorded with it: eviction takes chain tails first and what stays cached for a
    worker is closed under prefixes. That is what lets :meth:`matched_blocks` binary-search the longest cached prefix
    (O(log n) lookups). Pass whole chains from the start of a sequence, as :func:`block_hashes` returns them.
    Not thread-safe: the router uses it from one event loop.
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"PrefixIndex.max_entries: expected an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._lru: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._by_worker: dict[str, set[bytes]] = {}
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def workers(self) -> list[str]:
        """Names of the workers with at least one entry, sorted."""
        return sorted(name for name, hashes in self._by_worker.items() if hashes)

    def num_blocks(self, worker: str) -> int:
        """How many block hashes are recorded for ``worker``."""
        return len(self._by_worker.get(worker, ()))

    def record(self, worker: str, hashes: Sequence[bytes]) -> None:
        """Note that ``worker`` now caches the chain ``hashes`` (from the start of a sequence); evicts beyond the
        bound."""
        cached = self._by_worker.setdefault(worker, set())
        lru = self._lru
        for digest in reversed(hashes):
            key = (worker, digest)
            if digest in cached:
                lru.move_to_end(key)
            else:
                cached.add(digest)
                lru[key] = None
        excess = len(lru) - self.max_entries
        for _ in range(max(excess, 0)):
            (name, digest), _none = lru.popitem(last=False)
            self._by_worker[name].discard(digest)
        if excess > 0:
            self.num_evictions += excess

    def matched_blocks(self, worker: str, hashes: Sequence[bytes]) -> int:
        """Length in blocks of the longest prefix of ``hashes`` recorded for ``worker`` (0 if none)."""
        cached = self._by_worker.get(worker)
        if not cached:
            return 0
        low, high = 0, len(hashes)  # hashes[:low] cached, hashes[high:] not (the set is prefix-closed)
        while low < high:
            middle = (low + high + 1) // 2
            if hashes[middle - 1] in cached:
                low = middle
            else:
                high = middle - 1
        return low

    def matched(self, workers: Iterable[str], hashes: Sequence[bytes]) -> dict[str, int]:
        """:meth:`matched_blocks` for each of ``workers`` (the ``cached_blocks`` argument of ``policy.route``)."""
        return {name: self.matched_blocks(name, hashes) for name in workers}

    def forget(self, worker: str) -> int:
        """Drop every entry of ``worker`` (it left, or restarted with an empty cache); returns how many."""
        cached = self._by_worker.pop(worker, set())
        for digest in cached:
            del self._lru[(worker, digest)]
        return len(cached)
