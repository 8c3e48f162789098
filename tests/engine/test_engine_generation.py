"""Engines: paged greedy generation equals dense recompute; prefix caching; admit with externally filled KV;
preemption; stop conditions; seeded sampling; no block leaks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import (
    CacheConfig,
    DecodeEngine,
    FinishReason,
    Model,
    ModelConfig,
    OutOfBlocksError,
    PrefillEngine,
    PrefillResult,
    Request,
    Reservation,
    SamplingParams,
)
from kvxfer.errors import ConfigError, UsageError

pytestmark = pytest.mark.timeout(120)

SYSTEM = list(range(100, 132))  # a 32-token shared prefix


def _requests(prompts: list[list[int]], max_tokens: int = 8, **sampling: object) -> list[Request]:
    return [Request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, **sampling)) for i, p in enumerate(prompts)]


def _no_leaks(engine: PrefillEngine | DecodeEngine) -> None:
    assert engine.num_free_blocks == engine.spec.num_blocks


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("block_size,budget", [(1, 4096), (16, 4096), (16, 7)], ids=["bs1", "bs16", "bs16-chunked"])
def test_greedy_paged_equals_dense_recompute(
    tiny_model: Model, dense_greedy: Callable, make_prompts: Callable, layout: str, block_size: int, budget: int
) -> None:
    prompts = [*make_prompts(4, seed=1), [*SYSTEM, 1, 2, 3], SYSTEM + [9] * 20]
    engine = DecodeEngine(
        tiny_model,
        CacheConfig(num_blocks=512 // block_size, block_size=block_size, layout=layout),
        max_num_batched_tokens=budget,
    )
    outputs = engine.generate(_requests(prompts, max_tokens=10))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.output_token_ids) == dense_greedy(prompt, 10)
        assert output.finish_reason is FinishReason.LENGTH
        assert len(output.token_times) == 10 and list(output.token_times) == sorted(output.token_times)
        assert output.ttft_s >= 0 and len(output.inter_token_s) == 9
    assert engine.num_decode_tokens > 0 and engine.decode_s > 0
    _no_leaks(engine)


def test_prefix_cache_hit_skips_recomputation(tiny_model: Model, dense_greedy: Callable) -> None:
    engine = PrefillEngine(tiny_model, CacheConfig(num_blocks=32, block_size=16))
    a = engine.prefill(Request("a", SYSTEM + list(range(8))))
    assert (a.num_cached_tokens, a.num_computed_tokens) == (0, 40)
    b = engine.prefill(Request("b", SYSTEM + [7] * 10))
    assert (b.num_cached_tokens, b.num_computed_tokens) == (32, 10)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert engine.runner.num_computed_tokens == 50
    assert b.first_token == dense_greedy(SYSTEM + [7] * 10, 1)[0]
    engine.release("a")
    engine.release("b")
    _no_leaks(engine)
    again = engine.prefill(Request("c", SYSTEM + list(range(8))))  # released blocks are still cached
    assert (again.num_cached_tokens, again.num_computed_tokens) == (32, 8)
    assert again.first_token == a.first_token
    aligned = engine.prefill(Request("d", SYSTEM))  # fully cached: the last block is computed to get logits
    assert (aligned.num_cached_tokens, aligned.num_computed_tokens) == (16, 16)
    assert aligned.first_token == dense_greedy(SYSTEM, 1)[0]
    engine.release("c")
    engine.release("d")
    _no_leaks(engine)
    uncached = PrefillEngine(tiny_model, CacheConfig(num_blocks=32, block_size=16, enable_prefix_caching=False))
    uncached.prefill(Request("a", [*SYSTEM, 1]))
    assert uncached.prefill(Request("b", [*SYSTEM, 2])).num_computed_tokens == 33


def test_decode_engine_reuses_prefix_of_earlier_requests(tiny_model: Model, dense_greedy: Callable) -> None:
    engine = DecodeEngine(tiny_model, CacheConfig(num_blocks=64, block_size=8))
    first = engine.generate(_requests([[*SYSTEM, 5]]))[0]
    later = engine.generate(
        [
            Request("x", [*SYSTEM, 6, 6], SamplingParams(max_tokens=8)),
            Request("y", SYSTEM + [4] * 9, SamplingParams(max_tokens=8)),
        ]
    )
    assert first.num_cached_tokens == 0 and [o.num_cached_tokens for o in later] == [32, 32]
    assert [o.num_computed_tokens for o in later] == [2 + 7, 9 + 7]  # uncached prompt tokens + decode inputs
    assert list(later[1].output_token_ids) == dense_greedy(SYSTEM + [4] * 9, 8)
    _no_leaks(engine)


def _transfer(prefill: PrefillEngine, result: PrefillResult, decode: DecodeEngine, reservation: Reservation) -> None:
    """What a connector does: copy the prompt K/V the decode side lacks, token by token (stands in for KVPipe)."""
    start = reservation.num_cached_tokens
    tokens = torch.arange(start, result.num_prompt_tokens)
    size = decode.spec.block_size
    table = torch.tensor(reservation.block_ids)
    slots = table[tokens // size] * size + tokens % size
    assert set(slots.div(size, rounding_mode="floor").tolist()) <= set(reservation.fill_block_ids)
    slots = slots.to(decode.cache.device)
    for layer in range(prefill.spec.num_layers):
        k, v = prefill.cache.read(layer, list(result.block_ids), result.num_prompt_tokens)
        decode.cache.write(layer, slots, k[start:], v[start:])


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_admit_externally_filled_kv_equals_aggregated(
    tiny_model: Model, make_prompts: Callable, sampling: dict
) -> None:
    prompts = [*make_prompts(3, seed=2), SYSTEM + [1] * 5, SYSTEM + [2] * 17]
    requests = _requests(prompts, max_tokens=9, **sampling)
    aggregated = DecodeEngine(tiny_model, CacheConfig(num_blocks=64, block_size=16)).generate(requests)
    prefill = PrefillEngine(tiny_model, CacheConfig(num_blocks=64, block_size=16, layout="HND"))
    decode = DecodeEngine(tiny_model, CacheConfig(num_blocks=128, block_size=4, layout="NHD"))
    cached = []
    for request in requests:
        result = prefill.prefill(request)
        reservation = decode.reserve(request)
        cached.append(reservation.num_cached_tokens)
        _transfer(prefill, result, decode, reservation)
        decode.admit(request.request_id, result.first_token)
        prefill.release(request.request_id)
    assert cached[-2:] == [0, 32]  # the decode side already had the shared prefix from the previous request
    by_id = {o.request_id: o for o in decode.run()}
    assert [by_id[r.request_id].output_token_ids for r in requests] == [o.output_token_ids for o in aggregated]
    _no_leaks(prefill)
    _no_leaks(decode)


def test_on_layer_done_streams_layers_of_the_last_pass(tiny_model: Model) -> None:
    engine = PrefillEngine(tiny_model, CacheConfig(num_blocks=8, block_size=8), chunk_size=8)
    seen: list[tuple[int, bool, bool]] = []
    num_layers = engine.spec.num_layers
    last_slot = 3 * 8 + 29 % 8  # token 29 of a fresh engine's first request: blocks are handed out in order

    def on_layer_done(layer: int) -> None:
        k_this = engine.cache.layer(layer)[0].flatten(0, 1)[last_slot]
        k_next = engine.cache.layer(layer + 1)[0].flatten(0, 1)[last_slot] if layer + 1 < num_layers else None
        seen.append((layer, bool(k_this.any()), k_next is None or not k_next.any()))

    result = engine.prefill(Request("r", list(range(30))), on_layer_done)
    assert result.block_ids == (0, 1, 2, 3)
    assert seen == [(layer, True, True) for layer in range(num_layers)]


def test_preemption_recomputes_and_still_matches(
    tiny_model: Model, dense_greedy: Callable, make_prompts: Callable
) -> None:
    prompts = make_prompts(4, seed=3, low=8, high=12)
    engine = DecodeEngine(tiny_model, CacheConfig(num_blocks=12, block_size=4))
    outputs = engine.generate(_requests(prompts, max_tokens=14))
    assert engine.num_preemptions > 0
    assert [list(o.output_token_ids) for o in outputs] == [dense_greedy(p, 14) for p in prompts]
    _no_leaks(engine)


def test_stop_conditions(tiny_config: ModelConfig, dense_greedy: Callable) -> None:
    prompt = [1, 2, 3, 4, 5]
    expected = dense_greedy(prompt, 6)
    eos_model = Model.random(tiny_config.replace(eos_token_ids=(expected[2],)), seed=1)
    engine = DecodeEngine(eos_model, CacheConfig(num_blocks=16, block_size=4))
    out = engine.generate([Request("eos", prompt, SamplingParams(max_tokens=6))])[0]
    assert list(out.output_token_ids) == expected[: expected.index(expected[2]) + 1]
    assert out.finish_reason is FinishReason.STOP
    ignoring = engine.generate([Request("ign", prompt, SamplingParams(max_tokens=6, ignore_eos=True))])[0]
    assert list(ignoring.output_token_ids) == expected and ignoring.finish_reason is FinishReason.LENGTH
    stop = engine.generate(
        [Request("stop", prompt, SamplingParams(max_tokens=6, stop_token_ids=(expected[1],), ignore_eos=True))]
    )[0]
    assert stop.output_token_ids[-1] == expected[1] and stop.finish_reason is FinishReason.STOP
    one = Request("one", prompt, SamplingParams(max_tokens=1))
    engine.reserve(one)
    engine.admit("one", expected[0])  # finished at admission: nothing to decode
    assert [o.output_token_ids for o in engine.step()] == [(expected[0],)]
    _no_leaks(engine)


def test_seeded_sampling_is_reproducible(tiny_model: Model, dense_greedy: Callable) -> None:
    prompt = list(range(40, 60))

    def run(**sampling: object) -> tuple[int, ...]:
        engine = DecodeEngine(tiny_model, CacheConfig(num_blocks=16, block_size=8))
        return engine.generate([Request("s", prompt, SamplingParams(max_tokens=12, **sampling))])[0].output_token_ids

    seeded = run(temperature=1.0, seed=5)
    assert run(temperature=1.0, seed=5) == seeded
    assert run(temperature=1.0, seed=6) != seeded
    assert list(run(temperature=1.0, top_p=1e-6, seed=5)) == dense_greedy(prompt, 12)  # top-p keeps the top token


def test_errors_are_clear_and_leave_nothing_allocated(tiny_model: Model) -> None:
    prefill = PrefillEngine(tiny_model, CacheConfig(num_blocks=4, block_size=4))
    with pytest.raises(ConfigError, match="shorter than 16"):
        prefill.prefill(Request("long", list(range(16))))
    with pytest.raises(OutOfBlocksError, match="need 3 free blocks, 1 available"):
        prefill.prefill_batch([Request("a", list(range(10))), Request("b", list(range(50, 60)))])
    _no_leaks(prefill)
    prefill.prefill(Request("a", list(range(10))))
    with pytest.raises(UsageError, match="already holds"):
        prefill.prefill(Request("a", [1]))
    with pytest.raises(UsageError, match="holds no blocks"):
        prefill.release("zzz")
    prefill.release("a")
    decode = DecodeEngine(tiny_model, CacheConfig(num_blocks=8, block_size=4))
    with pytest.raises(UsageError, match="no reservation"):
        decode.admit("nope", 1)
    decode.reserve(Request("r", list(range(9))))
    with pytest.raises(UsageError, match="already in the engine"):
        decode.add_request(Request("r", [1]))
    decode.cancel_reservation("r")
    decode.add_request(Request("q", list(range(9)), SamplingParams(max_tokens=50)))
    decode.step()
    aborted = decode.abort("q")
    assert aborted.finish_reason is FinishReason.ABORT and len(aborted.output_token_ids) == 1
    _no_leaks(decode)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_import_kvxfer_does_not_import_torch() -> None:
    code = "import sys, kvxfer, kvxfer.spec; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_gpu_engines_match_cpu_dense_reference(
    tiny_config: ModelConfig, dense_greedy: Callable, make_prompts: Callable
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    model = Model.random(tiny_config, seed=1, device="cuda")
    prompts = [*make_prompts(4, seed=5), SYSTEM + [3] * 7]
    decode = DecodeEngine(model, CacheConfig(num_blocks=64, block_size=16, layout="NHD"))
    assert decode.cache.tensor.is_cuda
    outputs = decode.generate(_requests(prompts, max_tokens=8))
    assert [list(o.output_token_ids) for o in outputs] == [dense_greedy(p, 8) for p in prompts]
    prefill = PrefillEngine(model, CacheConfig(num_blocks=64, block_size=16, layout="HND"))
    request = Request("g", SYSTEM + [3] * 7, SamplingParams(max_tokens=8))
    result = prefill.prefill(request)
    reservation = decode.reserve(request)
    _transfer(prefill, result, decode, reservation)
    decode.admit("g", result.first_token)
    prefill.release("g")
    assert list(decode.run()[0].output_token_ids) == dense_greedy(SYSTEM + [3] * 7, 8)
    _no_leaks(prefill)
    _no_leaks(decode)


def test_batched_prefill_equals_prefill_one_by_one(tiny_model: Model, make_prompts: Callable) -> None:
    """Several prompts in one forward (padded grid attention) give the first tokens and K/V of separate prefills."""
    prompts = make_prompts(5, seed=21, low=2, high=40)
    config = CacheConfig(num_blocks=64, block_size=4, enable_prefix_caching=False)
    batched, single = PrefillEngine(tiny_model, config), PrefillEngine(tiny_model, config)
    together = batched.prefill_batch(_requests(prompts))
    alone = [single.prefill(request) for request in _requests(prompts)]
    assert [r.first_token for r in together] == [r.first_token for r in alone]
    for a, b in zip(together, alone, strict=True):
        for layer in range(tiny_model.config.num_layers):
            kv_a = batched.cache.read(layer, list(a.block_ids), a.num_prompt_tokens)
            kv_b = single.cache.read(layer, list(b.block_ids), b.num_prompt_tokens)
            for x, y in zip(kv_a, kv_b, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "separate"])
def test_requests_arriving_while_decoding(
    tiny_model: Model, dense_greedy: Callable, make_prompts: Callable, mixed: bool
) -> None:
    """Requests added while others decode: with mixed steps their (chunked) prefill shares forward passes with
    the running requests' decode; without, decode waits for them. Tokens equal the dense reference either way."""
    prompts = make_prompts(6, seed=5, low=5, high=30)
    engine = DecodeEngine(
        tiny_model, CacheConfig(num_blocks=64, block_size=4), max_num_batched_tokens=12, mixed_steps=mixed
    )
    requests = _requests(prompts, max_tokens=6)
    outputs = []
    for request in requests[:2]:
        engine.add_request(request)
    for step in range(200):
        if step in (3, 5):
            for request in requests[2:4] if step == 3 else requests[4:]:
                engine.add_request(request)
        outputs.extend(engine.step())
        if not engine.has_unfinished and step > 5:
            break
    by_id = {output.request_id: output for output in outputs}
    for request, prompt in zip(requests, prompts, strict=True):
        assert list(by_id[request.request_id].output_token_ids) == dense_greedy(prompt, 6)
    assert (engine.num_mixed_steps > 0) == mixed
    _no_leaks(engine)
