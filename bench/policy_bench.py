"""Routing decisions per second of the serving policy on a realistic cluster.

Cluster: ``--prefill`` prefill and ``--decode`` decode workers with varied loads, queues, measured prefill rates and
a measured link for every prefill->decode pair. Requests: ``--tokens``-token prompts made of one of 64 shared
"system prompts" (half the prompt) and a random tail, hashed into 16-token blocks with the engine's hash chain
(done once, before timing: the router hashes a prompt once whatever it routes), mixed priorities, a prefill queue
of varying length. A :class:`PrefixIndex` bounded at ``--index-entries`` is filled to its bound first.

Three timings, each the median (and best) of ``--repeats`` runs of ``--decisions`` decisions:

- ``route``: ``policy.route()`` alone, the per-worker overlap already known;
- ``route_with_index``: what the router does per request: ``PrefixIndex.matched`` for every worker, ``route()``,
  ``PrefixIndex.record`` of the prompt for the chosen workers (the index evicting at its bound);
- ``block_hashes``: hashing one prompt (pure Python blake2b chain), for scale.

Each rate is given per wall-clock second and per CPU second of this process: on a shared machine the second hides
the other processes' load. ``calibration_sum_range_1000_us`` (``sum(range(1000))``, about 7 us on a 2023 desktop
core) says how fast Python ran here, before and after. Writes ``bench/results/policy_bench_<date>.json`` (machine,
load average, date, command, numbers).

    python bench/policy_bench.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from kvxfer.serve.policy import LinkRate, PolicyConfig, RouteRequest, WorkerState, route
from kvxfer.serve.prefix_index import PrefixIndex, block_hashes

BLOCK_SIZE = 16
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # SmolLM2-135M: K and V, 30 layers, 3 KV heads of 64, bf16


def build_cluster(
    rng: random.Random, num_prefill: int, num_decode: int
) -> tuple[list[WorkerState], dict[tuple[str, str], LinkRate]]:
    workers = [
        WorkerState(
            f"prefill-{i}",
            "prefill",
            BLOCK_SIZE,
            rng.randrange(2000, 8000),
            rng.randrange(0, 2000),
            rng.randrange(0, 20_000),
            rng.uniform(5_000, 20_000),
            0.0,
        )
        for i in range(num_prefill)
    ]
    workers += [
        WorkerState(
            f"decode-{i}",
            "decode",
            BLOCK_SIZE,
            rng.randrange(500, 8000),
            rng.randrange(0, 6000),
            rng.randrange(0, 4000),
            rng.uniform(2_000, 8_000),
            rng.uniform(0.0, 0.2),
        )
        for i in range(num_decode)
    ]
    links = {
        (p.name, d.name): LinkRate(rng.uniform(1e9, 40e9), rng.uniform(1e-5, 1e-4))
        for p in workers
        if p.role == "prefill"
        for d in workers
        if d.role == "decode"
    }
    return workers, links


def build_requests(rng: random.Random, count: int, tokens: int) -> list[RouteRequest]:
    systems = [[rng.randrange(50_000) for _ in range(tokens // 2)] for _ in range(64)]
    priorities = ["high"] * 1 + ["normal"] * 7 + ["low"] * 2
    requests = []
    for number in range(count):
        prompt = rng.choice(systems) + [rng.randrange(50_000) for _ in range(tokens - tokens // 2)]
        hashes = tuple(block_hashes(prompt, BLOCK_SIZE))
        requests.append(
            RouteRequest(
                f"req-{number}",
                len(prompt),
                hashes,
                rng.choice(priorities),  # type: ignore[arg-type]
                KV_BYTES_PER_TOKEN,
            )
        )
    return requests


def fill_index(index: PrefixIndex, requests: list[RouteRequest], names: list[str], rng: random.Random) -> None:
    while len(index) < index.max_entries:
        index.record(rng.choice(names), rng.choice(requests).block_hashes)


def time_loop(repeats: int, run: Callable[[], tuple[int, float]]) -> dict[str, object]:
    """Rates per wall-clock second and per CPU second of this process (the latter hides other processes' load)."""
    rates, cpu_rates = [], []
    for _ in range(repeats):
        cpu = time.process_time()
        count, seconds = run()
        rates.append(count / seconds)
        cpu_rates.append(count / max(time.process_time() - cpu, 1e-9))
    return {
        "median_per_s": statistics.median(rates),
        "best_per_s": max(rates),
        "runs_per_s": rates,
        "median_per_cpu_s": statistics.median(cpu_rates),
        "best_per_cpu_s": max(cpu_rates),
    }


def calibration_us() -> float:
    """Best of 5 timings of ``sum(range(1000))`` in microseconds: how fast this Python runs now (a 2023-era desktop
    core takes about 7 us), to scale the numbers above by."""
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=4)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--index-entries", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(0)
    cfg = PolicyConfig()
    workers, links = build_cluster(rng, args.prefill, args.decode)
    names = [w.name for w in workers]
    requests = build_requests(rng, 2000, args.tokens)
    index = PrefixIndex(max_entries=args.index_entries)
    fill_index(index, requests, names, rng)
    queue_sizes = [rng.randrange(0, 80) for _ in range(len(requests))]
    overlaps = [index.matched(names, req.block_hashes) for req in requests]
    decisions = args.decisions
    outcomes: dict[str, int] = {}

    def route_only() -> tuple[int, float]:
        start = time.perf_counter()
        for number in range(decisions):
            slot = number % len(requests)
            route(cfg, requests[slot], workers, overlaps[slot], links, queue_sizes[slot], 4000)
        return decisions, time.perf_counter() - start

    def route_with_index() -> tuple[int, float]:
        start = time.perf_counter()
        for number in range(decisions):
            slot = number % len(requests)
            req = requests[slot]
            decision = route(cfg, req, workers, index.matched(names, req.block_hashes), links, queue_sizes[slot], 4000)
            if decision.decode is not None:
                index.record(decision.decode, req.block_hashes)
                if decision.prefill is not None:
                    index.record(decision.prefill, req.block_hashes)
        return decisions, time.perf_counter() - start

    def hashing() -> tuple[int, float]:
        prompt = [rng.randrange(50_000) for _ in range(args.tokens)]
        start = time.perf_counter()
        for _ in range(200):
            block_hashes(prompt, BLOCK_SIZE)
        return 200, time.perf_counter() - start

    calibration_before = calibration_us()
    for slot, req in enumerate(requests):
        decision = route(cfg, req, workers, overlaps[slot], links, queue_sizes[slot], 4000)
        key = "rejected" if not decision.admitted else ("remote" if decision.disaggregated else "local")
        outcomes[key] = outcomes.get(key, 0) + 1
    results = {
        "route": time_loop(args.repeats, route_only),
        "route_with_index": time_loop(args.repeats, route_with_index),
        "block_hashes": time_loop(args.repeats, hashing),
    }
    today = datetime.date.today().isoformat()
    report = {
        "benchmark": "policy_bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor(),
            "load_average_1_5_15_min": list(os.getloadavg()),
            "note": "shared machine: other processes ran at the same time; see the load average",
        },
        "setup": {
            "prefill_workers": args.prefill,
            "decode_workers": args.decode,
            "prompt_tokens": args.tokens,
            "block_size": BLOCK_SIZE,
            "blocks_per_prompt": args.tokens // BLOCK_SIZE,
            "index_entries": len(index),
            "index_bound": args.index_entries,
            "decisions_per_run": decisions,
            "repeats": args.repeats,
            "outcomes_of_2000_requests": outcomes,
            "config": cfg.to_mapping(),
        },
        "results": results,
        "target_decisions_per_s": 20_000,
        "calibration_sum_range_1000_us": {"before": calibration_before, "after": calibration_us()},
    }
    for name, numbers in results.items():
        print(
            f"{name:18s} median {numbers['median_per_s']:>10,.0f}/s  best {numbers['best_per_s']:>10,.0f}/s  "
            f"per CPU second: median {numbers['median_per_cpu_s']:>10,.0f}  best {numbers['best_per_cpu_s']:>10,.0f}"
        )
    print(f"calibration sum(range(1000)): {report['calibration_sum_range_1000_us']} us")
    print(f"outcomes: {outcomes}")
    path = args.json or Path(__file__).resolve().parent / "results" / f"policy_bench_{today}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
