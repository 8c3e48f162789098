"""The UCX binding and the backend's pure pieces: struct layouts against the real headers, wire formats, settings,
host gather/scatter, cross-memory batching, error-mode choice."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.backends.ucx.binding import cdef, ucx_available
from kvxfer.backends.ucx.cma import MAX_IOV, plan_batches
from kvxfer.backends.ucx.config import UcxConfig
from kvxfer.backends.ucx.gather import check_spans, gather, scatter
from kvxfer.backends.ucx.link import error_mode
from kvxfer.backends.ucx.wire import Header, Kind, WorkerInfo, descs_nbytes, pack_descs, unpack_descs
from kvxfer.errors import ConfigError, HandshakeError

STRUCTS = [
    "ucp_params_t",
    "ucp_worker_params_t",
    "ucp_err_handler_t",
    "ucp_ep_params_t",
    "ucp_mem_map_params_t",
    "ucp_request_param_t",
    "ucp_am_handler_param_t",
    "ucp_am_recv_param_t",
    "ucp_transport_entry_t",
    "ucp_transports_t",
    "ucp_ep_attr_t",
]
CONSTANTS = [name for name in dir(cdef) if name.startswith(("UCP_", "UCS_")) and isinstance(getattr(cdef, name), int)]


@pytest.mark.ucx
def test_library_loads_and_reports_itself() -> None:
    from kvxfer.backends.ucx.binding import load_library

    assert ucx_available() is None
    library = load_library()
    assert library.version >= (1, 12, 0)
    assert os.path.exists(library.path)
    assert library.status_text(cdef.UCS_ERR_BUSY)  # "Device is busy": the status table is reachable


@pytest.mark.ucx
def test_struct_layouts_and_constants_match_the_headers(tmp_path) -> None:
    """Our ABI-mode declarations against ucp.h, compiled: every size, field offset and constant must agree."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    libucx = pytest.importorskip("libucx")
    include = os.path.join(os.path.dirname(libucx.__file__), "include")
    if compiler is None or not os.path.exists(os.path.join(include, "ucp", "api", "ucp.h")):
        pytest.skip("needs a C compiler and the libucx wheel's headers")
    from kvxfer.backends.ucx.binding import load_library

    ffi = load_library().ffi
    lines, expected = [], {}
    for name in STRUCTS:
        lines.append(f'printf("{name} %zu\\n", sizeof({name}));')
        expected[name] = ffi.sizeof(name)
        for field, _info in ffi.typeof(name).fields:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof({name}, {field}));')
            expected[f"{name}.{field}"] = ffi.offsetof(name, field)
    lines.append('printf("ucs_status_t %zu\\n", sizeof(ucs_status_t));')
    expected["ucs_status_t"] = 1
    for name in CONSTANTS:
        lines.append(f'printf("{name} %lld\\n", (long long)({name}));')
        expected[name] = getattr(cdef, name)
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include <ucp/api/ucp.h>\nint main(void) {\n"
        + "\n".join(lines)
        + "\nreturn 0;\n}\n"
    )
    subprocess.run([compiler, "-I", include, str(source), "-o", str(tmp_path / "layout")], check=True)
    output = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    actual = {key: int(value) for key, value in (line.split() for line in output.splitlines())}
    mismatches = {key: (expected[key], actual[key]) for key in expected if expected[key] != actual[key]}
    assert not mismatches, f"ours vs ucp.h: {mismatches}"


def test_worker_info_round_trip_and_rejects_garbage() -> None:
    info = WorkerInfo(b"\x01" * 200, "none", 0x7F0000001000, b"t" * 16)
    assert WorkerInfo.decode(info.encode(), "p") == info
    for bad in (b"", b"KVXU", b"XXXX" + info.encode()[4:], info.encode()[:32]):
        with pytest.raises(HandshakeError):
            WorkerInfo.decode(bad, "p")


def test_header_round_trip_and_unknown_messages_are_dropped() -> None:
    header = Header(Kind.SCATTER, transfer=2**40 + 3, chunk=7, count=4096)
    assert Header.decode(header.encode()) == header
    assert Header.decode(b"junk") is None
    assert Header.decode(b"KX\x01\x63" + bytes(16)) is None  # unknown kind
    assert Header.decode(b"KX\x02\x01" + bytes(16)) is None  # unknown version


def test_descriptor_payload_round_trip() -> None:
    addr = np.array([1, 2**63 + 5, 77], dtype=np.uint64)
    nbytes = np.array([4096, 1, 2**40], dtype=np.uint64)
    region = np.array([0, -1, 65535], dtype=np.int32)
    payload = np.zeros(descs_nbytes(3) + 5, dtype=np.uint8)
    assert pack_descs(payload, addr, nbytes, region) == descs_nbytes(3)
    got_addr, got_nbytes, got_region, rest = unpack_descs(payload, 3)
    assert (got_addr == addr).all() and (got_nbytes == nbytes).all() and (got_region == region).all()
    assert rest.size == 5
    with pytest.raises(ValueError):
        unpack_descs(payload[:10], 3)


