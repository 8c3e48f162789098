"""The checks a target runs on device staged chunks before anything moves (CPU: no GPU needed for these)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvxfer.backends.ucx.device_slots import check_device_spans
from kvxfer.backends.ucx.wire import Header, Kind, Stage, descs_nbytes, pack_descs, unpack_descs

REGIONS = {0: (0x10000, 1 << 20, 0), 1: (0x200000, 1 << 20, 0), 2: (0x900000, 1 << 20, 1)}


def _spans(*items: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    addr, nbytes, region = zip(*items, strict=True)
    return (np.array(addr, dtype=np.uint64), np.array(nbytes, dtype=np.uint64), np.array(region, dtype=np.int32))


def test_spans_inside_regions_of_one_device_give_that_device() -> None:
    assert check_device_spans(*_spans((0x10000, 4096, 0), (0x200000 + (1 << 20) - 4096, 4096, 1)), REGIONS) == 0
    assert check_device_spans(*_spans((0x900000, 1 << 20, 2)), REGIONS) == 1


@pytest.mark.parametrize(
    "spans, reason",
    [
        (((0x10000 - 1, 4096, 0),), "outside region 0"),
        (((0x10000 + (1 << 20) - 4095, 4096, 0),), "outside region 0"),
        (((0x10000, 0, 0),), "outside region 0"),
        (((0x10000, 4096, 5),), "region 5 is not a registered CUDA region"),
        (((0x10000, 4096, 0), (0x900000, 4096, 2)), "devices [0, 1]"),
    ],
)
def test_bad_spans_are_refused(spans: tuple, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        check_device_spans(*_spans(*spans), REGIONS)


def test_stage_record_round_trip_after_descriptors() -> None:
    addr, nbytes, region = _spans((0x10000, 4096, 0), (0x20000, 8192, 0), (0x30000, 4096, 1))
    stage = Stage(0xDEAD0000, b"packed-key", True, b"worker-address").pack()
    payload = np.zeros(descs_nbytes(3) + stage.size, dtype=np.uint8)
    pack_descs(payload, addr, nbytes, region)
    payload[descs_nbytes(3) :] = stage
    got_addr, got_nbytes, got_region, rest = unpack_descs(payload, 3)
    assert got_addr.tolist() == addr.tolist() and got_nbytes.tolist() == nbytes.tolist()
    assert got_region.tolist() == region.tolist()
    assert Stage.unpack(rest) == Stage(0xDEAD0000, b"packed-key", True, b"worker-address")
    assert Header.decode(Header(Kind.DGATHER, 5, 2, 3).encode()) == Header(Kind.DGATHER, 5, 2, 3)


@pytest.mark.parametrize("cut", [0, 5, 15, 16, 19])
def test_truncated_or_padded_stage_records_are_refused(cut: int) -> None:
    record = Stage(0x1000, b"key", False, b"addr").pack()
    assert Stage.unpack(record) == Stage(0x1000, b"key", False, b"addr")
    with pytest.raises(ValueError):
        Stage.unpack(record[:cut])
    with pytest.raises(ValueError):
        Stage.unpack(np.concatenate([record, np.zeros(1, dtype=np.uint8)]))


@pytest.mark.parametrize("field", ["rkey", "address"])
def test_stage_records_without_key_or_address_are_refused(field: str) -> None:
    values: dict[str, Any] = {"slot": 0x1000, "rkey": b"key", "peer_mode": False, "address": b"addr"}
    values[field] = b""
    with pytest.raises(ValueError):
        Stage.unpack(Stage(**values).pack())


class _Pool:
    """Stands in for DeviceSlots: two slots, no GPU."""

    slot_nbytes = 1 << 20

    def __init__(self) -> None:
        self.free = [0x1000, 0x2000]
        self.scattered: list = []

    def take(self):
        return self.free.pop() if self.free else None

    def give(self, slot: int) -> None:
        self.free.append(slot)

    def packed_rkey(self, slot: int) -> bytes:
        return b"key-%x" % slot

    def scatter(self, slot: int, addr, nbytes) -> None:
        self.scattered.extend(zip(addr.tolist(), nbytes.tolist(), strict=True))


class _Parts:
    """What DeviceServer is built from (worker, regions, slots, timeouts, replies), no GPU, no UCX; its replies are
    recorded instead of sent."""

    def __init__(self) -> None:
        self.pool = _Pool()
        self.replies: list[tuple[Any, ...]] = []
        self.deferred: list[Any] = []
        worker = type("Worker", (), {"address": b"target-address", "defer": self.deferred.append, "library": None})()
        regions = type(
            "Regions",
            (),
            {
                "check_device_spans": lambda _self, addr, nbytes, region: check_device_spans(
                    addr, nbytes, region, REGIONS
                )
            },
        )()
        slots = type("Slots", (), {"slot_nbytes": _Pool.slot_nbytes, "get": lambda _self, role, device: self.pool})()
        timeouts = type("Timeouts", (), {"transfer": 0.0})()
        replies = type(
            "Replies",
            (),
            {
                "reply": lambda _self, ep, header, payload=None: self.replies.append(
                    ("reply", header.kind, header.chunk)
                ),
                "refuse": lambda _self, header, ep, reason: self.replies.append(("refuse", header.kind, reason)),
            },
        )()
        self.arguments = (worker, regions, slots, timeouts, replies)


def _dscatter(chunk: int) -> tuple[Header, bytes]:
    addr, nbytes, region = _spans((0x10000 + chunk * 4096, 4096, 0))
    stage = Stage(0xBEEF000, b"requester-key", False, b"requester-address").pack()
    payload = np.zeros(descs_nbytes(1) + stage.size, dtype=np.uint8)
    pack_descs(payload, addr, nbytes, region)
    payload[descs_nbytes(1) :] = stage
    return Header(Kind.DSCATTER, 7, chunk, 1), payload.tobytes()


def test_grants_wait_for_free_slots_and_uncommitted_ones_are_taken_back() -> None:
    """Three DSCATTER chunks, two serving slots: two GRANTs at once, the third waits; grants never committed
    (the requester died) return their slots after the deadline, the waiting chunk gets one, and a late DCOMMIT
    for a taken-back grant is refused."""
    from kvxfer.backends.ucx.device_serve import DeviceServer

    backend = _Parts()
    server = DeviceServer(*backend.arguments)  # type: ignore[arg-type]
    for chunk in range(3):
        server.accept(*_dscatter(chunk), reply_ep=1)
    for work in backend.deferred:
        work()
    backend.deferred.clear()
    assert backend.replies == [("reply", Kind.GRANT, 0), ("reply", Kind.GRANT, 1)]
    assert server.busy and backend.pool.free == []
    assert server.expire_grants(older_than=60.0) == 0  # fresh grants stay
    assert server.expire_grants(older_than=0.0) == 2  # as if the deadline had passed
    assert backend.replies[-1] == ("reply", Kind.GRANT, 2) and len(backend.pool.free) == 1
    commit = Stage(0xBEEF000, b"-", False, b"requester-address").pack().tobytes()
    with pytest.raises(ValueError, match="no slot was granted to chunk 0"):
        server.commit(Header(Kind.DCOMMIT, 7, 0, 1), commit, reply_ep=1)
    server.commit(Header(Kind.DCOMMIT, 7, 2, 1), commit, reply_ep=1)
    for work in backend.deferred:
        work()
    assert backend.pool.scattered == [(0x10000 + 2 * 4096, 4096)]
    assert backend.replies[-1] == ("reply", Kind.ACK, 2)
    assert len(backend.pool.free) == 2 and not server.busy


def test_a_committed_chunk_frees_its_slot_for_a_waiting_one() -> None:
    from kvxfer.backends.ucx.device_serve import DeviceServer

    backend = _Parts()
    server = DeviceServer(*backend.arguments)  # type: ignore[arg-type]
    for chunk in range(3):
        server.accept(*_dscatter(chunk), reply_ep=1)
    while backend.deferred:  # what the worker's progress runs after the callbacks
        backend.deferred.pop(0)()
    assert [reply[2] for reply in backend.replies] == [0, 1]  # two slots: chunk 2 waits
    commit = Stage(0xBEEF000, b"-", False, b"requester-address").pack().tobytes()
    server.commit(Header(Kind.DCOMMIT, 7, 1, 1), commit, reply_ep=1)
    while backend.deferred:
        backend.deferred.pop(0)()
    assert backend.replies[2:] == [("reply", Kind.ACK, 1), ("reply", Kind.GRANT, 2)]
