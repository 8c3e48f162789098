"""EtcdDiscovery against a real etcd (Debian ``etcd-server``) started on free loopback ports for each test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

from kvxfer.errors import PeerError
from kvxfer.serve.discovery import DiscoveryEvent, DiscoveryWatch, WorkerRecord
from kvxfer.serve.discovery_etcd import EtcdDiscovery, EtcdGateway, prefix_end

ETCD = shutil.which("etcd")
pytestmark = [
    pytest.mark.skipif(ETCD is None, reason="etcd binary not found (Debian: apt-get install etcd-server)"),
    pytest.mark.timeout(90),
]
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Etcd:
    """One etcd process with its own data directory; ``restart(wipe=True)`` brings it back empty."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.directory / "etcd.log", "ab")
        self.process = subprocess.Popen(
            [
                str(ETCD),
                "--name",
                "test",
                "--data-dir",
                str(self.directory / "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"test={peer}",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {(self.directory / 'etcd.log').read_text()[-2000:]}")
            try:
                if httpx.post(f"{self.url}/v3/kv/range", json={"key": "AA=="}, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not answer within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, wipe: bool) -> None:
        self.stop()
        if wipe:
            shutil.rmtree(self.directory / "data", ignore_errors=True)
        self.start()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def next_event(watch: DiscoveryWatch, timeout: float) -> DiscoveryEvent:
    event = watch.get(timeout=timeout)
    assert event is not None, f"no discovery event within {timeout} s"
    return event


def record(name: str, **attributes: int | str) -> WorkerRecord:
    return WorkerRecord(name, "prefill", "tiny-random", dict(attributes), os.urandom(64))


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"


def test_register_list_watch_update_deregister(etcd: Etcd) -> None:
    discovery = EtcdDiscovery(etcd.url, watch_read_timeout_s=1.0)
    try:
        discovery.register(record("p0", num_blocks=64), ttl_s=5)
        watch = discovery.watch()
        first = next_event(watch, 5.0)
        assert (first.kind, first.name) == ("add", "p0")
        discovery.register(record("d0"), ttl_s=5)
        assert (next_event(watch, 10.0).kind, [r.name for r in discovery.list()]) == ("add", ["d0", "p0"])
        updated = record("p0", num_blocks=128)
        discovery.register(updated, ttl_s=5)
        event = next_event(watch, 10.0)
        assert (event.kind, event.record) == ("update", updated)
        assert discovery.deregister("p0")
        event = next_event(watch, 10.0)
        assert (event.kind, event.name) == ("remove", "p0")
        assert [r.name for r in discovery.list()] == ["d0"]
        assert discovery.keepalive("d0") and not discovery.keepalive("p0")
    finally:
        discovery.close()
    with EtcdDiscovery(etcd.url) as other:  # close revoked d0's lease: gone at once
        assert other.list() == []


def test_bad_records_under_the_prefix_are_dropped(etcd: Etcd) -> None:
    gateway = EtcdGateway(etcd.url)
    with EtcdDiscovery(etcd.url, watch_read_timeout_s=1.0) as discovery:
        gateway.put(discovery.prefix + b"junk", b"{not json")
        gateway.put(discovery.prefix + b"elsewhere", record("p9").encode())  # name and key disagree
        discovery.register(record("p1"), ttl_s=5)
        assert [r.name for r in discovery.list()] == ["p1"] and discovery.num_bad_records == 2
        watch = discovery.watch()
        assert next_event(watch, 5.0).name == "p1"
        gateway.put(discovery.prefix + b"junk2", b"\xff\xfe")  # while watching: dropped, the watch goes on
        discovery.register(record("p3"), ttl_s=5)
        event = next_event(watch, 10.0)
        assert (event.kind, event.name) == ("add", "p3") and discovery.num_bad_records >= 3
    gateway.close()


def test_keepalive_holds_and_dead_process_expires_within_ttl_plus_one(etcd: Etcd, tmp_path: Path) -> None:
    """A worker process registers with a 2 s lease and is SIGKILLed: watchers see it go within TTL + 1 s of the
    kill. Before that, its keepalives hold the record well past the TTL."""
    ttl = 2
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from kvxfer.serve.discovery import WorkerRecord
        from kvxfer.serve.discovery_etcd import EtcdDiscovery
        discovery = EtcdDiscovery({etcd.url!r})
        discovery.register(WorkerRecord("prefill-7", "prefill", "tiny-random"), ttl_s={ttl})
        print("registered", flush=True)
        time.sleep(600)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    with EtcdDiscovery(etcd.url, watch_read_timeout_s=1.0) as discovery:
        try:
            assert worker.stdout is not None and worker.stdout.readline() == b"registered\n"
            watch = discovery.watch()
            assert next_event(watch, 5.0).name == "prefill-7"
            time.sleep(2.5 * ttl)  # longer than the TTL: only keepalives keep it
            assert [r.name for r in discovery.list()] == ["prefill-7"] and watch.drain() == []
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            killed = time.monotonic()
            event = next_event(watch, ttl + 1.0)
            assert (event.kind, event.name) == ("remove", "prefill-7")
            assert time.monotonic() - killed <= ttl + 1.0
            assert discovery.list() == []
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)
            if worker.stdout is not None:
                worker.stdout.close()


def test_stopped_keepalive_expires_in_process(etcd: Etcd) -> None:
    with EtcdDiscovery(etcd.url, watch_read_timeout_s=1.0) as discovery:
        discovery.register(record("p2"), ttl_s=1)
        ttl = discovery.lease_ttl("p2")
        assert ttl is not None and ttl >= 1  # etcd raises a 1 s lease to its minimum (2 s by default)
        watch = discovery.watch()
        assert next_event(watch, 5.0).kind == "add"
        assert discovery.stop_keepalive("p2") and not discovery.stop_keepalive("p2")
        stopped = time.monotonic()
        event = next_event(watch, ttl + 1.0)
        assert (event.kind, event.name) == ("remove", "p2") and time.monotonic() - stopped <= ttl + 1.0


def test_etcd_restarted_empty_workers_register_again(etcd: Etcd) -> None:
    """etcd loses everything (restart on an empty data dir): the keepalive finds its lease gone and registers
    again; a watcher that lived through the outage follows the new store (it sees a later deregistration)."""
    with (
        EtcdDiscovery(etcd.url, watch_read_timeout_s=1.0) as worker_side,
        EtcdDiscovery(etcd.url, watch_read_timeout_s=1.0) as router_side,
    ):
        worker_side.register(record("d5"), ttl_s=2)
        watch = router_side.watch()
        assert next_event(watch, 5.0).kind == "add"
        etcd.restart(wipe=True)
        deadline = time.monotonic() + 30.0
        names: list[str] = []
        while time.monotonic() < deadline and names != ["d5"]:
            time.sleep(0.2)
            try:
                names = [r.name for r in router_side.list()]
            except PeerError:  # etcd still starting: keep polling until the deadline
                names = []
        assert names == ["d5"], "the worker did not register again after etcd came back empty"
        assert worker_side.reregistrations("d5") >= 1
        assert worker_side.deregister("d5")
        deadline = time.monotonic() + 15.0
        seen: list[tuple[str, str]] = []
        while time.monotonic() < deadline and ("remove", "d5") not in seen[-1:]:
            event = watch.get(timeout=1.0)
            if event is not None:
                seen.append((event.kind, event.name))
        assert seen and seen[-1] == ("remove", "d5"), seen
