"""The discovery glue (router and worker ends) against a real etcd on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from kvxfer.errors import ConfigError
from kvxfer.serve.discovery import WorkerRecord
from kvxfer.serve.discovery_etcd import EtcdDiscovery, EtcdGateway
from kvxfer.serve.discovery_link import (
    DiscoveryTarget,
    RouterDiscoveryLink,
    WorkerDiscoveryLink,
    worker_record,
)
from kvxfer.serve.protocol import Register
from tests.serve.test_discovery_etcd import ETCD, Etcd

pytestmark = [
    pytest.mark.skipif(ETCD is None, reason="etcd binary not found (Debian: apt-get install etcd-server)"),
    pytest.mark.timeout(90),
]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def url(etcd: Etcd, cluster: str = "c1") -> str:
    return f"etcd://127.0.0.1:{etcd.client_port}/{cluster}"


def register(name: str, role: str = "prefill") -> Register:
    return Register(name, role, "tiny-random", 16, 512, 4096, (b"rank-info-" + name.encode(),), 64, "cpu")


class Gone:
    """Collects on_worker_gone calls (from the watch thread)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.event = threading.Event()

    def __call__(self, name: str) -> None:
        self.names.append(name)
        self.event.set()


def wait_for(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout_s} s")


def test_discovery_url() -> None:
    assert DiscoveryTarget.parse("etcd://10.0.0.1:2379") == DiscoveryTarget("10.0.0.1", 2379, "default")
    target = DiscoveryTarget.parse("etcd://etcd.local:2379/prod-1")
    assert target.cluster == "prod-1" and target.url("workers") == "etcd://etcd.local:2379/kvxfer/prod-1/workers/"
    for bad in (
        "http://h:2379",
        "etcd://h",
        "etcd://h:99999",
        "etcd://h:2379/a/b",
        "etcd://h:2379/x?y=1",
        "etcd://:2379",
    ):
        with pytest.raises(ConfigError):
            DiscoveryTarget.parse(bad)


def test_router_refuses_a_wildcard_control_address() -> None:
    with pytest.raises(ConfigError, match="wildcard"):
        RouterDiscoveryLink("etcd://127.0.0.1:1", "tcp://0.0.0.0:7100", "m", print)


def test_worker_finds_router_and_router_sees_its_registration(etcd: Etcd) -> None:
    gone = Gone()
    router = RouterDiscoveryLink(url(etcd), "tcp://127.0.0.1:7100", "tiny-random", gone)
    message = register("prefill-a")
    worker = WorkerDiscoveryLink(url(etcd), worker_record(message, "127.0.0.1:4567"))
    try:
        router.start()
        assert worker.find_router(timeout_s=10.0) == "tcp://127.0.0.1:7100"
        assert worker.find_router("tiny-random", timeout_s=1.0) == "tcp://127.0.0.1:7100"
        with pytest.raises(ConfigError, match="no router for model 'other'"):
            worker.find_router("other", timeout_s=0.6)
        worker.start()
        wait_for(lambda: router.registration("prefill-a") == message, 10.0, "the router saw no registration")
        record = router.records["prefill-a"]
        assert record.attributes["side_channel"] == "127.0.0.1:4567" and record.attributes["num_blocks"] == 512
        assert router.registration("nobody") is None
        with EtcdDiscovery(etcd.url, prefix="/kvxfer/c1/workers/") as raw:  # the key layout the runbook shows
            assert [r.name for r in raw.list()] == ["prefill-a"]
        with EtcdDiscovery(etcd.url, prefix="/kvxfer/other/workers/") as raw:  # clusters do not see each other
            assert raw.list() == []
        worker.close()  # revokes the lease: reported after the grace period, once
        assert gone.event.wait(10.0) and gone.names == ["prefill-a"]
        assert router.registration("prefill-a") is None
    finally:
        worker.close()
        router.close()


def test_expired_lease_is_reported_and_a_quick_return_is_not(etcd: Etcd) -> None:
    gone = Gone()
    router = RouterDiscoveryLink(url(etcd), "tcp://127.0.0.1:7100", "tiny-random", gone, grace_s=1.0)
    raw = EtcdDiscovery(etcd.url, prefix="/kvxfer/c1/workers/")
    try:
        router.start()
        raw.register(worker_record(register("p-bounce"), None), ttl_s=2)
        raw.register(worker_record(register("p-dies"), None), ttl_s=1)
        wait_for(lambda: {"p-bounce", "p-dies"} <= set(router.records), 10.0, "records not seen")
        raw.deregister("p-bounce")  # gone and back within the grace period: not reported
        raw.register(worker_record(register("p-bounce"), None), ttl_s=2)
        stopped = time.monotonic()
        raw.stop_keepalive("p-dies")  # as if the process froze: the lease lapses after its TTL
        assert gone.event.wait(15.0)
        elapsed = time.monotonic() - stopped
        assert gone.names == ["p-dies"], gone.names
        # etcd expires leases at whole-second granularity, +grace: a loose bound (not a timing test, a sanity one)
        assert elapsed < 10.0
        time.sleep(1.5)
        assert gone.names == ["p-dies"] and router.registration("p-bounce") is not None
    finally:
        raw.close()
        router.close()


