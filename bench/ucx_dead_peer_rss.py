"""RSS growth of a surviving agent per 100 killed-peer trials, per UCX path (issue 14, item 6).

Uses the fault matrix's harness (tests/faults/matrix.py): a survivor agent in this process, a victim agent in a
child process, a stream of READ or WRITE transfers between them, SIGKILL (or SIGSTOP then SIGKILL) of the victim at a
random point. After ``--warmup`` trials, ``--trials`` more are run and the survivor's RSS is read after each; the
growth is the least-squares slope of RSS over trial number, times 100 (KiB per 100 trials), plus the plain
difference last - first. Every trial's leaks (fds, threads, handles, UCX requests, sends, endpoints, closing
endpoints) are counted as in the matrix.

    python bench/ucx_dead_peer_rss.py --path ucx-direct --trials 150
    python bench/ucx_dead_peer_rss.py --path tcp --trials 150 --label before

JSON into bench/results/ucx_dead_peer_rss_<date>_<path>_<signal>[_<label>].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.matrix import UCX_PATHS, Survivor  # noqa: E402  (after the repository root is on the path)


def _slope(values: list[int]) -> float:
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values, dtype=np.float64), 1)[0]) if len(values) > 2 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=list(UCX_PATHS), default="ucx-direct")
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--signal", choices=["kill", "both"], default="kill", help="SIGKILL only, or alternate")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    survivor = Survivor(args.path)
    rss: list[int] = []
    leaks = 0
    examples = []
    began = time.monotonic()
    try:
        for _ in range(args.warmup):
            survivor.trial(signal.SIGKILL, str(rng.choice(["READ", "WRITE"])), rng)
        survivor.baseline = None
        survivor.baseline = survivor.settle()
        for i in range(args.trials):
            sig = signal.SIGKILL if args.signal == "kill" or i % 2 == 0 else signal.SIGSTOP
            trial = survivor.trial(sig, str(rng.choice(["READ", "WRITE"])), rng)
            rss.append(trial.rss_kib)
            if trial.leaks:
                leaks += 1
                if len(examples) < 5:
                    examples.append(trial.leaks)
    finally:
        survivor.close()
    result = {
        "what": "survivor RSS per killed-peer trial (issue 14 item 6)",
        "path": args.path,
        "signal": args.signal,
        "label": args.label,
        "warmup": args.warmup,
        "trials": len(rss),
        "rss_kib_first": rss[0] if rss else None,
        "rss_kib_last": rss[-1] if rss else None,
        "growth_kib_per_100_slope": round(_slope(rss) * 100, 1),
        "growth_kib_per_100_diff": round((rss[-1] - rss[0]) / max(1, len(rss) - 1) * 100, 1) if rss else None,
        "leaky_trials": leaks,
        "leak_examples": examples,
        "rss_kib": rss,
        "seconds": round(time.monotonic() - began, 1),
        "machine": f"{socket.gethostname()} {platform.machine()} {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "KVXFER_"))},
    }
    suffix = f"_{args.label}" if args.label else ""
    out = args.out or str(
        ROOT / "bench" / "results" / f"ucx_dead_peer_rss_{datetime.date.today()}_{args.path}_{args.signal}{suffix}.json"
    )
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_kib"}))
    print(out)


if __name__ == "__main__":
    main()
