"""What the worker process adds on top of its engine: decode tokens/s and per-step cost, worker vs engine alone.

The engine alone: ``DecodeEngine.generate`` of ``--requests`` prompts x ``--max-tokens`` tokens in this process.
Through the worker: an ``agg`` worker subprocess driven by a RouterLink in this process (the fake router of the
tests): every request sent at once as ``generate``, tokens counted as they stream back. Runs alternate (engine,
worker, engine, ...) so both see the same machine load; rates are given per wall second and per CPU second of the
process doing the work (the worker's from /proc). Both on ``--device`` with ``--model`` (tiny-random by default: the
model is tiny, so the worker's own overhead — scheduling loop, msgpack, zmq, the token batches — is what the ratio
shows). Also reported: the frames the worker sent per decode step (TokensBatch coalescing) and, with ``--disagg``,
one prefill + one decode worker's TTFT parts and the pipe's measured link rate. Each variant is the median of
``--repeats`` runs. Writes ``bench/results/worker_bench_<date>.json``.

    python bench/worker_bench.py [--requests 16 --max-tokens 64 --disagg]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvxfer.serve import protocol as p
from tests.serve.test_worker import FakeRouter


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_engine(args: argparse.Namespace) -> object:
    import torch

    from kvxfer.engine import CacheConfig, DecodeEngine
    from kvxfer.models import load_model
    from kvxfer.tuning import keep_freed_memory

    keep_freed_memory()  # as the worker does
    torch.set_num_threads(args.threads)
    return DecodeEngine(
        load_model(args.model).build(device=args.device), CacheConfig(num_blocks=512), max_num_batched_tokens=2048
    )


def engine_alone(engine: object, args: argparse.Namespace, prompts: list[list[int]], run: int) -> dict:
    from kvxfer.engine import Request, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    began, cpu = time.perf_counter(), cpu_seconds(os.getpid())
    engine.generate([Request(f"e{run}-{i}", prompt, params) for i, prompt in enumerate(prompts)])  # type: ignore
    tokens = len(prompts) * args.max_tokens
    return {
        "tokens_per_s": tokens / (time.perf_counter() - began),
        "tokens_per_cpu_s": tokens / (cpu_seconds(os.getpid()) - cpu),
    }


def through_worker(router: FakeRouter, args: argparse.Namespace, prompts: list[list[int]], run: int) -> dict:
    sampling = p.Sampling(max_tokens=args.max_tokens, ignore_eos=True)
    frames_before = router.link.num_received
    pid = router.processes["a0"].pid
    began, cpu = time.perf_counter(), cpu_seconds(pid)
    rids = [f"w{run}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(rids, prompts, strict=True):
        router.send("a0", p.Generate(rid, tuple(prompt), sampling, time.time() + 600))
    tokens = sum(len(router.stream("a0", rid, timeout=600)[0]) for rid in rids)
    elapsed = time.perf_counter() - began
    cpu = cpu_seconds(pid) - cpu
    loads = sum(1 for m in router.messages["a0"][-2000:] if isinstance(m, p.Load))
    return {
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
        "frames": router.link.num_received - frames_before,
        "approx_heartbeats": min(loads, int(elapsed / 0.25) + 1),
        "tokens": tokens,
    }


def disaggregated(router: FakeRouter, args: argparse.Namespace, prompt: list[int]) -> dict:
    registers = {name: router.register(name) for name in ("p0", "d0")}
    peers = p.Peers(tuple(p.PeerInfo(r.name, r.role, r.rank_info) for r in registers.values()))
    router.send("p0", peers)
    router.send("d0", peers)
    sampling = p.Sampling(max_tokens=8, ignore_eos=True)
    results = []
    for run in range(args.repeats):
        rid = f"d{run}"
        prompt_run = [run + 1, *prompt]  # a new first token each run: no prefix-cache hit
        router.send("p0", p.Prefill(rid, tuple(prompt_run), sampling, "d0", time.time() + 600))
        ready = router.wait_for("p0", lambda m, rid=rid: isinstance(m, p.Prefilled) and m.rid == rid)
        assert isinstance(ready, p.Prefilled)
        router.send(
            "d0", p.Decode(rid, tuple(prompt_run), sampling, ready.kv_ready, ready.first_token, time.time() + 600)
        )
        _, _, timing, _ = router.stream("d0", rid)
        results.append({"prefill": ready.timing, "decode": timing})
    links = router.load("d0", lambda m: bool(m.links)).links
    return {"prompt_tokens": len(prompt) + 1, "runs": results, "links": {k: list(v) for k, v in links.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--disagg", action="store_true", help="also one prefill + one decode worker (UCX on CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    prompts = [[(7 * i + j) % 250 + 1 for j in range(args.prompt_tokens)] for i in range(args.requests)]
    result: dict = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as directory:
        router = FakeRouter(Path(directory))
        try:
            router.spawn("agg", "a0", "--device", args.device, "--threads", str(args.threads), "--num-blocks", "512")
            router.register("a0")
            engine = make_engine(args)
            runs, alone = [], []
            for run in range(args.repeats):  # interleaved: both see the same machine load
                alone.append(engine_alone(engine, args, prompts, run))
                runs.append(through_worker(router, args, prompts, run))
            result["engine_runs"], result["worker_runs"] = alone, runs
            for key in ("tokens_per_s", "tokens_per_cpu_s"):
                result[f"engine_{key}_median"] = statistics.median(r[key] for r in alone)
                result[f"worker_{key}_median"] = statistics.median(r[key] for r in runs)
                result[f"worker_over_engine_{key}"] = result[f"worker_{key}_median"] / result[f"engine_{key}_median"]
            result["decode_steps_per_run"] = args.max_tokens
            result["token_frames_per_step_median"] = statistics.median(
                (r["frames"] - r["approx_heartbeats"]) / args.max_tokens for r in runs
            )
            if args.disagg:
                router.spawn("prefill", "p0", "--device", args.device, "--threads", str(args.threads))
                router.spawn("decode", "d0", "--device", args.device, "--threads", str(args.threads))
                result["disaggregated"] = disaggregated(router, args, prompts[0] * 8)
        finally:
            router.close()
    result["machine"]["load_average_after"] = os.getloadavg()
    out = Path(args.out or Path(__file__).parent / "results" / f"worker_bench_{datetime.date.today()}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {k: v for k, v in result.items() if k not in ("worker_runs", "engine_runs", "disaggregated", "args")},
            indent=1,
        )
    )
    print("written", out)


if __name__ == "__main__":
    main()
