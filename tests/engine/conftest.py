"""Shared fixtures of the engine tests: a tiny float32 model and its dense (no-cache) greedy reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from kvxfer.engine import Model, ModelConfig


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config: ModelConfig) -> Model:
    return Model.random(tiny_config, seed=1)


@pytest.fixture(scope="session")
def dense_greedy(tiny_model: Model) -> Callable[[list[int], int], list[int]]:
    """Greedy continuation of a prompt, recomputing the whole sequence densely for every token."""
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompt: list[int], num_tokens: int) -> list[int]:
        key = (tuple(prompt), num_tokens)
        if key not in cache:
            tokens = list(prompt)
            for _ in range(num_tokens):
                tokens.append(int(tiny_model.dense_logits(tokens)[-1].argmax()))
            cache[key] = tokens[len(prompt) :]
        return cache[key]

    return run


def prompts(count: int, seed: int = 0, low: int = 3, high: int = 40, vocab: int = 256) -> list[list[int]]:
    """Random prompts of random lengths in [low, high)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="session")
def make_prompts() -> Callable[..., list[list[int]]]:
    return prompts
