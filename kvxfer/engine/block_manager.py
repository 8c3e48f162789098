"""Block allocation with reference counts, and prefix caching by a hash chain over full blocks.

A full block's hash covers its tokens and, through its predecessor's hash, every token before it, so equal hashes
mean equal prefixes. A block whose last reference is dropped keeps its hash and contents ("cached") until the
allocator needs it: fresh allocations take never-hashed free blocks first, then evict cached ones least recently
used first. Nothing here touches torch: the manager only hands out block ids.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

from ..errors import ConfigError, OutOfBlocksError, UsageError

_ROOT = b"kvxfer-prefix-v1"


def block_hashes(token_ids: Sequence[int], block_size: int, previous: bytes = _ROOT) -> list[bytes]:
    """Hash chain of the full blocks of ``token_ids`` (a partial last block gets no hash). Stable across processes.

    ``previous`` is the hash of the block before ``token_ids[0]`` (default: the start of a sequence).
    """
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(b",".join(str(int(t)).encode() for t in token_ids[start : start + block_size]))
        previous = digest.digest()
        hashes.append(previous)
    return hashes


class BlockManager:
    """Hands out ids of ``num_blocks`` blocks of ``block_size`` tokens, with reference counts.

    With ``enable_prefix_caching`` the full blocks passed to :meth:`commit` are registered by hash, and
    :meth:`match_prefix` finds them for later requests with the same prefix.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"BlockManager: num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._empty: deque[int] = deque(range(num_blocks))  # free, no hash
        self._cached: OrderedDict[int, None] = OrderedDict()  # free, hashed; oldest first
        self._by_hash: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks with no reference (including cached ones that may be evicted)."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Free blocks still holding a registered prefix."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Ids of cached blocks holding the longest prefix of ``token_ids`` in full blocks (no reference taken).

        At most ``max_tokens`` tokens are matched (whole blocks): engines pass ``len(prompt) - 1`` so at least one
        token is computed and yields logits.
        """
        if not self.enable_prefix_caching:
            return []
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        matched = []
        for digest in block_hashes(token_ids[: limit - limit % self.block_size], self.block_size):
            block = self._by_hash.get(digest)
            if block is None:
                break
            matched.append(block)
        return matched

    def allocate(self, num_blocks: int, prefix: Sequence[int] = ()) -> list[int]:
        """Take a reference on the ``prefix`` blocks (from :meth:`match_prefix`) and on ``num_blocks`` fresh ones.

        Returns ``list(prefix) + fresh``. All or nothing: raises OutOfBlocksError (and changes nothing) when fewer
        than ``num_blocks`` blocks are free once the prefix blocks are taken.
        """
        revived = sum(1 for block in prefix if self._refs[block] == 0)
        available = self.num_free - revived
        if num_blocks > available:
            raise OutOfBlocksError(
                f"KV cache: need {num_blocks} free blocks, {available} available "
                f"({self.num_blocks} in all, {self.num_blocks - self.num_free} in use)",
                needed=num_blocks,
                available=available,
            )
        for block in prefix:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        return list(prefix) + [self._take_fresh() for _ in range(num_blocks)]

    def _take_fresh(self) -> int:
        if self._empty:
            block = self._empty.popleft()
        else:
            block, _ = self._cached.popitem(last=False)
            self._forget(block)
            self.num_evictions += 1
        self._refs[block] = 1
        return block

    def _forget(self, block: int) -> None:
        digest = self._hash[block]
        if digest is not None and self._by_hash.get(digest) == block:
            del self._by_hash[digest]
        self._hash[block] = None

    def commit(self, block_ids: Sequence[int], token_ids: Sequence[int], num_tokens: int) -> None:
        """Register the full blocks among the first ``num_tokens`` tokens, whose K/V are now in the cache.

        ``block_ids`` hold ``token_ids`` in order. Call only once the blocks' contents are final (after compute,
        or after an external transfer finished): a registered block is served to later requests as is.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, len(token_ids)) // self.block_size
        first = num_full  # blocks are committed in order: find the first one without a hash
        while first > 0 and self._hash[block_ids[first - 1]] is None:
            first -= 1
        previous = self._hash[block_ids[first - 1]] if first else _ROOT
        assert previous is not None  # the loop above stopped at a hashed block (or the root)
        tokens = token_ids[first * self.block_size : num_full * self.block_size]
        for index, digest in enumerate(block_hashes(tokens, self.block_size, previous), start=first):
            block = block_ids[index]
            self._hash[block] = digest
            # A prefix computed twice concurrently: the first block keeps the entry, this one stays private.
            self._by_hash.setdefault(digest, block)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block. Tail blocks are freed first so prefixes are evicted last."""
        for block in reversed(block_ids):
            if self._refs[block] <= 0:
                raise UsageError(f"BlockManager.free: block {block} has no reference to drop (double free)")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                digest = self._hash[block]
                if digest is not None and self._by_hash.get(digest) == block:
                    self._cached[block] = None
                else:
                    self._hash[block] = None
                    self._empty.append(block)

    def append(self, block_ids: list[int], num_tokens: int) -> None:
        """Grow ``block_ids`` in place until it holds ``num_tokens`` tokens (OutOfBlocksError if it cannot)."""
        missing = self.blocks_for(num_tokens) - len(block_ids)
        if missing > 0:
            block_ids.extend(self.allocate(missing))
