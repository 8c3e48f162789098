"""Control messages: round trips, validation, caps, a fuzz of decode; the zmq link between two ends."""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvxfer.errors import HandshakeError
from kvxfer.serve import protocol as p

SAMPLES: list[p.Message] = [
    p.Register("w0", "decode", "tiny-random", 16, 128, 4096, (b"rank0",), 32, "cpu"),
    p.Load(10, 2, 1, 0, 0, 100.0, 50.5, {"p0": (1e9, 1e-3)}),
    p.Tokens("r1", (1, 2, 3), None, {"queue_s": 0.01, "kv_bytes": 4096.0}),
    p.Tokens("r1", (), "stop"),
    p.TokensBatch((p.Tokens("a", (1,)), p.Tokens("b", (2,), "length"))),
    p.Prefilled("r1", b"\x00" * 100, 7, {"prefill_s": 0.1}),
    p.Error("r1", "transfer", "the pull failed"),
    p.Peers((p.PeerInfo("p0", "prefill", (b"x", b"y")),)),
    p.Generate("r1", (1, 2), p.Sampling(8, 0.7, 0.9, 3, (5,), True), 1e9),
    p.Prefill("r1", (1, 2), p.Sampling(), "d0", 1e9),
    p.Decode("r1", (1, 2), p.Sampling(), b"ready", 4, 1e9),
    p.Abort("r1"),
    p.Shutdown(2.5),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(message: p.Message) -> None:
    assert p.decode(message.encode()) == message


def _frame(**body: object) -> bytes:
    return msgpack.packb({"v": 1, **body}, use_bin_type=True)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"garbage",
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 2, "t": "abort", "rid": "x"}),
        _frame(t="nope"),
        _frame(t="abort"),
        _frame(t="abort", rid=""),
        _frame(t="abort", rid=5),
        _frame(t="generate", rid="r", prompt_token_ids=[], sampling={}, deadline_s=1.0),
        _frame(t="generate", rid="r", prompt_token_ids=[-1], sampling={}, deadline_s=1.0),
        _frame(t="generate", rid="r", prompt_token_ids=[1], sampling={"max_tokens": 0}, deadline_s=1.0),
        _frame(t="generate", rid="r", prompt_token_ids=[1], sampling={"temperature": float("nan")}, deadline_s=1.0),
        _frame(t="generate", rid="r", prompt_token_ids=[True], sampling={}, deadline_s=1.0),
        _frame(t="tokens", rid="r", token_ids=[1], finish="weird"),
        _frame(
            t="load",
            free_blocks=1,
            active_blocks=1,
            running=1,
            waiting=1,
            queued_prefill_tokens=1,
            prefill_tokens_per_s=1.0,
            decode_tokens_per_s=1.0,
            links={"p": [1.0]},
        ),
        _frame(t="peers", peers=[{"name": "x", "role": "boss", "rank_info": [b"x"]}]),
        _frame(t="shutdown", drain_s=-1.0),
        _frame(t="abort", rid="x" * 10_000),
    ],
)
def test_bad_frames_raise_handshake_error(frame: bytes) -> None:
    with pytest.raises(HandshakeError):
        p.decode(frame)


def test_size_caps() -> None:
    big = p.Tokens("r", tuple([1] * 200_000)).encode()
    assert len(big) <= p.MAX_SMALL_NBYTES
    huge = _frame(t="abort", rid="r", pad=b"x" * p.MAX_SMALL_NBYTES)
    with pytest.raises(HandshakeError, match="cap"):
        p.decode(huge)  # only decode / prefilled may exceed 1 MiB
    ready = p.Decode("r", (1,), p.Sampling(), b"k" * (2 << 20), 1, 1.0).encode()
    assert p.decode(ready).kv_ready == b"k" * (2 << 20)
    with pytest.raises(HandshakeError):
        p.decode(b"\x00" * (p.MAX_MESSAGE_NBYTES + 1))


def test_unknown_fields_are_ignored() -> None:
    assert p.decode(_frame(t="abort", rid="r", extra=[1, 2])) == p.Abort("r")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_bytes(data: bytes) -> None:
    try:
        p.decode(data)
    except HandshakeError:
        pass


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(p.TYPES)),
    st.dictionaries(
        st.sampled_from(
            [
                "rid",
                "token_ids",
                "finish",
                "timing",
                "sampling",
                "prompt_token_ids",
                "deadline_s",
                "items",
                "peers",
                "links",
                "kv_ready",
                "first_token",
                "drain_s",
                "name",
                "role",
                "rank_info",
            ]
        ),
        _values,
        max_size=8,
    ),
)
def test_fuzz_structured(kind: str, body: dict) -> None:
    try:
        message = p.decode(_frame(t=kind, **body))
    except HandshakeError:
        return
    assert p.decode(message.encode()) == message  # whatever is accepted survives a round trip


def test_link_round_trip_and_bad_frames() -> None:
    from kvxfer.serve.control import RouterLink, WorkerLink

    at_router: list = []
    at_worker: list = []
    with (
        RouterLink("tcp://127.0.0.1:0", lambda identity, m: at_router.append((identity, m))) as router,
        WorkerLink(router.address, "w0", at_worker.append) as worker,
    ):
        worker.send(SAMPLES[0])
        worker.send(SAMPLES[4])
        _until(lambda: len(at_router) == 3)
        assert at_router[0] == (b"w0", SAMPLES[0])
        assert [m.rid for _, m in at_router[1:]] == ["a", "b"]  # a batch arrives as its Tokens
        router.send(b"w0", p.Abort("a"))
        router.send(b"nobody", p.Abort("b"))  # unroutable: counted, not raised
        _until(lambda: at_worker == [p.Abort("a")] and router.num_unsent == 1)
        worker._queue([b"\x93garbage"])  # a bad frame: dropped, the link keeps going
        worker.send(p.Abort("z"))
        _until(lambda: router.num_dropped == 1 and at_router[-1] == (b"w0", p.Abort("z")))
        assert worker.connected
    # the worker notices a dead router
    with RouterLink("tcp://127.0.0.1:0", lambda identity, m: None) as router:
        address = router.address
        worker = WorkerLink(address, "w1", at_worker.append)
        _until(lambda: worker.connected)
    _until(lambda: worker.disconnected_s > 0.2)
    worker.close()


def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_every_schema_names_every_field() -> None:
    import dataclasses

    for cls in (*p.TYPES.values(), p.Sampling, p.PeerInfo):
        assert list(cls._SCHEMA) == [f.name for f in dataclasses.fields(cls)] or set(cls._SCHEMA) == {
            f.name for f in dataclasses.fields(cls)
        }, cls  # to_wire walks the schema
