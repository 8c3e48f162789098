"""The checks a target runs on device staged chunks before anything moves (CPU: no GPU needed for these)."""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.backends.ucx.device_slots import check_device_spans
from kvxfer.backends.ucx.wire import Header, Kind, Stage, descs_nbytes, pack_descs, unpack_descs

REGIONS = {0: (0x10000, 1 << 20, 0), 1: (0x200000, 1 << 20, 0), 2: (0x900000, 1 << 20, 1)}


def _spans(*items: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    addr, nbytes, region = zip(*items)
    return (np.array(addr, dtype=np.uint64), np.array(nbytes, dtype=np.uint64), np.array(region, dtype=np.int32))


def test_spans_inside_regions_of_one_device_give_that_device() -> None:
    assert check_device_spans(*_spans((0x10000, 4096, 0), (0x200000 + (1 << 20) - 4096, 4096, 1)), REGIONS) == 0
    assert check_device_spans(*_spans((0x900000, 1 << 20, 2)), REGIONS) == 1


@pytest.mark.parametrize("spans, reason", [
    (((0x10000 - 1, 4096, 0),), "outside region 0"),
    (((0x10000 + (1 << 20) - 4095, 4096, 0),), "outside region 0"),
    (((0x10000, 0, 0),), "outside region 0"),
    (((0x10000, 4096, 5),), "region 5 is not a registered CUDA region"),
    (((0x10000, 4096, 0), (0x900000, 4096, 2)), "devices [0, 1]"),
])
def test_bad_spans_are_refused(spans: tuple, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        check_device_spans(*_spans(*spans), REGIONS)


def test_stage_record_round_trip_after_descriptors() -> None:
    addr, nbytes, region = _spans((0x10000, 4096, 0), (0x20000, 8192, 0), (0x30000, 4096, 1))
    stage = Stage(0xDEAD0000, b"packed-key", True, b"worker-address").pack()
    payload = np.zeros(descs_nbytes(3) + stage.size, dtype=np.uint8)
    pack_descs(payload, addr, nbytes, region)
    payload[descs_nbytes(3):] = stage
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
    values = {"slot": 0x1000, "rkey": b"key", "peer_mode": False, "address": b"addr"}
    values[field] = b""
    with pytest.raises(ValueError):
        Stage.unpack(Stage(**values).pack())
