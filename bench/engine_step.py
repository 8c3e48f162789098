"""One decode engine's step: host wall time beside the GPU's own time (torch profiler), eager and CUDA graphs.

Used by bench/engine_gpu.py inside its decode process (``profile_decode``): for one batch size, ``batch`` fresh
requests with ``tokens``-token random prompts are prefilled locally, then decoded step by step, first with the
graphs switched off (eager), then on, in the same process and engine. Per step: the median host wall time of
``DecodeEngine.step`` (scheduling, input building, forward, sampling: what a serving loop pays), the GPU time
(sum of the durations of the kernels and copies the profiler records over ``profiled`` steps, divided by the
steps), their ratio (target <= 1.5) and tokens/s (batch / median wall).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

#: Decode steps per mode: warm-up (graph captures happen here), timed, profiled; plus one token of headroom.
WARMUP, STEPS, PROFILED = 3, 20, 5
TOKENS_PER_MODE = WARMUP + STEPS + PROFILED + 2


def profile_decode(engine: Any, batch: int, tokens: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """{"eager": {...}, "graphs": {... or None when the engine has no graph runner}} for one batch size."""
    runner = engine.runner
    graphs = runner.graphs
    result: dict[str, Any] = {}
    try:
        for mode in ("eager", "graphs"):
            if mode == "graphs" and graphs is None:
                result[mode] = None
                continue
            runner.graphs = graphs if mode == "graphs" else None
            result[mode] = _one_mode(engine, f"{mode}-{batch}", batch, tokens, vocab, seed)
    finally:
        runner.graphs = graphs
    eager, graphed = result["eager"], result["graphs"]
    if graphed is not None and graphed["gpu_kernel_ms"] < 0.1 * eager["gpu_kernel_ms"]:
        # Where the profiler records no kernels inside graph replays, the eager step's kernels stand for them.
        graphed["gpu_ms_source"] = "eager"
        graphed["gpu_ms"] = eager["gpu_ms"]
        graphed["wall_over_gpu"] = graphed["wall_ms"] / eager["gpu_ms"]
    return result


def _one_mode(engine: Any, name: str, batch: int, tokens: int, vocab: int, seed: int) -> dict[str, Any]:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from kvxfer.engine import Request, SamplingParams

    cuda = engine.cache.device.type == "cuda"
    rng = random.Random(f"{name}-{seed}")
    sampling = SamplingParams(max_tokens=TOKENS_PER_MODE, ignore_eos=True)
    ids = [f"profile-{name}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(Request(request_id, [rng.randrange(vocab) for _ in range(tokens)], sampling))
    began = time.perf_counter()
    mixed, engine.mixed_steps = engine.mixed_steps, False  # prefill only: nobody decodes before the timed steps
    try:
        while engine.num_waiting:
            engine.step()
    finally:
        engine.mixed_steps = mixed
    prefill_s = time.perf_counter() - began
    if engine.num_running != batch:
        raise RuntimeError(f"profile {name}: {engine.num_running} requests running, expected {batch}")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(WARMUP):
        engine.step()
    graphs = engine.runner.graphs
    captures = graphs.num_captures if graphs is not None else 0
    walls = []
    for _ in range(STEPS):
        sync()
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sync()
    with profile(activities=activities) as prof:
        for _ in range(PROFILED):
            engine.step()
        sync()
    kernel_us = copy_us = 0.0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation:  # as torch's table totals
            elapsed = event.time_range.elapsed_us()
            if event.name.startswith(("Memcpy", "Memset")):
                copy_us += elapsed
            else:
                kernel_us += elapsed
    for request_id in ids:
        engine.abort(request_id)
    wall_ms = 1e3 * statistics.median(walls)
    gpu_ms = (kernel_us + copy_us) / 1e3 / PROFILED
    return {
        "batch": batch,
        "context_tokens": tokens,
        "wall_ms": wall_ms,
        "wall_ms_min": 1e3 * min(walls),
        "gpu_ms": gpu_ms,
        "gpu_kernel_ms": kernel_us / 1e3 / PROFILED,
        "gpu_copy_ms": copy_us / 1e3 / PROFILED,
        "gpu_ms_source": "profiler",
        "wall_over_gpu": wall_ms / gpu_ms if gpu_ms else None,
        "tokens_per_s": batch / (wall_ms / 1e3),
        "captures_during_timed_steps": (graphs.num_captures - captures) if graphs is not None else 0,
        "graph_captures": graphs.num_captures if graphs is not None else 0,
        "prefill_s": prefill_s,
        "steps": {"warmup": WARMUP, "timed": STEPS, "profiled": PROFILED},
    }


def rows(profiles: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Table rows of engine_gpu.py's summary: one per batch size and mode."""
    out = []
    for batch, modes in sorted(profiles.items(), key=lambda item: int(item[0])):
        for mode, values in modes.items():
            if values is None:
                out.append((f"step b{batch} {mode}", "not available"))
                continue
            ratio = values["wall_over_gpu"]
            out.append(
                (
                    f"step b{batch} {mode}",
                    f"wall {values['wall_ms']:.3f} ms, GPU {values['gpu_ms']:.3f} ms ({values['gpu_ms_source']}), "
                    f"ratio {'n/a' if ratio is None else f'{ratio:.2f}'} (target <= 1.5), "
                    f"{values['tokens_per_s']:.0f} tokens/s",
                )
            )
    return out
