"""Discovery through etcd (v3), spoken over etcd's JSON gateway with httpx: no gRPC or protobuf runtime needed.

Each registered record is the value of ``<prefix><name>``, bound to a lease of ``ttl_s`` seconds that a background
thread keeps alive (every ``ttl_s / 3``). A worker that dies stops the keepalives, the lease expires, etcd deletes
the key and every watcher gets a ``remove``. If the lease is gone when a keepalive arrives (etcd restarted from an
empty store, or the link was down longer than the TTL), the thread grants a new lease and puts the record again.

Watchers read one ``/v3/watch`` stream per watch from the revision after their initial listing, resume from the last
revision they saw when the stream ends, and rebuild from a fresh listing when etcd compacted that revision away.
Keys and values travel base64-encoded; int64 fields arrive as JSON strings (both as etcd's gateway documents).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import ConfigError, PeerDisconnectedError, PeerError, UsageError
from .discovery import Discovery, DiscoveryEvent, DiscoveryWatch, WorkerRecord

log = logging.getLogger(__name__)
DEFAULT_PREFIX = "/kvxfer/workers/"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` covering every key that starts with ``prefix`` (etcd's convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


class EtcdGateway:
    """The few etcd v3 calls discovery needs, as JSON over HTTP (``/v3/...``). Every call has a ``timeout_s``."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>``; the decoded answer, or :class:`PeerError` /
        :class:`PeerDisconnectedError`."""
        try:
            response = self._client.post(f"/v3/{path}", json=body)
        except httpx.HTTPError as error:
            raise PeerDisconnectedError(
                f"etcd at {self.base_url}: {path} failed: {error!r}", peer_name=self.base_url
            ) from error
        if response.status_code != 200:
            raise PeerError(
                f"etcd at {self.base_url}: {path} answered {response.status_code}: {response.text[:300]}",
                peer_name=self.base_url,
            )
        text = response.text.strip().splitlines()
        try:
            answer = json.loads(text[0]) if text else {}
        except ValueError as error:
            raise PeerError(
                f"etcd at {self.base_url}: {path}: undecodable answer {text[0][:200]!r}", peer_name=self.base_url
            ) from error
        if not isinstance(answer, dict):
            raise PeerError(
                f"etcd at {self.base_url}: {path}: expected a JSON object, got {text[:1]!r}", peer_name=self.base_url
            )
        return answer.get("result", answer) if path == "lease/keepalive" else answer

    def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (id, TTL in seconds as granted; etcd raises TTLs below its minimum, about 2 s)."""
        answer = self.call("lease/grant", {"TTL": ttl_s})
        return int(answer["ID"]), int(answer.get("TTL", ttl_s))

    def keepalive(self, lease: int) -> int:
        """The lease's renewed TTL in seconds; 0 when the lease does not exist any more."""
        return int(self.call("lease/keepalive", {"ID": str(lease)}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        try:
            self.call("lease/revoke", {"ID": str(lease)})
        except PeerError as error:  # an expired lease cannot be revoked: nothing left to do
            if "not found" not in str(error):
                raise

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: bytes) -> int:
        return int(self.call("kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    def range_prefix(self, prefix: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
        """(revision, [(key, value), ...]) of every key under ``prefix``."""
        answer = self.call("kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        try:
            pairs = [
                (base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", ""))) for kv in answer.get("kvs", [])
            ]
            return int(answer["header"]["revision"]), pairs
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PeerError(
                f"etcd at {self.base_url}: malformed range answer: {error!r}", peer_name=self.base_url
            ) from error

    @contextmanager
    def watch(self, prefix: bytes, start_revision: int, read_timeout_s: float) -> Iterator[Iterator[dict[str, Any]]]:
        """A stream of watch results (``{"events": [...], "header": ...}``) from ``start_revision``; it ends with
        :class:`httpx.ReadTimeout` after ``read_timeout_s`` without a message."""
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        timeout = httpx.Timeout(self.timeout_s, read=read_timeout_s)
        with self._client.stream("POST", "/v3/watch", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                raise PeerError(
                    f"etcd at {self.base_url}: watch answered {response.status_code}", peer_name=self.base_url
                )
            yield (json.loads(line).get("result", {}) for line in response.iter_lines() if line.strip())


class _Keeper(threading.Thread):
    """Keeps one record's lease alive; re-grants and re-puts the record when the lease was lost."""

    def __init__(self, owner: EtcdDiscovery, record: WorkerRecord, lease: int, ttl_s: int) -> None:
        super().__init__(name=f"kvxfer-etcd-keepalive-{record.name}", daemon=True)
        self.owner, self.record, self.lease, self.ttl_s = owner, record, lease, ttl_s
        self.stopped = threading.Event()
        self.num_reregistrations = 0

    def run(self) -> None:
        while not self.stopped.wait(max(self.ttl_s / 3, 0.2)):
            try:
                if self.owner.gateway.keepalive(self.lease) == 0:
                    self.lease, self.ttl_s = self.owner.put_with_lease(self.record, self.ttl_s)
                    self.num_reregistrations += 1
                    log.warning("etcd lease of %s was lost; registered again", self.record.name)
            except PeerError as error:  # etcd unreachable: keep trying; the lease may still be alive
                log.warning("etcd keepalive of %s failed: %s", self.record.name, error)


class EtcdDiscovery(Discovery):
    """Discovery records in etcd under ``prefix``, each bound to a kept-alive lease (see the module docstring)."""

    def __init__(
        self, base_url: str, prefix: str = DEFAULT_PREFIX, timeout_s: float = 5.0, watch_read_timeout_s: float = 5.0
    ) -> None:
        self.gateway = EtcdGateway(base_url, timeout_s)
        self.prefix = prefix.encode()
        self.watch_read_timeout_s = watch_read_timeout_s
        self.num_bad_records = 0
        self._keepers: dict[str, _Keeper] = {}
        self._watchers: list[tuple[DiscoveryWatch, threading.Thread]] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> EtcdDiscovery:
        """``etcd://host:port[/prefix/]`` (the prefix defaults to ``/kvxfer/workers/``)."""
        parts = urlsplit(url)
        if parts.scheme != "etcd" or not parts.hostname or parts.port is None:
            raise ConfigError(f"discovery: expected etcd://host:port[/prefix/], got {url!r}")
        prefix = parts.path if parts.path not in ("", "/") else DEFAULT_PREFIX
        return cls(f"http://{parts.hostname}:{parts.port}", prefix if prefix.endswith("/") else prefix + "/")

    def put_with_lease(self, record: WorkerRecord, ttl_s: int) -> tuple[int, int]:
        """Grant a lease of ``ttl_s`` and put ``record`` under it; returns the lease id and its granted TTL."""
        lease, granted = self.gateway.grant(ttl_s)
        self.gateway.put(self.prefix + record.name.encode(), record.encode(), lease)
        return lease, granted

    def reregistrations(self, name: str) -> int:
        """How often ``name``'s keepalive found its lease gone and registered again (0 if not registered here)."""
        keeper = self._keepers.get(name)
        return 0 if keeper is None else keeper.num_reregistrations

    def lease_ttl(self, name: str) -> int | None:
        """The TTL etcd granted ``name``'s lease (seconds), None when not registered here."""
        keeper = self._keepers.get(name)
        return None if keeper is None else keeper.ttl_s

    def register(self, record: WorkerRecord, ttl_s: float) -> None:
        if not ttl_s >= 1:
            raise ConfigError(
                f"EtcdDiscovery.register: ttl_s expected >= 1 (etcd leases are whole seconds), got {ttl_s!r}"
            )
        ttl = int(-(-ttl_s // 1))
        with self._lock:
            if self._closed:
                raise UsageError("EtcdDiscovery is closed")
            old = self._keepers.pop(record.name, None)
        if old is not None:
            old.stopped.set()
            old.join(timeout=self.gateway.timeout_s + 1)
        keeper = _Keeper(self, record, *self.put_with_lease(record, ttl))
        with self._lock:
            self._keepers[record.name] = keeper
        keeper.start()
        if old is not None and old.lease != keeper.lease:
            self.gateway.revoke(old.lease)

    def keepalive(self, name: str) -> bool:
        keeper = self._keepers.get(name)
        return keeper is not None and self.gateway.keepalive(keeper.lease) > 0

    def stop_keepalive(self, name: str) -> bool:
        """Stop renewing ``name``'s lease without revoking it: the record expires after its TTL (as when its
        worker dies). False when not registered here."""
        with self._lock:
            keeper = self._keepers.pop(name, None)
        if keeper is not None:
            keeper.stopped.set()
            keeper.join(timeout=self.gateway.timeout_s + 1)
        return keeper is not None

    def deregister(self, name: str) -> bool:
        with self._lock:
            keeper = self._keepers.pop(name, None)
        if keeper is not None:
            keeper.stopped.set()
            keeper.join(timeout=self.gateway.timeout_s + 1)
            self.gateway.revoke(keeper.lease)
        return self.gateway.delete(self.prefix + name.encode()) > 0 or keeper is not None

    def list(self) -> list[WorkerRecord]:
        return sorted(self._snapshot()[1].values(), key=lambda record: record.name)

    def watch(self, max_pending: int = 4096) -> DiscoveryWatch:
        revision, known = self._snapshot()
        watch = DiscoveryWatch(max_pending)
        for name in sorted(known):
            watch.push(DiscoveryEvent("add", name, known[name]))
        thread = threading.Thread(
            target=self._follow, args=(watch, revision, known), daemon=True, name="kvxfer-etcd-watch"
        )
        with self._lock:
            if self._closed:
                raise UsageError("EtcdDiscovery is closed")
            self._watchers.append((watch, thread))
        thread.start()
        return watch

    def close(self) -> None:
        """Stop keepalives (revoking their leases: the records go now) and watches; close the HTTP client."""
        with self._lock:
            self._closed = True
            names = list(self._keepers)
            watchers, self._watchers = self._watchers, []
        for name in names:
            try:
                self.deregister(name)
            except PeerError as error:  # etcd gone: the lease expires by itself
                log.warning("etcd deregister of %s on close failed: %s", name, error)
        for watch, thread in watchers:
            watch.close()
            thread.join(timeout=self.watch_read_timeout_s + self.gateway.timeout_s + 1)
        self.gateway.close()

    def _snapshot(self) -> tuple[int, dict[str, WorkerRecord]]:
        revision, pairs = self.gateway.range_prefix(self.prefix)
        records = {}
        for key, value in pairs:
            record = self._decode(key, value)
            if record is not None:
                records[record.name] = record
        return revision, records

    def _decode(self, key: bytes, value: bytes) -> WorkerRecord | None:
        try:
            record = WorkerRecord.decode(value)
        except ConfigError as error:
            self.num_bad_records += 1
            log.warning("etcd discovery: bad record at %r dropped: %s", key, error)
            return None
        if self.prefix + record.name.encode() != key:
            self.num_bad_records += 1
            log.warning("etcd discovery: record %r stored under another key %r dropped", record.name, key)
            return None
        return record

    def _follow(self, watch: DiscoveryWatch, revision: int, known: dict[str, WorkerRecord]) -> None:
        """The watch thread: apply etcd's events to ``known`` and turn them into discovery events."""
        while not watch.closed:
            try:
                with self.gateway.watch(self.prefix, revision + 1, self.watch_read_timeout_s) as results:
                    for result in results:
                        if watch.closed:
                            return
                        current = int(result.get("header", {}).get("revision", revision))
                        # canceled / compacted: our revision is gone; revision went back: etcd restarted empty
                        if result.get("canceled") or result.get("compact_revision") or current < revision:
                            revision = self._resync(watch, known)
                            break
                        for event in result.get("events", []):
                            self._apply(watch, known, event)
                        revision = max(revision, current)
            except (httpx.ReadTimeout, httpx.RemoteProtocolError):
                continue  # idle stream or etcd closed it: resume from the last revision seen
            except (httpx.HTTPError, PeerError, KeyError, TypeError, ValueError, AttributeError) as error:
                # unreachable, or an answer we cannot read (never trusted): start over from a fresh listing
                log.warning("etcd watch failed (%r); retrying", error)
                if watch.closed:
                    return
                threading.Event().wait(1.0)
                try:
                    revision = self._resync(watch, known)
                except PeerError:
                    continue

    def _apply(self, watch: DiscoveryWatch, known: dict[str, WorkerRecord], event: dict[str, Any]) -> None:
        key = base64.b64decode(event.get("kv", {}).get("key", ""))
        if not key.startswith(self.prefix):
            return
        name = key[len(self.prefix) :].decode(errors="replace")
        if event.get("type") == "DELETE":
            if name in known:
                watch.push(DiscoveryEvent("remove", name, known.pop(name)))
            return
        record = self._decode(key, base64.b64decode(event["kv"].get("value", "")))
        if record is not None and known.get(name) != record:
            watch.push(DiscoveryEvent("update" if name in known else "add", name, record))
            known[name] = record

    def _resync(self, watch: DiscoveryWatch, known: dict[str, WorkerRecord]) -> int:
        """Rebuild from a fresh listing, reporting the difference; returns its revision."""
        revision, now = self._snapshot()
        for name in sorted(set(known) - set(now)):
            watch.push(DiscoveryEvent("remove", name, known.pop(name)))
        for name in sorted(now):
            if known.get(name) != now[name]:
                watch.push(DiscoveryEvent("update" if name in known else "add", name, now[name]))
                known[name] = now[name]
        return revision
