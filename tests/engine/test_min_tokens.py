"""``SamplingParams.min_tokens``: EOS and stop tokens can neither be drawn nor end a sequence before it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import CacheConfig, DecodeEngine, FinishReason, Model, ModelConfig, Request, SamplingParams
from kvxfer.engine.sampling import suppress_stops
from kvxfer.errors import ConfigError

pytestmark = pytest.mark.timeout(120)


def test_eos_is_not_drawn_before_min_tokens(tiny_config: ModelConfig, dense_greedy: Callable) -> None:
    prompt = [1, 2, 3, 4, 5]
    expected = dense_greedy(prompt, 6)
    eos = expected[0]  # greedy would stop at once
    model = Model.random(tiny_config.replace(eos_token_ids=(eos,)), seed=1)
    engine = DecodeEngine(model, CacheConfig(num_blocks=16, block_size=4))
    plain = engine.generate([Request("plain", prompt, SamplingParams(max_tokens=6))])[0]
    assert list(plain.output_token_ids) == [eos] and plain.finish_reason is FinishReason.STOP
    held = engine.generate([Request("held", prompt, SamplingParams(max_tokens=6, min_tokens=4))])[0]
    assert len(held.output_token_ids) >= 4
    assert eos not in held.output_token_ids[:4]
    assert held.finish_reason is (FinishReason.STOP if eos in held.output_token_ids else FinishReason.LENGTH)
    stopped = engine.generate(
        [Request("stop", prompt, SamplingParams(max_tokens=6, min_tokens=3, ignore_eos=True, stop_token_ids=(eos,)))]
    )[0]
    assert len(stopped.output_token_ids) >= 3 and eos not in stopped.output_token_ids[:3]
    assert engine.num_free_blocks == engine.spec.num_blocks


def test_suppress_stops_masks_only_rows_under_their_minimum() -> None:
    logits = torch.zeros(3, 10)
    params = [SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=(7,)), SamplingParams(max_tokens=8)] * 2
    out = suppress_stops(logits, params[:3], [0, 0, 5], eos_token_ids=(3,))
    assert out[0, 3] == out[0, 7] == float("-inf") and torch.isfinite(out[0, :3]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()  # no minimum / minimum reached
    assert torch.isfinite(logits).all()  # the input is not modified


@pytest.mark.parametrize("min_tokens", [-1, 9, 1.5])
def test_min_tokens_out_of_range_is_a_config_error(min_tokens: object) -> None:
    with pytest.raises(ConfigError, match="min_tokens"):
        SamplingParams(max_tokens=8, min_tokens=min_tokens)  # type: ignore[arg-type]
