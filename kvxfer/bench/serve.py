"""`kvxfer-bench serve`: load an OpenAI-compatible endpoint and report what aiperf reports.

Metric definitions follow aiperf's (so the two tools' tables can be read side by side):

- time to first token (TTFT): request sent -> first response chunk that carries generated text or tokens;
- inter-token latency (ITL): (request latency - TTFT) / (output tokens - 1), per request with >= 2 tokens;
- request latency: request sent -> last chunk received;
- output sequence length: ``usage.completion_tokens`` of the final streamed chunk (``stream_options.include_usage``);
- output token throughput: all output tokens / (last response end - first request start);
- request throughput: completed requests / the same duration;
- goodput: requests per second that met every SLO given (TTFT <= ``slo_ttft_s`` and ITL <= ``slo_itl_s``).

Prompts are lists of token ids (``/v1/completions`` accepts them), so the input sequence length (ISL) is exact without
a tokenizer on the client side; ``ignore_eos`` asks the server for exactly ``osl`` output tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class LoadSpec:
    """One load point: ``concurrency`` requests in flight until ``num_requests`` were sent."""

    concurrency: int
    num_requests: int
    isl: int
    osl: int
    vocab_low: int = 1000
    vocab_high: int = 20000
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "num_requests", "isl", "osl"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"LoadSpec.{name} must be an int >= 1, got {value!r}")
        if not 0 <= self.vocab_low < self.vocab_high:
            raise ConfigError(
                f"LoadSpec vocab range must satisfy 0 <= low < high, got {self.vocab_low}, {self.vocab_high}"
            )
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"LoadSpec.timeout_s must be a finite number > 0, got {self.timeout_s!r}")


@dataclass
class RequestRecord:
    """What one request saw (seconds on the client's monotonic clock)."""

    start: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    chunks: int = 0
    error: str | None = None
    server_timing: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first_token is not None

    @property
    def ttft_s(self) -> float:
        assert self.first_token is not None
        return self.first_token - self.start

    @property
    def latency_s(self) -> float:
        assert self.end is not None
        return self.end - self.start

    @property
    def itl_s(self) -> float | None:
        if self.output_tokens < 2 or self.first_token is None or self.end is None:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)


def prompts(spec: LoadSpec) -> list[list[int]]:
    """``num_requests`` prompts of exactly ``isl`` token ids, seeded (distinct, so no prefix-cache hits)."""
    rng = np.random.default_rng(spec.seed)
    ids = rng.integers(spec.vocab_low, spec.vocab_high, size=(spec.num_requests, spec.isl))
    return [row.tolist() for row in ids]


def summarize(
    records: Sequence[RequestRecord], *, slo_ttft_s: float | None = None, slo_itl_s: float | None = None
) -> dict[str, Any]:
    """aiperf-style statistics of one load point (times in ms, rates per second)."""
    done = [r for r in records if r.ok]
    summary: dict[str, Any] = {"requests": len(records), "completed": len(done), "errors": len(records) - len(done)}
    if not done:
        return summary
    begin = min(r.start for r in records)
    finish = max(r.end for r in done if r.end is not None)
    duration = max(finish - begin, 1e-9)
    itls = [r.itl_s for r in done if r.itl_s is not None]
    for name, values in (
        ("ttft_ms", [r.ttft_s for r in done]),
        ("itl_ms", itls),
        ("latency_ms", [r.latency_s for r in done]),
    ):
        if values:
            array = np.asarray(values) * 1e3
            summary.update(
                {
                    f"{name}_avg": float(array.mean()),
                    f"{name}_p50": float(np.percentile(array, 50)),
                    f"{name}_p90": float(np.percentile(array, 90)),
                    f"{name}_p99": float(np.percentile(array, 99)),
                }
            )
    output_tokens = sum(r.output_tokens for r in done)
    summary.update(
        {
            "duration_s": duration,
            "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / duration,
            "requests_per_s": len(done) / duration,
            "tokens_per_s_per_user": float(np.mean([1.0 / x for x in itls if x > 0])) if itls else None,
        }
    )
    good = [
        r
        for r in done
        if (slo_ttft_s is None or r.ttft_s <= slo_ttft_s)
        and (slo_itl_s is None or (r.itl_s is not None and r.itl_s <= slo_itl_s))
    ]
    summary["goodput_requests_per_s"] = len(good) / duration
    summary["slo_met_fraction"] = len(good) / len(done)
    timings = [r.server_timing for r in done if r.server_timing]
    for key in ("queue_s", "prefill_s", "transfer_s", "first_step_s"):
        values = [t[key] for t in timings if isinstance(t.get(key), (int, float))]
        if values:
            summary[f"server_{key[:-2]}_ms_p50"] = float(np.percentile(np.asarray(values) * 1e3, 50))
    return summary


