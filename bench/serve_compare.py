"""Disaggregated (xPyD) against aggregated serving on the same GPUs, through `kvxfer serve` and `kvxfer-bench serve`.

For each configuration (default: 1 prefill + 1 decode worker, then 2 aggregated workers) this starts
`kvxfer serve`, waits until it is healthy, runs the load points of `kvxfer.bench.serve` (aiperf's metric
definitions) at each concurrency and ISL/OSL mix, stops the server (SIGINT: it drains), and writes one JSON document
(and a plot with --plot). Usage on a GPU machine:

    python bench/serve_compare.py --model DIR --random-weights --dtype bfloat16 --json out.json --plot out.png

Without a GPU it runs on the CPU (small mixes only: the reference engine on a CPU is slow).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from kvxfer.bench import serve
from kvxfer.bench.report import print_table, write_json


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(args: argparse.Namespace, layout: dict[str, int], port: int, log: Any) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "kvxfer.cli",
        "serve",
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for role in ("prefill", "decode", "agg"):
        command += [f"--{role}", str(layout.get(role, 0))]
    if args.random_weights:
        command.append("--random-weights")
    if args.dtype:
        command += ["--dtype", args.dtype]
    command += args.serve_arg or []
    print("starting:", " ".join(command), flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kvxfer serve exited with {process.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                models = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
                return str(models[0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"kvxfer serve not healthy within {timeout_s} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _layouts(text: str) -> list[dict[str, int]]:
    """'1p1d,2agg' -> [{'prefill': 1, 'decode': 1}, {'agg': 2}]."""
    roles = {"p": "prefill", "d": "decode", "agg": "agg"}
    layouts = []
    for item in text.split(","):
        parts = re.findall(r"(\d+)(agg|p|d)", item.strip())
        if not parts or "".join(n + r for n, r in parts) != item.strip():
            raise SystemExit(f"--layouts: cannot read {item!r} (expected e.g. 1p1d or 2agg)")
        layouts.append({roles[role]: int(count) for count, role in parts})
    return layouts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--dtype")
    parser.add_argument("--layouts", default="1p1d,2agg", help="comma list: 1p1d, 2agg, 1p2d ... (1p1d,2agg)")
    parser.add_argument("--mixes", default="2000:200,500:100", help="ISL:OSL pairs (2000:200,500:100)")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--slo-itl-ms", type=float, default=50.0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--serve-arg", action="append", help="extra argument for `kvxfer serve` (repeatable)")
    parser.add_argument("--log-dir", default=".")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    mixes = [tuple(int(x) for x in pair.split(":")) for pair in args.mixes.split(",")]
    rows: list[dict[str, Any]] = []
    for layout in _layouts(args.layouts):
        name = "".join(f"{count}{role[0] if role != 'agg' else 'agg'}" for role, count in layout.items())
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(os.path.join(args.log_dir, f"serve_{name}.log"), "wb") as log:
            process = _start(args, layout, port, log)
            try:
                model = _wait_healthy(url, process, args.startup_timeout)
                for isl, osl in mixes:
                    specs = [
                        serve.LoadSpec(concurrency=c, num_requests=max(args.requests, c), isl=isl, osl=osl)
                        for c in concurrencies
                    ]
                    for row in serve.run(
                        url, model, specs, slo_ttft_s=args.slo_ttft_ms / 1e3, slo_itl_s=args.slo_itl_ms / 1e3
                    ):
                        rows.append({"layout": name, **row})
                        print_table(f"{name} ISL {isl} OSL {osl}", [rows[-1]])
            finally:
                _stop(process)
    if args.json:
        write_json(
            args.json,
            {
                "subcommand": "serve_compare",
                "tables": {"serving": rows},
                "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            },
        )
    if args.plot:
        _plot(rows, args.plot)
    return 0 if rows and all(row["completed"] for row in rows) else 1


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = sorted({(row["layout"], row["isl"], row["osl"]) for row in rows})
    for layout, isl, osl in keys:
        points = sorted(
            (r for r in rows if (r["layout"], r["isl"], r["osl"]) == (layout, isl, osl)), key=lambda r: r["concurrency"]
        )
        label = f"{layout} {isl}/{osl}"
        x = [r["concurrency"] for r in points]
        axes[0].plot(x, [r.get("ttft_ms_p50") for r in points], marker="o", label=label)
        axes[1].plot(x, [r.get("itl_ms_p50") for r in points], marker="o", label=label)
        axes[2].plot(x, [r.get("goodput_requests_per_s") for r in points], marker="o", label=label)
    for axis, title in zip(axes, ("TTFT p50 (ms)", "ITL p50 (ms)", "goodput (req/s under SLO)"), strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
