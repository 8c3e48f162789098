"""Connectors in one process (local and mock backends): pull and push equal the aggregated engine across block
sizes and layouts, with prefix hits on both sides; leases, failures and timeouts end cleanly with no block leaked."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvxfer
from kvxfer.backends.mock import Fault, MockBackend
from kvxfer.engine import (
    CacheConfig,
    DecodeConnector,
    DecodeEngine,
    KVReady,
    KVWanted,
    Model,
    ModelConfig,
    OutOfBlocksError,
    PrefillConnector,
    PrefillEngine,
    RankInfo,
    Request,
    SamplingParams,
)
from kvxfer.engine.messages import FORMAT_VERSION
from kvxfer.errors import ConfigError, HandshakeError, LayoutMismatchError
from kvxfer.pipe.checksum import Checksums

pytestmark = pytest.mark.timeout(60)

SYSTEM = list(range(100, 140))  # a 40-token shared prefix
PROMPTS = [
    [*SYSTEM, 1, 2, 3],
    SYSTEM + [5] * 9,
    list(range(3, 30)),
    SYSTEM[:20] + [7] * 5,
    [9, 8, 7],
    SYSTEM + [7] * 30,
]


def _requests(max_tokens: int = 6) -> list[Request]:
    return [Request(f"r{i}", p, SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def aggregated(tiny_model: Model) -> dict[str, tuple[int, ...]]:
    engine = DecodeEngine(tiny_model, CacheConfig(num_blocks=128))
    return {o.request_id: o.output_token_ids for o in engine.generate(_requests())}


class Pair:
    """A prefill and a decode connector in this process, connected both ways."""

    def __init__(
        self,
        model: Model,
        p_cache: dict,
        d_cache: dict,
        p_backend: Any = "local",
        d_backend: Any = "local",
        lease_ttl: float = 10.0,
        timeout: float = 30.0,
        verify: tuple[bool, bool] = (False, False),
    ) -> None:
        self.p_agent = kvxfer.Agent("p0", backends=[p_backend])
        self.d_agent = kvxfer.Agent("d0", backends=[d_backend])
        self.prefill = PrefillConnector(
            PrefillEngine(model, CacheConfig(**p_cache)), self.p_agent, lease_ttl=lease_ttl, verify=verify[0]
        )
        self.decode = DecodeConnector(
            DecodeEngine(model, CacheConfig(**d_cache)), self.d_agent, timeout=timeout, verify=verify[1]
        )
        self.to_decode = self.prefill.connect([self.decode.info().encode()])
        self.to_prefill = self.decode.connect([self.prefill.info()])

    def free_everywhere(self) -> bool:
        return (
            self.prefill.engine.num_free_blocks == self.prefill.spec.num_blocks
            and self.decode.engine.num_free_blocks == self.decode.spec.num_blocks
        )

    def close(self) -> None:
        self.prefill.close()
        self.decode.close()
        self.p_agent.close()
        self.d_agent.close()


@pytest.fixture
def pair_factory(tiny_model: Model) -> Any:
    made: list[Pair] = []

    def make(p_cache: dict | None = None, d_cache: dict | None = None, **kwargs: Any) -> Pair:
        made.append(Pair(tiny_model, p_cache or dict(num_blocks=32), d_cache or dict(num_blocks=64), **kwargs))
        return made[-1]

    yield make
    for pair in made:
        pair.close()


@pytest.mark.parametrize(
    "p_cache, d_cache",
    [
        (dict(block_size=16, layout="HND"), dict(block_size=16, layout="HND")),
        (dict(block_size=16, layout="HND"), dict(block_size=8, layout="NHD")),  # cached 40 -> start 32: scratch
        (dict(block_size=4, layout="NHD"), dict(block_size=16, layout="HND")),
        (dict(block_size=32, layout="NHD"), dict(block_size=8, layout="HND")),
    ],
    ids=["16-16", "16-8", "4-16", "32-8"],
)
def test_pull_equals_aggregated(pair_factory: Any, aggregated: dict, p_cache: dict, d_cache: dict) -> None:
    pair = pair_factory(dict(num_blocks=64, **p_cache), dict(num_blocks=96, **d_cache))
    outputs, admissions, readies = [], [], []
    for request in _requests():
        ready = KVReady.decode(pair.prefill.prefill(request, pair.to_decode).encode())  # as if sent
        readies.append(ready)
        pair.decode.receive(ready)
        admissions.extend(pair.decode.wait())
        outputs.extend(pair.decode.engine.step())
        pair.prefill.poll()
    outputs.extend(pair.decode.engine.run())
    assert {o.request_id: o.output_token_ids for o in outputs} == aggregated
    assert all(a.admitted for a in admissions)
    p_size, d_size = p_cache["block_size"], d_cache["block_size"]
    assert readies[1].num_cached_tokens == 40 - 40 % p_size  # the prefill's prefix cache served SYSTEM
    assert admissions[1].num_cached_tokens == 40 - 40 % d_size  # and so did the decode's
    lcm = p_size * d_size // __import__("math").gcd(p_size, d_size)
    assert admissions[1].start_token == admissions[1].num_cached_tokens // lcm * lcm
    assert admissions[1].num_transferred_tokens == len(PROMPTS[1]) - admissions[1].start_token
    assert pair.prefill.drain(10) and pair.free_everywhere()
    assert pair.prefill.num_released == len(PROMPTS) and pair.prefill.num_expired == 0


@pytest.mark.parametrize("stream_layers", [True, False])
def test_push_equals_aggregated(pair_factory: Any, aggregated: dict, stream_layers: bool) -> None:
    pair = pair_factory(dict(num_blocks=64, block_size=16), dict(num_blocks=96, block_size=8, layout="NHD"))
    outputs, admissions = [], []
    for request in _requests():
        wanted = pair.decode.reserve_push(request, pair.to_prefill)
        result = pair.prefill.push(KVWanted.decode(wanted.encode()), stream_layers=stream_layers)
        assert result.ok and result.num_tokens == len(request.prompt_token_ids) - wanted.start_token
        admissions.extend(pair.decode.wait())
        outputs.extend(pair.decode.engine.step())
        pair.prefill.poll()
    outputs.extend(pair.decode.engine.run())
    assert {o.request_id: o.output_token_ids for o in outputs} == aggregated
    assert all(a.admitted for a in admissions) and admissions[1].num_cached_tokens == 40
    assert pair.prefill.drain(10) and pair.free_everywhere()


def test_streamed_push_moves_layers_while_computing(pair_factory: Any) -> None:
    pair = pair_factory()
    request = Request("s", SYSTEM, SamplingParams(max_tokens=2))
    wanted = pair.decode.reserve_push(request, pair.to_prefill)
    seen: list[tuple[int, int]] = []  # (layer being finished, layers already filled on the decode side)
    keys = pair.decode.engine.cache.layer
    block = wanted.block_ids[0]
    original = pair.prefill.engine.runner.model.forward

    def spying_forward(
        token_ids: Any, positions: Any, cache: Any = None, batch: Any = None, on_layer_done: Any = None
    ) -> Any:
        def spy(layer: int) -> None:
            on_layer_done(layer)
            deadline = time.monotonic() + 5
            while not keys(layer)[0][block].any() and time.monotonic() < deadline:
                time.sleep(1e-3)  # the push of this layer runs on the pipe's threads
            seen.append((layer, sum(bool(keys(n)[0][block].any()) for n in range(len(original.__self__.layers)))))

        return original(token_ids, positions, cache, batch, spy if on_layer_done else None)

    pair.prefill.engine.runner.model.forward = spying_forward  # type: ignore[method-assign]
    try:
        assert pair.prefill.push(wanted).ok
    finally:
        del pair.prefill.engine.runner.model.forward
    assert seen == [(0, 1), (1, 2), (2, 3)]  # layer l landed before layer l + 1 was computed
    assert [a.admitted for a in pair.decode.wait()] == [True]


def test_lease_expires_when_the_decode_comes_too_late(pair_factory: Any) -> None:
    pair = pair_factory(lease_ttl=0.3)
    ready = pair.prefill.prefill(Request("late", SYSTEM), pair.to_decode)
    assert pair.prefill.drain(10)  # nobody renewed: the lease expired and the blocks were freed
    assert pair.prefill.num_expired == 1 and pair.prefill.num_released == 0
    pair.prefill.prefill(Request("next", list(range(60))), pair.to_decode)  # reuses (overwrites) the blocks
    pair.decode.receive(ready)
    [admission] = pair.decode.wait()
    assert not admission.admitted and "lease expired" in admission.error
    assert pair.decode.engine.num_free_blocks == pair.decode.spec.num_blocks and not pair.decode.pending_request_ids


def test_lease_expires_during_a_slow_pull(pair_factory: Any) -> None:
    pair = pair_factory(
        p_backend=MockBackend(), d_backend=MockBackend(on_post=lambda *a: Fault.delay(1.0)), lease_ttl=0.3
    )
    ready = pair.prefill.prefill(Request("slow", [*SYSTEM, 1]), pair.to_decode)
    rare = dataclasses.replace(ready, lease_ttl=100.0)  # a decode that renews far too rarely
    pair.decode.receive(rare)
    [admission] = pair.decode.wait()
    assert not admission.admitted and "LeaseLostError" in admission.error
    assert pair.prefill.drain(10) and pair.prefill.num_expired == 1
    assert pair.free_everywhere()


def test_stuck_pull_times_out_and_releases_the_lease(pair_factory: Any) -> None:
    pair = pair_factory(p_backend=MockBackend(), d_backend=MockBackend(on_post=lambda *a: Fault.drop()), timeout=0.5)
    pair.decode.receive(pair.prefill.prefill(Request("stuck", SYSTEM), pair.to_decode))
    [admission] = pair.decode.wait()
    assert not admission.admitted and "Timeout" in admission.error
    assert pair.prefill.drain(10) and pair.prefill.num_released == 1 and pair.prefill.num_expired == 0
    assert pair.free_everywhere()


def test_failed_push_cancels_the_reservation(pair_factory: Any) -> None:
    pair = pair_factory(p_backend=MockBackend(on_post=lambda *a: Fault.fail("link down")), d_backend=MockBackend())
    wanted = pair.decode.reserve_push(Request("f", SYSTEM), pair.to_prefill)
    result = pair.prefill.push(wanted)
    assert not result.ok and "link down" in result.error
    [admission] = pair.decode.wait()
    assert not admission.admitted and "failed push" in admission.error
    assert pair.prefill.drain(10) and pair.free_everywhere()


def test_full_decode_cache_reserves_nothing(pair_factory: Any) -> None:
    pair = pair_factory(d_cache=dict(num_blocks=3, block_size=16))
    first = pair.prefill.prefill(Request("a", SYSTEM, SamplingParams(max_tokens=2)), pair.to_decode)
    second = pair.prefill.prefill(Request("b", list(range(20))), pair.to_decode)
    pair.decode.receive(first)  # takes all three blocks
    with pytest.raises(OutOfBlocksError):
        pair.decode.receive(second)
    assert pair.decode.pending_request_ids == ["a"]
    assert [a.admitted for a in pair.decode.wait()] == [True]
    assert [o.request_id for o in pair.decode.engine.run()] == ["a"]
    pair.decode.receive(second)  # the retry fits now
    assert [a.admitted for a in pair.decode.wait()] == [True]
    pair.decode.engine.run()
    assert pair.prefill.drain(10) and pair.free_everywhere()


def test_messages_round_trip_and_reject_garbage(tiny_model: Model) -> None:
    request = Request("m", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.5, stop_token_ids=(7,)))
    ready = KVReady(request, 5, 1.5, (3,), ("p0", "p1"), b"m#1", 2.0, 0, 3)
    assert KVReady.decode(ready.encode()) == ready and ready.lease_for(1) == b"m#1@1"
    wanted = KVWanted(request, (4, 9), 0, ("d0",))
    assert KVWanted.decode(wanted.encode()) == wanted
    engine = PrefillEngine(tiny_model, CacheConfig(num_blocks=4))
    info = RankInfo("prefill", "p0", b"meta", engine.spec)
    assert RankInfo.decode(info.encode()) == info
    for garbage in (b"", b"\x93\x01", wanted.encode(), ready.encode()[:-3], b"x" * 100):
        with pytest.raises(HandshakeError):
            KVReady.decode(garbage)
    with pytest.raises(HandshakeError, match="lease_key"):
        dataclasses.replace(ready, lease_key=b"")


def test_connect_checks_the_other_group(pair_factory: Any, tiny_config: ModelConfig) -> None:
    pair = pair_factory()
    with pytest.raises(ConfigError, match="must be the prefill rank 0"):
        pair.decode.connect([pair.decode.info()])
    other = Model.random(tiny_config.replace(name="other-model"), seed=1)
    with kvxfer.Agent("x0", backends=["local"]) as agent:
        stranger = PrefillConnector(PrefillEngine(other, CacheConfig(num_blocks=4)), agent)
        with pytest.raises(LayoutMismatchError, match="model"):
            pair.decode.connect([stranger.info()])
    with pytest.raises(ConfigError, match="unknown peer group"):
        pair.prefill.prefill(Request("u", [1, 2]), "nobody")


@pytest.mark.parametrize(
    "p_cache, d_cache",
    [
        (dict(block_size=16, layout="HND"), dict(block_size=16, layout="HND")),
        (dict(block_size=16, layout="HND"), dict(block_size=8, layout="NHD")),  # cached 40 -> start 32 on prompt 1
        (dict(block_size=4, layout="NHD"), dict(block_size=16, layout="HND")),
    ],
    ids=["16-16", "16-8", "4-16"],
)
def test_verified_pull_equals_aggregated(pair_factory: Any, aggregated: dict, p_cache: dict, d_cache: dict) -> None:
    pair = pair_factory(dict(num_blocks=64, **p_cache), dict(num_blocks=96, **d_cache), verify=(True, True))
    outputs, admissions, readies = [], [], []
    for request in _requests():
        ready = KVReady.decode(pair.prefill.prefill(request, pair.to_decode).encode())
        readies.append(ready)
        pair.decode.receive(ready)
        admissions.extend(pair.decode.wait())
        outputs.extend(pair.decode.engine.step())
        pair.prefill.poll()
    outputs.extend(pair.decode.engine.run())
    assert {o.request_id: o.output_token_ids for o in outputs} == aggregated
    assert all(a.admitted for a in admissions), [a.error for a in admissions]
    assert admissions[1].start_token > 0  # checksums of a pull that starts past the decode's prefix hit
    for ready in readies:
        [data] = ready.checksums
        sums = Checksums.decode(data)
        assert sums.num_tokens == len(ready.request.prompt_token_ids) and sums.unit_tokens == p_cache["block_size"]
        assert sums.values.shape == (len(ready.block_ids), 2)  # every prefill block, both KV heads
    assert pair.prefill.drain(10) and pair.free_everywhere()


def test_verified_pull_refuses_corrupted_blocks(pair_factory: Any) -> None:
    corrupt = MockBackend(on_post=lambda *a: Fault.corrupt(4))  # the decode's reads land with bytes flipped
    pair = pair_factory(p_backend=MockBackend(), d_backend=corrupt, verify=(True, True))
    assert pair.decode.pipe(pair.to_prefill).strategy == "direct"  # the bytes go through the mock backend
    request = Request("bad", [*SYSTEM, 1, 2], SamplingParams(max_tokens=4))
    pair.decode.receive(pair.prefill.prefill(request, pair.to_decode))
    [admission] = pair.decode.wait()
    assert corrupt.posted > 0
    assert not admission.admitted and "TransferError" in admission.error and "checksum mismatch" in admission.error
    assert pair.decode.engine.run() == [] and not pair.decode.pending_request_ids  # no token for it
    assert pair.prefill.drain(10) and pair.prefill.num_released == 1 and pair.free_everywhere()


def test_unverified_pull_admits_corrupted_blocks(pair_factory: Any) -> None:
    """The control of the test above: the same corruption goes unnoticed without verify."""
    pair = pair_factory(p_backend=MockBackend(), d_backend=MockBackend(on_post=lambda *a: Fault.corrupt(4)))
    ready = pair.prefill.prefill(Request("bad", [*SYSTEM, 1, 2], SamplingParams(max_tokens=4)), pair.to_decode)
    assert ready.checksums is None
    pair.decode.receive(ready)
    assert [a.admitted for a in pair.decode.wait()] == [True]


def test_verifying_decode_refuses_a_ready_without_checksums(pair_factory: Any) -> None:
    pair = pair_factory(verify=(False, True))
    ready = pair.prefill.prefill(Request("plain", [*SYSTEM, 3], SamplingParams(max_tokens=2)), pair.to_decode)
    pair.decode.receive(ready)
    [admission] = pair.decode.wait()
    assert not admission.admitted and "carries no checksums" in admission.error
    assert pair.decode.engine.run() == []
    assert pair.prefill.drain(10) and pair.prefill.num_released == 1 and pair.free_everywhere()


def test_verify_refuses_push_mode(pair_factory: Any) -> None:
    pair = pair_factory(verify=(True, True))
    with pytest.raises(ConfigError, match="pull mode only"):
        pair.decode.reserve_push(Request("p", SYSTEM), pair.to_prefill)
    wanted = KVWanted(Request("p", SYSTEM), (0, 1, 2), 0, ("d0",))
    with pytest.raises(ConfigError, match="pull mode only"):
        pair.prefill.push(wanted)
    assert pair.free_everywhere()


def test_kv_ready_checksums_on_the_wire() -> None:
    import msgpack

    request = Request("m", [1, 2, 3], SamplingParams(max_tokens=3))
    plain = KVReady(request, 5, 1.5, (3,), ("p0", "p1"), b"m#1", 2.0, 0, 3)
    kind, version, body = msgpack.unpackb(plain.encode(), raw=False)
    assert version == FORMAT_VERSION and "checksums" not in body  # without verify: the version-1 bytes
    sums = Checksums(np.arange(2, dtype=np.uint32).reshape(1, 2), 4, 0, 3).encode()
    signed = dataclasses.replace(plain, checksums=(sums, sums))
    assert KVReady.decode(signed.encode()) == signed
    assert KVReady.decode(plain.encode()).checksums is None
    for bad in ([sums], [b"not checksums", sums], "x", []):  # wrong count, malformed, wrong types
        body["checksums"] = bad
        with pytest.raises(HandshakeError, match="checksums"):
            KVReady.decode(msgpack.packb([kind, version, body], use_bin_type=True))
    body.pop("checksums")
    body["surprise"] = 1  # unknown fields are still refused
    with pytest.raises(HandshakeError, match="fields must be"):
        KVReady.decode(msgpack.packb([kind, version, body], use_bin_type=True))
    body.pop("surprise")
    body.pop("lease_ttl")  # and required ones still required
    with pytest.raises(HandshakeError, match="fields must be"):
        KVReady.decode(msgpack.packb([kind, version, body], use_bin_type=True))


@pytest.mark.parametrize(
    "change, match",
    [(dict(num_kv_heads=4), "total_kv_heads"), (dict(num_layers=2), "num_layers")],
    ids=["kv_heads", "layers"],
)
def test_connect_refuses_another_models_kv_before_connecting(
    pair_factory: Any, tiny_config: ModelConfig, change: dict, match: str
) -> None:
    pair = pair_factory()
    other = Model.random(tiny_config.replace(**change), seed=1)  # the same model name: only the KV shape differs
    with kvxfer.Agent("x0", backends=["local"]) as agent:
        stranger = PrefillConnector(PrefillEngine(other, CacheConfig(num_blocks=4)), agent)
        assert stranger.spec.model == pair.prefill.spec.model
        with pytest.raises(LayoutMismatchError, match=match):
            pair.decode.connect([stranger.info()])
        assert "x0" not in pair.d_agent.peers and pair.decode.groups == ["p0"]
