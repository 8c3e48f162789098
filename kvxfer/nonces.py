"""Single-use handshake nonces: each authenticated handshake message is accepted once, within bounded memory.

A nonce is 16 bytes: the sender's wall-clock time in ns (8 bytes, big-endian) then 8 random bytes, so that a
receiver can refuse old ones by their stamp instead of remembering them for ever. :class:`NonceBook` accepts a
nonce when its stamp is within ``max_age`` seconds (and at most a minute in the future: clock skew) and it was not
seen before. It remembers at most ``capacity`` nonces; when full it forgets the oldest and from then on refuses
every stamp at or before the forgotten one, so a replay is refused either way (by memory or by the floor).
Used by the side-channel server (request nonces) and by ``Agent.connect(meta, token=...)`` (signed envelopes).
"""

from __future__ import annotations

import heapq
import os
import struct
import threading
import time

NONCE_NBYTES = 16
_STAMP = struct.Struct("!Q")
CLOCK_SKEW_NS = 60 * 10**9


def fresh_nonce() -> bytes:
    """A new nonce stamped now."""
    return _STAMP.pack(time.time_ns()) + os.urandom(NONCE_NBYTES - _STAMP.size)


def nonce_stamp(nonce: bytes) -> int:
    """The wall-clock time (ns) a nonce was stamped with."""
    return int(_STAMP.unpack_from(nonce)[0])


class NonceBook:
    """The nonces accepted in the last ``max_age`` seconds (at most ``capacity`` of them)."""

    def __init__(self, capacity: int, max_age: float) -> None:
        self._capacity = capacity
        self._max_age_ns = int(max_age * 1e9)
        self._heap: list[tuple[int, bytes]] = []  # (stamp, nonce), oldest first
        self._seen: set[bytes] = set()
        self._floor = -1  # stamps at or before it are refused (forgotten to stay within capacity)
        self._lock = threading.Lock()

    def refusal(self, nonce: bytes, stamp: int | None = None) -> str | None:
        """None when ``nonce`` (stamped ``stamp``; default: its own first 8 bytes) is fresh and not seen before,
        and remember it; else why it is refused."""
        if len(nonce) != NONCE_NBYTES:
            return f"a nonce must be {NONCE_NBYTES} bytes, got {len(nonce)}"
        stamp = nonce_stamp(nonce) if stamp is None else stamp
        now = time.time_ns()
        if now - stamp > self._max_age_ns or stamp - now > CLOCK_SKEW_NS:
            return f"its nonce is stamped {(now - stamp) / 1e9:.1f} s ago; accepted: up to {self._max_age_ns / 1e9} s"
        with self._lock:
            while self._heap and self._heap[0][0] < now - self._max_age_ns:
                self._seen.discard(heapq.heappop(self._heap)[1])
            if nonce in self._seen:
                return "its nonce was used before (a replay): each handshake is accepted once"
            if stamp <= self._floor:
                return (
                    "its nonce is older than the ones this agent still remembers (a replay, or a flood of handshakes)"
                )
            if len(self._seen) >= self._capacity:
                oldest, forgotten = heapq.heappop(self._heap)
                self._seen.discard(forgotten)
                self._floor = max(self._floor, oldest)
                if stamp <= self._floor:
                    return "its nonce is older than the ones this agent still remembers (a flood of handshakes)"
            heapq.heappush(self._heap, (stamp, bytes(nonce)))
            self._seen.add(bytes(nonce))
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
