"""Discovery: how the router learns which workers exist, and forgets the ones that died.

One small interface, two implementations:

- :class:`EmbeddedDiscovery` (the default): in the router's process. Workers register through the router's control
  link; their heartbeats call :meth:`Discovery.keepalive`; :meth:`EmbeddedDiscovery.expire` (called on the router's
  tick) drops a record whose TTL passed since its last keepalive. The clock is injected, so it is testable without
  sleeping.
- :class:`~kvxfer.serve.discovery_etcd.EtcdDiscovery` (``etcd://host:2379``): records live in etcd under a prefix,
  each bound to a lease its worker keeps alive; an expired lease deletes the record, and every watcher sees it go.

Watchers get :class:`DiscoveryEvent` s (``add`` / ``update`` / ``remove``) through a bounded :class:`DiscoveryWatch`;
a watch first reports every record already known, so a late watcher starts from the full picture.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from ..errors import ConfigError, UsageError

EventKind = Literal["add", "update", "remove"]
Attribute = str | int | float | bool
#: A record's encoded size limit (records come from peers: never trusted).
MAX_RECORD_NBYTES = 1 << 20
_Watch = TypeVar("_Watch", bound="DiscoveryWatch")
_Discovery = TypeVar("_Discovery", bound="Discovery")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")


@dataclass(frozen=True, eq=True)
class WorkerRecord:
    """What a worker publishes: its name (unique, ``[A-Za-z0-9._-]{1,128}``), role, model, small attributes
    (capacity, addresses: str / int / float / bool values) and an opaque payload (e.g. agent metadata)."""

    name: str
    role: str
    model: str
    attributes: Mapping[str, Attribute] = field(default_factory=dict)
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"WorkerRecord.name: expected [A-Za-z0-9._-]{{1,128}}, got {self.name!r}")
        for key in ("role", "model"):
            value = getattr(self, key)
            if not isinstance(value, str) or not 0 < len(value) <= 256:
                raise ConfigError(f"WorkerRecord.{key}: expected a str of 1..256 characters, got {value!r}")
        if not isinstance(self.payload, bytes):
            raise ConfigError(f"WorkerRecord.payload: expected bytes, got {type(self.payload).__name__}")
        for key, value in self.attributes.items():
            if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
                raise ConfigError(
                    f"WorkerRecord.attributes[{key!r}]: expected str -> str/int/float/bool, got {value!r}"
                )

    def encode(self) -> bytes:
        """JSON bytes (readable with ``etcdctl get``); the payload in base64."""
        data = json.dumps(
            {
                "v": 1,
                "name": self.name,
                "role": self.role,
                "model": self.model,
                "attributes": dict(self.attributes),
                "payload": base64.b64encode(self.payload).decode(),
            },
            sort_keys=True,
        ).encode()
        if len(data) > MAX_RECORD_NBYTES:
            raise ConfigError(
                f"WorkerRecord {self.name!r}: encoded size expected <= {MAX_RECORD_NBYTES}, got {len(data)}"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> WorkerRecord:
        """Inverse of :meth:`encode`; anything malformed raises :class:`ConfigError`."""
        if len(data) > MAX_RECORD_NBYTES:
            raise ConfigError(f"WorkerRecord: size expected <= {MAX_RECORD_NBYTES}, got {len(data)}")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("v") != 1:
                raise ConfigError(f"WorkerRecord: expected a version 1 object, got {str(obj)[:80]!r}")
            attributes = obj.get("attributes", {})
            if not isinstance(attributes, dict):
                raise ConfigError(f"WorkerRecord.attributes: expected an object, got {attributes!r}")
            return cls(
                obj["name"],
                obj["role"],
                obj["model"],
                attributes,
                base64.b64decode(obj.get("payload", ""), validate=True),
            )
        except (ValueError, KeyError, TypeError) as error:  # JSON, base64, missing field: one kind of bad record
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"WorkerRecord: undecodable record: {error!r}") from error


@dataclass(frozen=True)
class DiscoveryEvent:
    """A change: ``add`` (new name), ``update`` (same name, new record), ``remove`` (``record`` is the last known
    one, or None if it was never seen)."""

    kind: EventKind
    name: str
    record: WorkerRecord | None


class DiscoveryWatch:
    """A bounded, thread-safe stream of :class:`DiscoveryEvent`. When more than ``max_pending`` events wait, the
    oldest are dropped and :attr:`overflowed` is set: the consumer should then rebuild its view from
    :meth:`Discovery.list`. Iterating yields events until the watch is closed."""

    def __init__(self, max_pending: int = 4096, on_close: Callable[[DiscoveryWatch], None] | None = None) -> None:
        self._events: deque[DiscoveryEvent] = deque()
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._on_close = on_close
        self.closed = False
        self.overflowed = False

    def push(self, event: DiscoveryEvent) -> None:
        """Add an event (producer side)."""
        with self._cond:
            if self.closed:
                return
            self._events.append(event)
            if len(self._events) > self._max_pending:
                self._events.popleft()
                self.overflowed = True
            self._cond.notify_all()

    def get(self, timeout: float = 1.0) -> DiscoveryEvent | None:
        """The next event, waiting at most ``timeout`` seconds; None on timeout or once closed and drained."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._events and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._events.popleft() if self._events else None

    def drain(self) -> list[DiscoveryEvent]:
        """Every event waiting now, without blocking."""
        with self._cond:
            events = list(self._events)
            self._events.clear()
            return events

    def __iter__(self) -> Iterator[DiscoveryEvent]:
        while True:
            event = self.get(timeout=0.5)
            if event is not None:
                yield event
            elif self.closed:
                return

    def close(self) -> None:
        """Stop the stream (pending events stay readable through :meth:`drain`)."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._cond.notify_all()
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self: _Watch) -> _Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Discovery(ABC):
    """Register / keep alive / deregister records; list them; watch changes. Implementations are thread-safe."""

    @abstractmethod
    def register(self, record: WorkerRecord, ttl_s: float) -> None:
        """Publish ``record`` (replacing one of the same name); it disappears ``ttl_s`` seconds after the last
        keepalive."""

    @abstractmethod
    def keepalive(self, name: str) -> bool:
        """Extend ``name``'s TTL; False when it is not registered (any more): register again."""

    @abstractmethod
    def deregister(self, name: str) -> bool:
        """Remove ``name`` now; False when it was not registered."""

    @abstractmethod
    def list(self) -> list[WorkerRecord]:
        """Every live record, sorted by name."""

    @abstractmethod
    def watch(self, max_pending: int = 4096) -> DiscoveryWatch:
        """A stream of changes, starting with an ``add`` for every record known now."""

    @abstractmethod
    def close(self) -> None:
        """Stop background work and close every watch."""

    def __enter__(self: _Discovery) -> _Discovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedDiscovery(Discovery):
    """In-process discovery (the router's default). ``clock`` gives seconds (default ``time.monotonic``); records
    whose TTL passed are dropped by :meth:`expire`, which the owner calls periodically (the router's tick). At most
    ``max_records`` records (registering more raises :class:`UsageError`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_records: int = 1024) -> None:
        self._clock = clock
        self._max_records = max_records
        self._records: dict[str, tuple[WorkerRecord, float, float]] = {}  # name -> (record, ttl_s, expires_at)
        self._watches: list[DiscoveryWatch] = []
        self._lock = threading.RLock()
        self._closed = False

    def register(self, record: WorkerRecord, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ConfigError(f"EmbeddedDiscovery.register: ttl_s expected > 0, got {ttl_s!r}")
        with self._lock:
            self._check_open()
            old = self._records.get(record.name)
            if old is None and len(self._records) >= self._max_records:
                raise UsageError(
                    f"EmbeddedDiscovery: {self._max_records} records registered already; refusing {record.name!r}"
                )
            self._records[record.name] = (record, ttl_s, self._clock() + ttl_s)
            if old is None or old[0] != record:
                self._publish(DiscoveryEvent("add" if old is None else "update", record.name, record))

    def keepalive(self, name: str) -> bool:
        with self._lock:
            entry = self._records.get(name)
            if entry is None:
                return False
            record, ttl_s, _ = entry
            self._records[name] = (record, ttl_s, self._clock() + ttl_s)
            return True

    def deregister(self, name: str) -> bool:
        with self._lock:
            entry = self._records.pop(name, None)
            if entry is not None:
                self._publish(DiscoveryEvent("remove", name, entry[0]))
            return entry is not None

    def expire(self) -> list[WorkerRecord]:
        """Drop and return the records whose TTL passed since their last keepalive (each watcher sees a remove)."""
        now = self._clock()
        with self._lock:
            dead = [name for name, (_, _, expires_at) in self._records.items() if expires_at <= now]
            records = [self._records.pop(name)[0] for name in dead]
            for record in records:
                self._publish(DiscoveryEvent("remove", record.name, record))
            return records

    def list(self) -> list[WorkerRecord]:
        with self._lock:
            return [self._records[name][0] for name in sorted(self._records)]

    def watch(self, max_pending: int = 4096) -> DiscoveryWatch:
        with self._lock:
            self._check_open()
            watch = DiscoveryWatch(max_pending, on_close=self._unwatch)
            for record in self.list():
                watch.push(DiscoveryEvent("add", record.name, record))
            self._watches.append(watch)
            return watch

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.close()

    def _publish(self, event: DiscoveryEvent) -> None:
        for watch in self._watches:
            watch.push(event)

    def _unwatch(self, watch: DiscoveryWatch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("EmbeddedDiscovery is closed")


def open_discovery(url: str | None) -> Discovery:
    """``None`` or ``"embedded"`` -> :class:`EmbeddedDiscovery`; ``etcd://host:port[/prefix]`` ->
    :class:`~kvxfer.serve.discovery_etcd.EtcdDiscovery` (imports httpx)."""
    if url is None or url == "embedded":
        return EmbeddedDiscovery()
    if url.startswith("etcd://"):
        from .discovery_etcd import EtcdDiscovery

        return EtcdDiscovery.from_url(url)
    raise ConfigError(f"discovery: expected 'embedded' or etcd://host:port[/prefix], got {url!r}")