def test_config_from_environment() -> None:
    config = UcxConfig.from_env(
        {
            "KVXFER_UCX_ERROR_MODE": "Peer",
            "KVXFER_UCX_CMA": "off",
            "KVXFER_UCX_STAGE_BELOW": "0x1000",
            "KVXFER_UCX_LIB": "",
        }
    )
    assert (config.error_mode, config.cma, config.stage_below, config.library_path) == ("peer", "off", 4096, None)
    assert UcxConfig.from_env({}) == UcxConfig()
    for bad in (
        {"KVXFER_UCX_ERROR_MODE": "sometimes"},
        {"KVXFER_UCX_STAGE_CHUNK": "12"},
        {"KVXFER_UCX_STAGE_INFLIGHT": "x"},
        {"KVXFER_UCX_CMA_THREADS": "65"},
        {"KVXFER_UCX_CMA_INLINE": "-1"},
    ):
        with pytest.raises(ConfigError):
            UcxConfig.from_env(bad)


def test_config_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVXFER_UCX_CMA_INLINE", "65536")
    monkeypatch.setenv("KVXFER_UCX_CMA_THREADS", "1")
    monkeypatch.setenv("KVXFER_UCX_STAGE_INFLIGHT", "2")
    config = UcxConfig.from_env()
    assert (config.cma_inline, config.cma_threads, config.stage_inflight) == (65536, 1, 2)


def test_error_mode_is_symmetric_and_follows_the_host() -> None:
    policies = ("auto", "peer", "none")
    for a in policies:
        for b in policies:
            for same_host in (True, False):
                assert error_mode(a, b, same_host) == error_mode(b, a, same_host)
    assert error_mode("auto", "auto", True) == "none"
    assert error_mode("auto", "auto", False) == "peer"
    assert error_mode("none", "peer", True) == "peer"


def _regions(seed: int):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(1, 255, 1 << 16, dtype=np.uint8) for _ in range(2)]
    table = {i: (a.ctypes.data, a) for i, a in enumerate(arrays)}
    return table, (lambda index: table[index])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_gather_then_scatter_matches_a_loop(data) -> None:
    table, lookup = _regions(data.draw(st.integers(0, 1000)))
    unit = data.draw(st.sampled_from([1, 2, 8, 512, 4096]))
    count = data.draw(st.integers(1, 12))
    slots = data.draw(st.permutations(range(16)))[:count]  # disjoint 4 KiB slots: scatter never overlaps
    sizes = np.array([unit * data.draw(st.integers(1, max(1, 4096 // unit))) for _ in range(count)], np.uint64)
    region = np.array([data.draw(st.integers(0, 1)) for _ in range(count)], dtype=np.int32)
    shift = np.array([data.draw(st.integers(0, 4096 - int(s))) // unit * unit for s in sizes], dtype=np.uint64)
    addr = np.array([table[int(r)][0] + 4096 * s for r, s in zip(region, slots, strict=True)], np.uint64) + shift
    assert check_spans(addr, sizes, region, lookup) is None
    packed = np.zeros(int(sizes.sum()), dtype=np.uint8)
    gather(packed, addr, sizes, region, lookup)
    expected = b"".join(
        table[int(r)][1][int(a) - table[int(r)][0] :][: int(s)].tobytes()
        for a, s, r in zip(addr, sizes, region, strict=True)
    )
    assert packed.tobytes() == expected
    for _base, array in table.values():
        array[:] = 0
    scatter(packed, addr, sizes, region, lookup)
    assert (
        b"".join(
            table[int(r)][1][int(a) - table[int(r)][0] :][: int(s)].tobytes()
            for a, s, r in zip(addr, sizes, region, strict=True)
        )
        == expected
    )
    assert sum(int(a.astype(bool).sum()) for _b, a in table.values()) <= int(sizes.sum())


def test_spans_outside_regions_are_refused() -> None:
    table, lookup = _regions(1)
    base = table[0][0]
    one = np.array([4096], np.uint64)
    assert check_spans(np.array([base + (1 << 16) - 100], np.uint64), one, np.array([0], np.int32), lookup)
    assert check_spans(np.array([base - 1], np.uint64), one, np.array([0], np.int32), lookup)
    assert check_spans(np.array([base], np.uint64), one, np.array([7], np.int32), lookup)
    assert check_spans(np.array([base], np.uint64), np.array([0], np.uint64), np.array([0], np.int32), lookup)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**32 - 1), st.sampled_from([1, 4096, 1 << 20]))
def test_cross_memory_batches_move_every_byte_to_its_place(count: int, seed: int, batch_bytes: int) -> None:
    rng = np.random.default_rng(seed)
    size = 16
    local = (rng.permutation(4 * count)[:count] * size).astype(np.uint64)
    remote = (rng.permutation(4 * count)[:count] * size).astype(np.uint64)
    nbytes = np.full(count, size, dtype=np.uint64)
    source = rng.integers(0, 255, 4 * count * size, dtype=np.uint8)
    target = np.zeros_like(source)
    for batch in plan_batches(local, remote, nbytes, batch_bytes):
        assert len(batch.local) <= MAX_IOV and len(batch.remote) <= MAX_IOV
        assert int(batch.local[:, 1].sum()) == int(batch.remote[:, 1].sum()) == batch.nbytes
        stream = np.concatenate([source[int(a) : int(a) + int(n)] for a, n in batch.local])
        position = 0
        for a, n in batch.remote:  # the kernel's semantics: the two iovec streams pair up byte by byte
            target[int(a) : int(a) + int(n)] = stream[position : position + int(n)]
            position += int(n)
    expected = np.zeros_like(source)
    for a, b in zip(local, remote, strict=True):
        expected[int(b) : int(b) + size] = source[int(a) : int(a) + size]
    assert (target == expected).all()
