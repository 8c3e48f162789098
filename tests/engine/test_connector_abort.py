"""The hooks the serving worker uses: PrefillConnector.prefill_batch and abort, DecodeConnector.cancel,
DecodeEngine.sequences (one process, local backend)."""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import (
    DecodeEngine,
    KVReady,
    Model,
    OutOfBlocksError,
    Request,
    SamplingParams,
)
from kvxfer.errors import ConfigError
from tests.engine.test_connector import PROMPTS, Pair, _requests

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_pair(tiny_model: Model) -> Any:
    made: list[Pair] = []

    def make(p_blocks: int = 32, d_blocks: int = 64) -> Pair:
        made.append(Pair(tiny_model, {"num_blocks": p_blocks}, {"num_blocks": d_blocks}))
        return made[-1]

    yield make
    for pair in made:
        pair.close()


def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_prefill_batch_equals_aggregated(make_pair: Any, tiny_model: Model) -> None:
    aggregated = {o.request_id: o.output_token_ids for o in DecodeEngine(tiny_model).generate(_requests())}
    pair = make_pair(64, 96)
    readies = pair.prefill.prefill_batch(_requests(), [pair.to_decode] * len(PROMPTS))
    assert [r.request.request_id for r in readies] == [f"r{i}" for i in range(len(PROMPTS))]
    for ready in readies:
        pair.decode.receive(KVReady.decode(ready.encode()))
    assert all(a.admitted for a in pair.decode.wait())
    outputs = pair.decode.engine.run()
    assert {o.request_id: o.output_token_ids for o in outputs} == aggregated
    assert pair.prefill.drain(10) and pair.free_everywhere()
    with pytest.raises(ConfigError, match="one decode group per request"):
        pair.prefill.prefill_batch(_requests()[:2], [pair.to_decode])


def test_prefill_batch_is_all_or_nothing(make_pair: Any) -> None:
    pair = make_pair(6, 64)
    requests = [Request(f"b{i}", list(range(10 * i, 10 * i + 40))) for i in range(3)]  # 3 blocks each
    with pytest.raises(OutOfBlocksError):
        pair.prefill.prefill_batch(requests, [pair.to_decode] * 3)
    assert pair.prefill.held_request_ids == [] and pair.prefill.engine.num_free_blocks == 6


def test_prefill_abort_ends_the_leases_and_frees_the_blocks(make_pair: Any) -> None:
    pair = make_pair()
    ready = pair.prefill.prefill(_requests()[0], pair.to_decode)
    assert pair.prefill.held_request_ids == ["r0"] and not pair.free_everywhere()
    assert pair.prefill.abort("r0") and not pair.prefill.abort("nope")
    _until(lambda: not pair.prefill.poll() and not pair.prefill.held_request_ids)
    assert pair.prefill.engine.num_free_blocks == 32
    pair.decode.receive(ready)  # a pull after the abort fails: the lease is gone
    [admission] = pair.decode.wait(timeout=10)
    assert not admission.admitted and "expired" in (admission.error or "")
    assert pair.free_everywhere()


def test_decode_cancel_frees_the_reservation(make_pair: Any) -> None:
    pair = make_pair()
    ready = pair.prefill.prefill(_requests()[5], pair.to_decode)
    pair.decode.receive(ready)
    assert "r5" in pair.decode.engine.sequences  # reserved
    assert pair.decode.cancel("r5", "client went away") and not pair.decode.cancel("nope")
    [admission] = pair.decode.wait(timeout=10)
    assert (admission.admitted, admission.error) == (False, "client went away")
    assert "r5" not in pair.decode.engine.sequences
    assert pair.prefill.drain(10) and pair.free_everywhere()


def test_decode_engine_sequences_and_counts(tiny_model: Model) -> None:
    engine = DecodeEngine(tiny_model)
    engine.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=4)))
    engine.add_request(Request("b", [4, 5], SamplingParams(max_tokens=4)))
    assert set(engine.sequences) == {"a", "b"} and (engine.num_waiting, engine.num_running) == (2, 0)
    engine.step()
    assert (engine.num_waiting, engine.num_running) == (0, 2)
    assert [len(s.output_token_ids) for s in engine.sequences.values()] == [1, 1]
    engine.run()
    assert engine.sequences == {} and (engine.num_waiting, engine.num_running) == (0, 0)
