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
import threading
from collections import deque
from collections.abc import Iterable, Sequence

from ..errors import ConfigError

ROOT = b"kvxfer-prefix-v1"  # the engine's chain start (kvxfer/engine/block_manager.py)


def block_hashes(token_ids: Sequence[int], block_size: int, previous: bytes = ROOT) -> list[bytes]:
    """Hash chain of the full blocks of ``token_ids`` (a partial last block gets no hash); equal to the engine's
    ``kvxfer.engine.block_hashes`` for the same arguments (a test asserts it), about 3x faster: token ids in
    ``[0, 2**18)`` take their decimal text from a table instead of formatting each one."""
    if block_size < 1:
        raise ConfigError(f"block_hashes: block_size expected >= 1, got {block_size}")
    count = len(token_ids) - len(token_ids) % block_size
    if count == 0:
        return []
    texts = _token_texts(token_ids[:count])
    blake2b = hashlib.blake2b
    hashes = []
    for start in range(0, count, block_size):
        digest = blake2b(previous, digest_size=16)
        digest.update(b",".join(texts[start : start + block_size]))
        previous = digest.digest()
        hashes.append(previous)
    return hashes


_TABLE_LIMIT = 1 << 18
_TEXTS: list[bytes] = []  # _TEXTS[i] == str(i).encode(), grown on demand up to _TABLE_LIMIT
_TEXTS_LOCK = threading.Lock()


def _token_texts(token_ids: Sequence[int]) -> list[bytes]:
    """``str(int(t)).encode()`` of every id, as the engine formats them."""
    try:
        low, high = min(token_ids), max(token_ids)
        if 0 <= low and high < _TABLE_LIMIT:
            if high >= len(_TEXTS):
                with _TEXTS_LOCK:  # grown once per size, by one thread, so entries never interleave
                    if high >= len(_TEXTS):
                        _TEXTS.extend([str(i).encode() for i in range(len(_TEXTS), max(int(high) + 1, 65536))])
            return list(map(_TEXTS.__getitem__, token_ids))  # numpy ints index too (__index__)
    except TypeError:  # not ints (floats, strings): the general path below formats them like the engine
        pass
    return [str(int(t)).encode() for t in token_ids]


class PrefixIndex:
    """Bounded map worker -> block hashes it probably caches; at most ``max_entries`` (worker, hash) pairs in all,
    the least recently recorded evicted first.

    Recency is kept per :meth:`record` call: every block of the recorded chain takes the call's stamp, and eviction
    takes the oldest stamp first, and within one stamp the chain's tail first. So a block is never older than a
    block after it in any chain recorded with it, what stays cached for a worker is closed under prefixes, and
    :meth:`matched_blocks` can binary-search the longest cached prefix (O(log n) lookups). Pass whole chains from
    the start of a sequence, as :func:`block_hashes` returns them. A record costs one C-level dict update plus the
    evictions it causes (amortised O(1) each). Memory: about 155 bytes an entry (40 MB at the default bound);
    workers cannot cache more blocks than they have, so a bound near the sum of their ``num_blocks`` loses nothing.
    Not thread-safe: the router uses it from one event loop.
    """

    def __init__(self, max_entries: int = 262_144) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"PrefixIndex.max_entries: expected an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._by_worker: dict[str, dict[bytes, int]] = {}  # worker -> {hash: stamp of the record that last had it}
        # One event per record, oldest first: [stamp, worker, chain, blocks of the chain not yet looked at].
        self._events: deque[_Event] = deque()
        self._compact_at = 1024
        self._stamp = 0
        self._size = 0
        self.num_evictions = 0

    def __len__(self) -> int:
        return self._size

    def workers(self) -> list[str]:
        """Names of the workers with at least one entry, sorted."""
        return sorted(name for name, hashes in self._by_worker.items() if hashes)

    def num_blocks(self, worker: str) -> int:
        """How many block hashes are recorded for ``worker``."""
        return len(self._by_worker.get(worker, ()))

    def record(self, worker: str, hashes: Sequence[bytes]) -> None:
        """Note that ``worker`` now caches the chain ``hashes`` (from the start of a sequence); evicts beyond the
        bound."""
        if not hashes:
            return
        self._stamp += 1
        cached = self._by_worker.setdefault(worker, {})
        before = len(cached)
        cached.update(dict.fromkeys(hashes, self._stamp))
        self._size += len(cached) - before
        chain = hashes if isinstance(hashes, tuple) else tuple(hashes)  # kept: the caller may reuse its list
        self._events.append(_Event(self._stamp, worker, chain, len(chain)))
        if self._size > self.max_entries:
            self._evict(self._size - self.max_entries)
        if len(self._events) > self._compact_at:
            self._compact()

    def matched_blocks(self, worker: str, hashes: Sequence[bytes]) -> int:
        """Length in blocks of the longest prefix of ``hashes`` recorded for ``worker`` (0 if none)."""
        cached = self._by_worker.get(worker)
        if not cached or not hashes or hashes[0] not in cached:
            return 0
        if hashes[-1] in cached:
            return len(hashes)
        low, high = 1, len(hashes) - 1  # hashes[:low] cached, hashes[high:] not (the set is prefix-closed)
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
        cached = self._by_worker.pop(worker, {})
        self._size -= len(cached)
        return len(cached)

    def _evict(self, count: int) -> None:
        # What an event still owns is a tail of its chain: a block recorded again later took its whole prefix
        # with it (records are whole chains), so the first block from the tail that the event does not own ends
        # its part. Each block is looked at once: O(evicted + events).
        events, by_worker = self._events, self._by_worker
        evicted = 0
        while evicted < count:
            event = events[0]
            cached = by_worker.get(event.worker)
            chain, stamp, left = event.chain, event.stamp, event.left
            if cached is not None:
                while left > 0 and evicted < count:
                    digest = chain[left - 1]
                    if cached.get(digest) != stamp:
                        left = 0
                        break
                    del cached[digest]
                    left -= 1
                    evicted += 1
            event.left = left
            if left == 0 or cached is None:
                events.popleft()
        self._size -= evicted
        self.num_evictions += evicted

    def _compact(self) -> None:
        """Drop events that own no block any more (re-recorded later, evicted, or their worker forgotten)."""
        by_worker = self._by_worker
        kept: deque[_Event] = deque()
        for event in self._events:
            cached = by_worker.get(event.worker)
            if cached is not None and event.left > 0 and cached.get(event.chain[event.left - 1]) == event.stamp:
                kept.append(event)
        self._events = kept
        self._compact_at = max(1024, 2 * len(kept))


class _Event:
    """One :meth:`PrefixIndex.record` call: its stamp, worker, chain, and how many of the chain's blocks (from the
    start) eviction has not looked at yet."""

    __slots__ = ("chain", "left", "stamp", "worker")

    def __init__(self, stamp: int, worker: str, chain: Sequence[bytes], left: int) -> None:
        self.stamp, self.worker, self.chain, self.left = stamp, worker, chain, left