async def _one(
    client: Any, url: str, model: str, prompt: list[int], osl: int, timeout_s: float, timing: bool
) -> RequestRecord:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": osl,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if timing:
        body["kvxfer"] = {"timing": True}
    record = RequestRecord(start=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                _take_line(record, line)
        record.end = time.perf_counter()
        if record.output_tokens == 0:  # a server without usage: fall back to counting text chunks
            record.output_tokens = record.chunks
    except Exception as error:  # noqa: BLE001 any client-side failure is one failed request, not the run
        record.error = f"{type(error).__name__}: {error}"
    return record


def _take_line(record: RequestRecord, line: str) -> None:
    if not line.startswith("data:"):
        return
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return
    chunk = json.loads(payload)
    if "error" in chunk:
        record.error = str(chunk["error"])[:200]
        return
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            record.chunks += 1
            if record.first_token is None:
                record.first_token = time.perf_counter()
    usage = chunk.get("usage")
    if usage and isinstance(usage.get("completion_tokens"), int):
        record.output_tokens = usage["completion_tokens"]
    if isinstance(chunk.get("kvxfer"), dict) and isinstance(chunk["kvxfer"].get("timing"), dict):
        record.server_timing = chunk["kvxfer"]["timing"]


async def _load(url: str, model: str, spec: LoadSpec, timing: bool) -> list[RequestRecord]:
    import httpx

    work = prompts(spec)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=spec.timeout_s) as client:
        next_prompt = iter(work)

        async def user() -> None:
            for prompt in next_prompt:  # the shared iterator hands each prompt to exactly one user
                records.append(await _one(client, url, model, prompt, spec.osl, spec.timeout_s, timing))

        await asyncio.wait_for(
            asyncio.gather(*(user() for _ in range(spec.concurrency))),
            timeout=spec.timeout_s * (1 + spec.num_requests / spec.concurrency),
        )
    return records


def run(
    url: str,
    model: str,
    specs: Sequence[LoadSpec],
    *,
    slo_ttft_s: float | None = None,
    slo_itl_s: float | None = None,
    warmup: int = 2,
    timing: bool = True,
) -> list[dict[str, Any]]:
    """One row per load point: the spec and its :func:`summarize` statistics."""
    url = url.rstrip("/")
    rows = []
    for spec in specs:
        if warmup:
            warm = LoadSpec(
                concurrency=1,
                num_requests=warmup,
                isl=spec.isl,
                osl=min(spec.osl, 8),
                seed=spec.seed + 10_000,
                timeout_s=spec.timeout_s,
            )
            asyncio.run(_load(url, model, warm, timing=False))
        records = asyncio.run(_load(url, model, spec, timing))
        row: dict[str, Any] = {"concurrency": spec.concurrency, "isl": spec.isl, "osl": spec.osl}
        row.update(summarize(records, slo_ttft_s=slo_ttft_s, slo_itl_s=slo_itl_s))
        first_error = next((r.error for r in records if r.error), None)
        if first_error:
            row["first_error"] = first_error
        rows.append(row)
    return rows
