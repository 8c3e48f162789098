"""Requests, their per-engine state (Sequence) and their results."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy when ``temperature`` is 0, else seeded temperature / top-p sampling.

    Stops after ``max_tokens`` generated tokens, or at an EOS token of the model unless ``ignore_eos``;
    ``stop_token_ids`` adds more stop tokens; neither stops a sequence (nor is drawn) before ``min_tokens`` tokens
    were generated. ``seed`` None derives the seed from the request id, so every engine
    and every TP rank draws the same tokens.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(
                f"SamplingParams.min_tokens must be an int in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}"
            )
        if self.temperature < 0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingParams.top_p must lie in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass(frozen=True)
class Request:
    """A prompt to complete. ``arrival_time`` (``time.time()``) is the origin of TTFT."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise ConfigError(f"Request {self.request_id!r}: prompt_token_ids must not be empty")


class FinishReason(str, Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


class Sequence:
    """One request inside one engine: its tokens, blocks, and how many tokens' K/V are in the cache.

    ``token_ids`` = prompt + generated tokens. ``num_computed`` tokens have their K/V in ``block_ids``; the engine
    computes the rest, and when it reaches the end samples one more token.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.block_ids: list[int] = []
        self.num_computed = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache
        self.num_computed_tokens = 0  # tokens this engine ran through the model
        self.token_times: list[float] = []  # time.time() when each generated token was known
        self.finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def append(self, token: int, eos_token_ids: tuple[int, ...], max_position: int) -> None:
        """Add a generated token and decide whether the sequence is finished."""
        self.token_ids.append(int(token))
        self.token_times.append(time.time())
        sampling = self.request.sampling
        stoppable = len(self.output_token_ids) >= sampling.min_tokens
        if stoppable and (token in sampling.stop_token_ids or (not sampling.ignore_eos and token in eos_token_ids)):
            self.finish_reason = FinishReason.STOP
        elif len(self.output_token_ids) >= sampling.max_tokens or self.num_tokens >= max_position:
            self.finish_reason = FinishReason.LENGTH

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.request.prompt_token_ids,
            output_token_ids=tuple(self.output_token_ids),
            finish_reason=self.finish_reason,
            num_cached_tokens=self.num_cached_tokens,
            num_computed_tokens=self.num_computed_tokens,
            arrival_time=self.request.arrival_time,
            token_times=tuple(self.token_times),
        )


@dataclass(frozen=True)
class RequestOutput:
    """A finished request. ``token_times[i]`` is the ``time.time()`` when output token ``i`` was known."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_cached_tokens: int
    num_computed_tokens: int
    arrival_time: float
    token_times: tuple[float, ...]

    @property
    def ttft_s(self) -> float:
        """Seconds from arrival to the first output token."""
        return self.token_times[0] - self.arrival_time if self.token_times else float("nan")

    @property
    def inter_token_s(self) -> list[float]:
        """Seconds between consecutive output tokens."""
        return [b - a for a, b in itertools.pairwise(self.token_times)]