def test_records_with_a_forged_register_are_not_trusted(etcd: Etcd) -> None:
    router = RouterDiscoveryLink(url(etcd), "tcp://127.0.0.1:7100", "tiny-random", Gone())
    raw = EtcdDiscovery(etcd.url, prefix="/kvxfer/c1/workers/")
    try:
        router.start()
        other = register("someone-else").encode()
        raw.register(WorkerRecord("p-forged", "prefill", "tiny-random", {}, other), ttl_s=5)
        raw.register(WorkerRecord("p-junk", "prefill", "tiny-random", {}, b"\x93not msgpack"), ttl_s=5)
        raw.register(WorkerRecord("p-role", "decode", "tiny-random", {}, register("p-role").encode()), ttl_s=5)
        wait_for(lambda: {"p-forged", "p-junk", "p-role"} <= set(router.records), 10.0, "records not seen")
        assert [router.registration(n) for n in ("p-forged", "p-junk", "p-role")] == [None, None, None]
    finally:
        raw.close()
        router.close()


def test_etcd_restart_keeps_workers_and_a_wiped_etcd_gets_them_back(etcd: Etcd) -> None:
    gone = Gone()
    router = RouterDiscoveryLink(url(etcd), "tcp://127.0.0.1:7100", "tiny-random", gone)
    worker = WorkerDiscoveryLink(url(etcd), worker_record(register("decode-b", "decode"), None))
    try:
        router.start()
        worker.start()
        wait_for(lambda: router.registration("decode-b") is not None, 10.0, "worker not registered")
        etcd.stop()
        time.sleep(2.0)  # etcd down: nothing is removed, the router keeps what it knows
        assert gone.names == [] and router.registration("decode-b") is not None
        etcd.start()  # same data: the lease survives (etcd renews leases when it becomes leader)
        time.sleep(3.0)
        assert gone.names == [] and router.registration("decode-b") is not None
        etcd.restart(wipe=True)  # empty store: the worker's keeper re-grants and puts its record again
        with EtcdDiscovery(etcd.url, prefix="/kvxfer/c1/workers/") as raw:
            wait_for(lambda: [r.name for r in raw.list()] == ["decode-b"], 20.0, "worker did not re-register")
        with EtcdDiscovery(etcd.url, prefix="/kvxfer/c1/router/") as raw:
            wait_for(lambda: [r.name for r in raw.list()] == ["router"], 20.0, "router did not re-register")
        assert worker.find_router(timeout_s=5.0) == "tcp://127.0.0.1:7100"
        wait_for(lambda: router.registration("decode-b") is not None, 20.0, "the router lost the worker's record")
    finally:
        worker.close()
        router.close()


def test_a_record_deleted_under_a_live_lease_is_put_back(etcd: Etcd) -> None:
    """The keepalives still succeed (the lease lives) but the key is gone: the worker's link notices within a TTL
    and puts its record back, so the router can take it again."""
    gone = Gone()
    router = RouterDiscoveryLink(url(etcd), "tcp://127.0.0.1:7100", "tiny-random", gone, grace_s=0.0)
    worker = WorkerDiscoveryLink(url(etcd), worker_record(register("p-lost"), None), ttl_s=2.0)
    try:
        router.start()
        worker.start()
        wait_for(lambda: router.registration("p-lost") is not None, 10.0, "worker not registered")
        gateway = EtcdGateway(etcd.url)
        assert gateway.delete(b"/kvxfer/c1/workers/p-lost") == 1
        gateway.close()
        assert gone.event.wait(10.0) and gone.names == ["p-lost"]
        wait_for(lambda: router.registration("p-lost") is not None, 15.0, "the record was not put back")
        assert worker.lease.registrations == 2
    finally:
        worker.close()
        router.close()


def test_an_overflowing_watch_is_rebuilt_from_a_listing(etcd: Etcd) -> None:
    gone = Gone()
    raw = EtcdDiscovery(etcd.url, prefix="/kvxfer/c1/workers/")
    router = RouterDiscoveryLink(url(etcd), "tcp://127.0.0.1:7100", "tiny-random", gone, max_pending=2, grace_s=0.0)
    try:
        for index in range(8):  # more events than the watch holds before the router's thread reads them
            raw.register(worker_record(register(f"p{index}"), None), ttl_s=5)
        router.start()
        wait_for(lambda: set(router.records) == {f"p{i}" for i in range(8)}, 10.0, "records missing after overflow")
        raw.deregister("p3")
        assert gone.event.wait(10.0) and gone.names == ["p3"]
    finally:
        raw.close()
        router.close()
