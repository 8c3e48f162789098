"""The router's prefill queue: bounded, three priority classes, FIFO within a class, requeue at most once.

Requests the policy sends to a prefill worker wait here until a prefill worker has room. ``put`` refuses beyond the
bound (:class:`~kvxfer.errors.QueueFullError`: backpressure, the API answers 429/503); ``remove`` takes out an
aborted request; ``requeue`` puts back a request whose prefill worker died, at the head of its class, once -- a
second time raises :class:`~kvxfer.errors.RequeueLimitError` and the router fails the request.

Every operation is O(1) (one ordered dict per class). Not thread-safe: the router calls it from its event loop only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import ConfigError, QueueFullError, RequeueLimitError, UsageError
from .policy import PRIORITIES, Priority

T = TypeVar("T")


@dataclass(slots=True)
class QueueEntry(Generic[T]):
    """One queued request: the caller's item, its class and its prompt tokens still to prefill."""

    request_id: str
    item: T
    priority: Priority
    num_tokens: int


def default_key(item: object) -> str:
    """The request id of ``item``: its ``request_id`` attribute, else its ``rid``."""
    key = getattr(item, "request_id", None)
    if key is None:
        key = getattr(item, "rid", None)
    if not isinstance(key, str):
        raise UsageError(f"PrefillQueue: item {item!r} has no str request_id or rid; pass key= to PrefillQueue")
    return key


class PrefillQueue(Generic[T]):
    """Bounded priority queue of requests waiting for a prefill worker (high before normal before low).

    ``put`` refuses once ``max_size`` requests wait; ``requeue`` may go up to ``requeue_headroom`` beyond it (a
    request that was already admitted is not dropped for backpressure), so ``len(q) <= max_size +
    requeue_headroom`` always. The ids of requeued requests are remembered (at most ``max_requeue_memory``, oldest
    forgotten first) until :meth:`release` says the request ended. ``key`` maps an item to its request id.
    Not thread-safe.
    """

    def __init__(
        self,
        max_size: int,
        key: Callable[[T], str] = default_key,
        requeue_headroom: int | None = None,
        max_requeue_memory: int = 65536,
    ) -> None:
        headroom = max_size if requeue_headroom is None else requeue_headroom
        for name, value in (
            ("max_size", max_size),
            ("requeue_headroom", headroom),
            ("max_requeue_memory", max_requeue_memory),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"PrefillQueue.{name}: expected an int >= 0, got {value!r}")
        self.max_size, self.requeue_headroom, self.max_requeue_memory = max_size, headroom, max_requeue_memory
        self._key = key
        self._classes: dict[Priority, OrderedDict[str, QueueEntry[T]]] = {p: OrderedDict() for p in PRIORITIES}
        self._where: dict[str, Priority] = {}
        self._requeued: OrderedDict[str, None] = OrderedDict()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._where

    def __iter__(self) -> Iterator[QueueEntry[T]]:
        """The queued entries in pop order (a snapshot)."""
        return iter([entry for priority in PRIORITIES for entry in self._classes[priority].values()])

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens of every queued request."""
        return self._tokens

    def by_priority(self) -> dict[Priority, int]:
        """Queued requests per class."""
        return {priority: len(self._classes[priority]) for priority in PRIORITIES}

    def put(self, item: T, priority: Priority = "normal", num_tokens: int = 0) -> None:
        """Queue ``item`` at the tail of its class; :class:`QueueFullError` when ``max_size`` requests wait."""
        if len(self._where) >= self.max_size:
            raise QueueFullError(
                f"prefill queue full: {len(self._where)} requests waiting (max_size {self.max_size})",
                limit=self.max_size,
                size=len(self._where),
            )
        self._insert(self._entry(item, priority, num_tokens), last=True)

    def requeue(self, item: T, priority: Priority = "normal", num_tokens: int = 0) -> None:
        """Put back a request whose prefill failed (its worker died), at the head of its class. Each request id
        may be requeued once (:class:`RequeueLimitError` after); :class:`QueueFullError` beyond the headroom."""
        entry = self._entry(item, priority, num_tokens)
        if entry.request_id in self._requeued:
            raise RequeueLimitError(f"request {entry.request_id!r} was requeued once already", entry.request_id)
        limit = self.max_size + self.requeue_headroom
        if len(self._where) >= limit:
            raise QueueFullError(
                f"prefill queue full: cannot requeue {entry.request_id!r}, {len(self._where)} "
                f"requests waiting (max_size + requeue_headroom = {limit})",
                limit=limit,
                size=len(self._where),
            )
        self._insert(entry, last=False)
        self._requeued[entry.request_id] = None
        if len(self._requeued) > self.max_requeue_memory:
            self._requeued.popitem(last=False)

    def was_requeued(self, request_id: str) -> bool:
        """True once ``request_id`` was requeued (until :meth:`release`)."""
        return request_id in self._requeued

    def peek(self) -> QueueEntry[T] | None:
        """The entry :meth:`pop` would return next, left in place; None when empty."""
        for priority in PRIORITIES:
            queue = self._classes[priority]
            if queue:
                return next(iter(queue.values()))
        return None

    def pop(self) -> T | None:
        """Take the oldest item of the highest non-empty class; None when empty."""
        entry = self.pop_entry()
        return None if entry is None else entry.item

    def pop_entry(self) -> QueueEntry[T] | None:
        """Like :meth:`pop`, with the entry's priority and token count."""
        for priority in PRIORITIES:
            queue = self._classes[priority]
            if queue:
                _key, entry = queue.popitem(last=False)
                self._drop(entry)
                return entry
        return None

    def remove(self, request_id: str) -> T | None:
        """Take out a queued request (aborted, past its deadline); its item, or None if it was not queued."""
        priority = self._where.get(request_id)
        if priority is None:
            return None
        entry = self._classes[priority].pop(request_id)
        self._drop(entry)
        return entry.item

    def release(self, request_id: str) -> None:
        """Forget ``request_id``'s requeue record (the request ended); removes it from the queue too."""
        self.remove(request_id)
        self._requeued.pop(request_id, None)

    def _entry(self, item: T, priority: Priority, num_tokens: int) -> QueueEntry[T]:
        if priority not in PRIORITIES:
            raise ConfigError(f"PrefillQueue: priority expected one of {PRIORITIES}, got {priority!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ConfigError(f"PrefillQueue: num_tokens expected an int >= 0, got {num_tokens!r}")
        request_id = self._key(item)
        if request_id in self._where:
            raise UsageError(f"PrefillQueue: request {request_id!r} is queued already")
        return QueueEntry(request_id, item, priority, num_tokens)

    def _insert(self, entry: QueueEntry[T], last: bool) -> None:
        queue = self._classes[entry.priority]
        queue[entry.request_id] = entry
        if not last:
            queue.move_to_end(entry.request_id, last=False)
        self._where[entry.request_id] = entry.priority
        self._tokens += entry.num_tokens

    def _drop(self, entry: QueueEntry[T]) -> None:
        del self._where[entry.request_id]
        self._tokens -= entry.num_tokens
