"""The glue between ``--discovery etcd://host:port[/cluster]`` and a router or a worker.

Keys (one cluster = one router and its workers; ``cluster`` defaults to ``default``)::

    /kvxfer/<cluster>/workers/<name>   a worker's record, bound to a lease the worker keeps alive
    /kvxfer/<cluster>/router/<name>    the router's record (attribute ``control``: its zmq control address)

A worker's record (:func:`worker_record`) carries its role, model, capacity and agent side-channel address as
attributes (readable with ``etcdctl get --prefix /kvxfer/``) and its ``register`` control message (which holds the
agent metadata of each rank) as the payload.

Worker side (:class:`WorkerDiscoveryLink`): :meth:`~WorkerDiscoveryLink.find_router` looks the router's control
address up; :meth:`~WorkerDiscoveryLink.start` publishes the record and keeps its lease alive on a thread; a lost
lease (etcd lost its data, or the worker was cut off for longer than the TTL) is answered by registering again,
and an unreachable etcd by retrying until it answers.

Router side (:class:`RouterDiscoveryLink`): publishes the router's record the same way and watches the workers'
prefix. A record that disappears (its lease expired, or the worker deregistered) and does not come back within
``grace_s`` is reported to ``on_worker_gone(name)``: the router drops that worker exactly as if it had missed its
heartbeats. :meth:`~RouterDiscoveryLink.registration` gives the ``register`` message of a live record, so a worker
that was dropped while its control connection stayed up (its lease lapsed, then it registered again) can rejoin on
its next heartbeat without reconnecting. While etcd is unreachable nothing is removed: the router keeps serving the
workers it knows (their heartbeats still decide their liveness).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import ConfigError, HandshakeError, KvxferError
from . import protocol
from .discovery import Discovery, DiscoveryEvent, WorkerRecord
from .protocol import Register

if TYPE_CHECKING:
    from .discovery_etcd import EtcdDiscovery

logger = logging.getLogger("kvxfer.serve")

#: Lease TTL of every record (s): a dead worker disappears this long after its last keepalive.
LEASE_TTL_S = 3.0
#: Seconds between retries while etcd does not answer.
RETRY_S = 0.5
#: Seconds every etcd call may take (a cut link must not hang a thread longer).
ETCD_TIMEOUT_S = 2.0
#: Seconds a watch stream may stay silent before it is re-opened.
WATCH_READ_TIMEOUT_S = 2.0
#: Seconds a removed worker record may take to come back before the router is told it is gone.
GRACE_S = 0.2


@dataclass(frozen=True)
class DiscoveryTarget:
    """A parsed ``etcd://host:port[/cluster]``: the etcd endpoint and the cluster name."""

    host: str
    port: int
    cluster: str

    def prefix(self, kind: str) -> str:
        """The key prefix of ``kind`` ("workers" or "router"), with its trailing slash."""
        return f"/kvxfer/{self.cluster}/{kind}/"

    def url(self, kind: str) -> str:
        """The :func:`~kvxfer.serve.discovery.open_discovery` URL of ``kind``'s records."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"etcd://{host}:{self.port}{self.prefix(kind)}"

    def open(self, kind: str) -> EtcdDiscovery:
        """An :class:`~kvxfer.serve.discovery_etcd.EtcdDiscovery` of ``kind``'s records. Its watch stream is
        re-opened after :data:`WATCH_READ_TIMEOUT_S` without a message, which bounds how long a half-open
        connection (a cut link) goes unnoticed and how long closing takes."""
        from .discovery_etcd import EtcdDiscovery

        host = f"[{self.host}]" if ":" in self.host else self.host
        return EtcdDiscovery(
            f"http://{host}:{self.port}",
            self.prefix(kind),
            timeout_s=ETCD_TIMEOUT_S,
            watch_read_timeout_s=WATCH_READ_TIMEOUT_S,
        )

    @classmethod
    def parse(cls, url: str) -> DiscoveryTarget:
        """``etcd://host:port`` or ``etcd://host:port/cluster`` (cluster: ``[A-Za-z0-9._-]``, default "default")."""
        parts = urlsplit(url)
        cluster = parts.path.strip("/") or "default"
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "etcd" or not parts.hostname or port is None or parts.query or parts.fragment:
            raise ConfigError(f"--discovery: expected etcd://host:port[/cluster], got {url!r}")
        if not all(c.isalnum() or c in "._-" for c in cluster) or len(cluster) > 128:
            raise ConfigError(f"--discovery: cluster name expected [A-Za-z0-9._-]{{1,128}}, got {cluster!r}")
        return cls(parts.hostname, port, cluster)


