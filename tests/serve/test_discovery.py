"""Embedded discovery (pure: an injected clock) and the record format shared with etcd discovery."""

from __future__ import annotations

import threading

import pytest

from kvxfer.errors import ConfigError, UsageError
from kvxfer.serve.discovery import (
    DiscoveryEvent,
    DiscoveryWatch,
    EmbeddedDiscovery,
    WorkerRecord,
    open_discovery,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(name: str = "decode-0", role: str = "decode", **attributes: int | str) -> WorkerRecord:
    return WorkerRecord(name, role, "tiny-random", dict(attributes), b"\x00agent-meta\xff")


def kinds(events: list[DiscoveryEvent]) -> list[tuple[str, str]]:
    return [(event.kind, event.name) for event in events]


def test_record_round_trip_and_validation() -> None:
    original = record(num_blocks=512, block_size=16, address="10.0.0.2:5555")
    assert WorkerRecord.decode(original.encode()) == original
    with pytest.raises(ConfigError, match="name"):
        WorkerRecord("bad name/../x", "decode", "m")
    with pytest.raises(ConfigError, match="role"):
        WorkerRecord("w", "", "m")
    with pytest.raises(ConfigError, match="attributes"):
        WorkerRecord("w", "decode", "m", {"nested": [1, 2]})  # type: ignore[dict-item]
    for bad in [
        b"not json",
        b"[1]",
        b'{"v": 2, "name": "w"}',
        b'{"v": 1, "name": "w", "role": "d"}',
        b'{"v": 1, "name": "w", "role": "d", "model": "m", "payload": "%%%"}',
        b'{"v": 1, "name": 5, "role": "d", "model": "m"}',
        b"x" * (2 << 20),
    ]:
        with pytest.raises(ConfigError):
            WorkerRecord.decode(bad)


def test_register_keepalive_expire_by_ttl() -> None:
    clock = Clock()
    discovery = EmbeddedDiscovery(clock=clock)
    watch = discovery.watch()
    discovery.register(record("d0"), ttl_s=2.0)
    discovery.register(record("p0", "prefill"), ttl_s=5.0)
    assert [r.name for r in discovery.list()] == ["d0", "p0"]
    clock.now += 1.5
    assert discovery.keepalive("d0")  # d0 now lives until 103.5
    clock.now += 1.9  # 103.4
    assert discovery.expire() == []
    clock.now += 0.1  # 103.5: d0's TTL has passed since its last keepalive
    assert [r.name for r in discovery.expire()] == ["d0"]
    assert not discovery.keepalive("d0")  # gone: the worker must register again
    clock.now += 1.5  # 105.0: p0 registered at 100 with 5 s
    assert [r.name for r in discovery.expire()] == ["p0"]
    assert discovery.list() == []
    assert kinds(watch.drain()) == [("add", "d0"), ("add", "p0"), ("remove", "d0"), ("remove", "p0")]


def test_update_deregister_and_late_watchers() -> None:
    discovery = EmbeddedDiscovery(clock=Clock())
    first = discovery.watch()
    discovery.register(record("d0", num_blocks=10), 2.0)
    discovery.register(record("d0", num_blocks=10), 2.0)  # same record again: a keepalive, no event
    discovery.register(record("d0", num_blocks=20), 2.0)
    late = discovery.watch()  # starts from the full picture
    assert discovery.deregister("d0") and not discovery.deregister("d0")
    events = first.drain()
    assert kinds(events) == [("add", "d0"), ("update", "d0"), ("remove", "d0")]
    assert events[1].record is not None and events[1].record.attributes["num_blocks"] == 20
    assert kinds(late.drain()) == [("add", "d0"), ("remove", "d0")]
    late.close()
    discovery.register(record("d1"), 2.0)
    assert late.drain() == [] and kinds(first.drain()) == [("add", "d1")]


def test_bounds_and_close() -> None:
    discovery = EmbeddedDiscovery(clock=Clock(), max_records=2)
    watch = discovery.watch(max_pending=3)
    for name in ("a", "b"):
        discovery.register(record(name), 1.0)
    with pytest.raises(UsageError, match="2 records registered"):
        discovery.register(record("c"), 1.0)
    for _ in range(2):
        discovery.deregister("a")
        discovery.register(record("a"), 1.0)
    assert watch.overflowed and len(watch.drain()) == 3
    with pytest.raises(ConfigError, match="ttl_s"):
        discovery.register(record("a"), 0.0)
    discovery.close()
    assert watch.closed and watch.get(timeout=0.01) is None
    with pytest.raises(UsageError, match="closed"):
        discovery.register(record("z"), 1.0)


def test_watch_wakes_a_blocked_reader() -> None:
    watch = DiscoveryWatch()
    got: list[DiscoveryEvent | None] = []
    reader = threading.Thread(target=lambda: got.append(watch.get(timeout=10.0)))
    reader.start()
    watch.push(DiscoveryEvent("add", "w", None))
    reader.join(timeout=10.0)
    assert not reader.is_alive() and got and got[0] is not None and got[0].name == "w"
    with watch:
        pass
    assert watch.closed and list(watch) == []


def test_open_discovery() -> None:
    assert isinstance(open_discovery(None), EmbeddedDiscovery)
    assert isinstance(open_discovery("embedded"), EmbeddedDiscovery)
    with pytest.raises(ConfigError, match="etcd://"):
        open_discovery("zookeeper://x:1")