def worker_record(register: Register, side_channel: str | None) -> WorkerRecord:
    """The record a worker publishes: ``register``'s fields as attributes (+ ``side_channel``, the agent's
    listen address) and the encoded ``register`` message as the payload."""
    attributes: dict[str, str | int | float | bool] = {
        "block_size": register.block_size,
        "num_blocks": register.num_blocks,
        "max_batch": register.max_batch,
        "kv_bytes_per_token": register.kv_bytes_per_token,
        "device": register.device,
        "side_channel": side_channel or "",
    }
    return WorkerRecord(register.name, register.role, register.model, attributes, register.encode())


#: What an unreachable or misbehaving etcd raises (EtcdDiscovery converts transport errors to PeerError): retried.
ETCD_FAILURES = (KvxferError, OSError)


class _Lease:
    """Publishes ``record`` in ``discovery`` from a thread, retrying every :data:`RETRY_S` until etcd answers (a
    worker may start before etcd). Once registered, :class:`~kvxfer.serve.discovery_etcd.EtcdDiscovery` keeps the
    lease alive and registers again by itself when the lease was lost; this thread also checks every TTL that the
    record is really there (a lease revoked or expired between two keepalives that still answer, a key deleted by
    hand) and puts it back if not: a record missing while its process lives would keep that worker out of the
    router's pool for good. ``registrations`` counts the puts this thread made."""

    def __init__(self, discovery: Discovery, record: WorkerRecord, ttl_s: float) -> None:
        if not ttl_s >= 1:
            raise ConfigError(f"discovery lease: ttl_s expected >= 1 (etcd leases are whole seconds), got {ttl_s!r}")
        self.discovery, self.record, self.ttl_s = discovery, record, ttl_s
        self.failures = 0
        self.registrations = 0
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvxfer-lease-{record.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.registered.is_set() or self._missing():
                    self.discovery.register(self.record, self.ttl_s)
                    self.registrations += 1
                    self.registered.set()
                    logger.info(
                        "discovery: %s %s registered (lease ttl %.0f s, put %d)",
                        self.record.role,
                        self.record.name,
                        self.ttl_s,
                        self.registrations,
                    )
            except ETCD_FAILURES as error:
                self.failures += 1
                if self.failures == 1 or self.failures % 20 == 0:
                    logger.warning(
                        "discovery: etcd unreachable for %s (%d failures): %s", self.record.name, self.failures, error
                    )
                self._stop.wait(RETRY_S)
                continue
            self._stop.wait(self.ttl_s)

    def _missing(self) -> bool:
        if any(record.name == self.record.name for record in self.discovery.list()):
            return False
        logger.warning(
            "discovery: the record of %s vanished while its lease was kept alive: registering again", self.record.name
        )
        return True

    def close(self) -> None:
        """Stop the thread (the discovery's own close revokes the lease: the record goes now)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)


class WorkerDiscoveryLink:
    """A worker's end. ``link = WorkerDiscoveryLink(url, record)``; ``router = link.find_router(model)``;
    ``link.start()``; ... ``link.close()`` (deregisters)."""

    def __init__(self, url: str, record: WorkerRecord, ttl_s: float = LEASE_TTL_S) -> None:
        self.target = DiscoveryTarget.parse(url)
        self.workers = self.target.open("workers")
        self.routers = self.target.open("router")
        self.lease = _Lease(self.workers, record, ttl_s)

    def find_router(self, model: str | None = None, timeout_s: float = 30.0) -> str:
        """The control address of a router serving ``model`` (any model when None), waiting up to ``timeout_s``
        for one to appear; raises :class:`ConfigError` when none does."""
        give_up = time.monotonic() + timeout_s
        seen: list[str] = []
        while True:
            try:
                records = self.routers.list()
            except ETCD_FAILURES as error:
                records, seen = [], [f"etcd: {error}"]
            for record in records:
                control = record.attributes.get("control")
                if isinstance(control, str) and control and (model is None or record.model == model):
                    return control
                seen.append(f"{record.name} ({record.model}, control={control!r})")
            if time.monotonic() >= give_up:
                raise ConfigError(
                    f"discovery: no router for model {model!r} under "
                    f"{self.target.prefix('router')} at {self.target.host}:{self.target.port} "
                    f"within {timeout_s:.0f} s; seen: {seen or 'nothing'}"
                )
            time.sleep(RETRY_S)

    def start(self) -> None:
        """Publish the record and keep its lease alive (on a thread)."""
        self.lease.start()

    def close(self) -> None:
        """Deregister, stop the thread, close the etcd clients."""
        self.lease.close()
        self.workers.close()
        self.routers.close()


class RouterDiscoveryLink:
    """The router's end: publishes ``control`` (the address workers connect to) under the router prefix and
    reports workers whose records disappear to ``on_worker_gone(name)`` — on ``loop`` (call_soon_threadsafe) when
    one is given, else on the watch thread. ``max_pending``: the watch's bound (past it, a listing rebuilds)."""

    def __init__(
        self,
        url: str,
        control: str,
        model: str,
        on_worker_gone: Callable[[str], None],
        loop: asyncio.AbstractEventLoop | None = None,
        name: str = "router",
        ttl_s: float = LEASE_TTL_S,
        grace_s: float = GRACE_S,
        max_pending: int = 4096,
    ) -> None:
        host = urlsplit(control).hostname or ""
        if host in ("0.0.0.0", "::", "*", ""):
            raise ConfigError(
                f"--discovery: the router's control address {control!r} is a wildcard; bind "
                f"--control to the address workers reach (e.g. tcp://10.0.0.5:7100)"
            )
        self.target = DiscoveryTarget.parse(url)
        self.workers = self.target.open("workers")
        self.routers = self.target.open("router")
        self.lease = _Lease(self.routers, WorkerRecord(name, "router", model, {"control": control}), ttl_s)
        self.on_worker_gone, self.loop, self.grace_s = on_worker_gone, loop, grace_s
        self.records: dict[str, WorkerRecord] = {}  # live worker records, from the watch
        self.removed: list[tuple[str, float]] = []  # (name, monotonic time) of every removal reported
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # name -> monotonic time its removal is reported unless it returns
        self._stop = threading.Event()
        self._watch = self.workers.watch(max_pending)
        self._thread = threading.Thread(target=self._run, name="kvxfer-discovery-watch", daemon=True)

    def start(self) -> None:
        """Publish the router's record and start watching the workers."""
        self.lease.start()
        self._thread.start()

    def registration(self, name: str) -> Register | None:
        """The ``register`` message in ``name``'s live record, or None (no record, or not a valid register for
        that name: records come from the network and are checked like control messages)."""
        with self._lock:
            record = self.records.get(name)
        if record is None:
            return None
        try:
            message = protocol.decode(record.payload)
        except HandshakeError as error:
            logger.warning("discovery: record of %s has a bad register payload: %s", name, error)
            return None
        if not isinstance(message, Register) or message.name != name or message.role != record.role:
            logger.warning("discovery: record of %s does not carry its own register message", name)
            return None
        return message

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self._watch.get(timeout=min(0.1, self.grace_s or 0.1))
            if event is not None:
                self._apply(event)
            if self._watch.overflowed:
                self._rebuild()
            self._report_due()
        self._watch.close()

    def _rebuild(self) -> None:
        """The watch dropped events (its bound): take the full picture from a listing instead (events queued
        after the drain are newer than the listing and are applied after it)."""
        self._watch.drain()
        self._watch.overflowed = False
        try:
            records = {record.name: record for record in self.workers.list()}
        except ETCD_FAILURES as error:  # etcd unreachable: keep what we know and list again on the next pass
            logger.warning("discovery: watch overflowed and etcd cannot be listed: %s", error)
            self._watch.overflowed = True
            return
        for name in sorted(set(self.records) - set(records)):
            self._apply(DiscoveryEvent("remove", name, self.records[name]))
        for record in records.values():
            self._apply(DiscoveryEvent("add", record.name, record))

    def _apply(self, event: DiscoveryEvent) -> None:
        with self._lock:
            if event.kind == "remove":
                self.records.pop(event.name, None)
                self._pending.setdefault(event.name, time.monotonic() + self.grace_s)
            elif event.record is not None:
                self.records[event.name] = event.record
                if self._pending.pop(event.name, None) is not None:
                    logger.info("discovery: worker %s came back within %.1f s", event.name, self.grace_s)

    def _report_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [name for name, at in self._pending.items() if at <= now]
            for name in due:
                del self._pending[name]
                self.removed.append((name, now))
                del self.removed[:-1024]
        for name in due:
            logger.warning("discovery: worker %s's record is gone (lease expired or deregistered)", name)
            if self.loop is not None:
                try:
                    self.loop.call_soon_threadsafe(self.on_worker_gone, name)
                except RuntimeError:  # the loop is closed: the router is shutting down
                    return
            else:
                self.on_worker_gone(name)

    def close(self) -> None:
        """Deregister the router's record, stop watching, close the etcd clients."""
        self._stop.set()
        self._watch.close()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.lease.close()
        self.workers.close()
        self.routers.close()
