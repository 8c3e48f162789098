"""The `kvxfer-bench` command: one subcommand per kind of measurement (docs/bench.md describes each).

kvxfer-bench sweep --backend ucx --memory host:host --sizes 4K-64M --batch 16 --plot sweep.png --json sweep.json
kvxfer-bench target --backend ucx --listen 0.0.0.0:5555 --memory host,cuda   # by hand, on the other host
kvxfer-bench serve --url http://127.0.0.1:8000 --model M --isl 2000 --osl 200 --concurrency 1,4,16
kvxfer-bench ceiling | kernels | kv | ipc | local
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import BackendUnavailableError, ConfigError, KvxferError
from . import commands
from .report import print_table, write_csv, write_json


def _local(args: argparse.Namespace) -> int:
    from . import local

    if args.keep_freed_memory:
        from ..tuning import keep_freed_memory

        keep_freed_memory()
    tables = {
        "plan / select / post": local.plan_and_post(repeats=args.repeats),
        "local backend vs numpy copy": local.bandwidth(
            total_nbytes=args.total_mib << 20, repeats=max(3, args.repeats // 10)
        ),
    }
    _emit(args, tables)
    return 0


def _gpu_missing(args: argparse.Namespace) -> bool:
    """True, after saying so (and noting it in --json), when no CUDA GPU is usable here (as `kernels` does)."""
    from ..devices import cupy_module

    try:
        cupy_module()
    except BackendUnavailableError as error:
        print(f"kvxfer-bench {args.command} skipped: needs a CUDA GPU: {error}")
        if args.json:
            write_json(args.json, {"subcommand": args.command, "skipped": str(error), "tables": {}})
        return True
    return False


def _ipc(args: argparse.Namespace) -> int:
    if _gpu_missing(args):
        return 0
    from . import ipc

    rows = ipc.run(
        source=args.source,
        target=args.target,
        tokens=args.tokens,
        block_size=args.block_size,
        strategy=args.strategy,
        repeats=args.repeats,
    )
    _emit(args, {f"cuda_ipc GPU{args.source} -> GPU{args.target} (pull, until the notification arrives)": rows})
    return 0


def _kv(args: argparse.Namespace) -> int:
    from . import kv

    dims = None
    if args.dims:
        values = [int(x) for x in args.dims.split(",")]
        if len(values) != 3:
            raise ConfigError(f"--dims must be three numbers L,H,D (layers, KV heads, head_dim), got {args.dims!r}")
        dims = (values[0], values[1], values[2])
    setup = kv.Setup(
        model=args.model,
        tokens=args.tokens,
        block_size=args.block_size,
        d_block_size=args.d_block_size,
        layout=args.layout,
        d_layout=args.d_layout,
        p_tp=args.p_tp,
        d_tp=args.d_tp,
        backend=args.backend,
        p_gpu=args.p_gpu,
        d_gpu=args.d_gpu,
        only_rank=args.only_rank,
        dims=dims,
    )
    if setup.on_gpu and _gpu_missing(args):
        return 0
    rows = kv.run(setup, repeats=args.repeats, profile=args.profile, decode_processes=args.decode_processes)
    _emit(args, {f"KV request through KVPipe ({args.backend})": rows})
    return 0


def _serve(args: argparse.Namespace) -> int:
    from . import serve

    specs = [
        serve.LoadSpec(
            concurrency=c,
            num_requests=max(args.requests, c),
            isl=args.isl,
            osl=args.osl,
            seed=args.seed,
            timeout_s=args.timeout,
        )
        for c in _int_list(args.concurrency, "--concurrency")
    ]
    rows = serve.run(
        args.url,
        args.model,
        specs,
        slo_ttft_s=args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
        slo_itl_s=args.slo_itl_ms / 1e3 if args.slo_itl_ms else None,
        warmup=args.warmup,
    )
    _emit(args, {f"serving {args.url} (ISL {args.isl} / OSL {args.osl}, aiperf metric definitions)": rows})
    return 0 if all(row["completed"] for row in rows) else 1


def _int_list(text: str, argument: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{argument} must be a comma list of ints >= 1, got {text!r}")
    return values


def _emit(args: argparse.Namespace, tables: dict[str, list[dict]]) -> None:
    for title, rows in tables.items():
        print_table(title, rows)
    if args.json:
        write_json(args.json, {"subcommand": args.command, "tables": tables})
    if args.csv:
        write_csv(args.csv, [dict(table=title, **row) for title, rows in tables.items() for row in rows])


def parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    root = argparse.ArgumentParser(
        prog="kvxfer-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subcommands = root.add_subparsers(dest="command", required=True)
    _sweep_parser(subcommands)
    _target_parser(subcommands)
    _kernels_parser(subcommands)
    _ceiling_parser(subcommands)
    redraw = subcommands.add_parser("plot", help="redraw the plot of a sweep recorded with --json")
    redraw.add_argument("results", help="JSON file written by `kvxfer-bench sweep --json`")
    redraw.add_argument("out", help="image to write (PNG)")
    redraw.set_defaults(run=commands.plot)
    local = subcommands.add_parser("local", help="plan/post costs and local-backend GB/s on host memory")
    local.add_argument("--repeats", type=int, default=50)
    local.add_argument("--total-mib", type=int, default=256, help="bytes moved per bandwidth row (MiB)")
    local.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="call kvxfer.tuning.keep_freed_memory() first (as the serve workers do)",
    )
    local.set_defaults(run=_local)
    ipc = subcommands.add_parser("ipc", help="GPU->GPU between two processes through the CUDA IPC backend")
    ipc.add_argument("--source", type=int, default=0, help="GPU of the prefill (source) process")
    ipc.add_argument("--target", type=int, default=1, help="GPU of the decode (pulling) process")
    ipc.add_argument("--tokens", type=int, default=4096)
    ipc.add_argument("--block-size", type=int, default=16)
    ipc.add_argument("--strategy", default="auto", choices=["auto", "kernel", "copy"])
    ipc.add_argument("--repeats", type=int, default=20)
    ipc.set_defaults(run=_ipc)
    kv = subcommands.add_parser("kv", help="one model-shaped request through KVPipe (prefill TP -> decode TP)")
    kv.add_argument("--model", default="llama-3.1-8b", help="llama-3.1-8b, llama-3.1-70b, qwen3-32b or custom")
    kv.add_argument("--dims", help="custom model: layers,kv_heads,head_dim")
    kv.add_argument("--tokens", type=int, default=4096)
    kv.add_argument("--block-size", type=int, default=16)
    kv.add_argument("--d-block-size", type=int, help="decode block size (default: the prefill's)")
    kv.add_argument("--layout", default="HND", choices=["HND", "NHD"])
    kv.add_argument("--d-layout", choices=["HND", "NHD"], help="decode layout (default: the prefill's)")
    kv.add_argument("--p-tp", type=int, default=1)
    kv.add_argument("--d-tp", type=int, default=1)
    kv.add_argument("--only-rank", type=int, help="time one decode rank (a per-rank shard)")
    kv.add_argument("--backend", default="cuda_ipc", choices=["cuda_ipc", "local", "ucx", "ucx-host"])
    kv.add_argument("--p-gpu", type=int, default=0)
    kv.add_argument("--d-gpu", type=int, default=1)
    kv.add_argument("--repeats", type=int, default=20)
    kv.add_argument("--profile", action="store_true", help="print where decode rank 0's host time went")
    kv.add_argument(
        "--decode-processes",
        action="store_true",
        help="each decode rank in a process of its own (they share --d-gpu: kernels time-slice)",
    )
    kv.set_defaults(run=_kv)
    _serve_parser(subcommands)
    for name, sub in subcommands.choices.items():
        if name not in ("target", "plot", "kernels"):
            sub.add_argument("--json", help="write results to this JSON file")
            sub.add_argument("--csv", help="write results to this CSV file")
    return root


def _sweep_parser(subcommands: Any) -> None:
    sweep = subcommands.add_parser(
        "sweep",
        help="GB/s and latency: backend x memory x op x fragment size x batch x threads",
        description="Initiator (this process) against a target process the tool starts (or --peer). Columns follow "
        "nixlbench: block size, batch size, GB/s (1e9), avg latency, prep/post/completion avg and p99.",
    )
    sweep.add_argument("--backend", default="ucx", help="comma list of backends: local, ucx, cuda_ipc (default ucx)")
    sweep.add_argument(
        "--memory",
        default="host:host",
        help="comma list of initiator:target memory kinds (host, cuda) or 'all' (default host:host)",
    )
    sweep.add_argument("--op", default="READ,WRITE", help="READ, WRITE or both (default READ,WRITE)")
    sweep.add_argument("--sizes", default="4K-64M", help="fragment sizes: a doubling range 4K-64M or a list 4K,2M")
    sweep.add_argument("--batch", default="16", help="fragments per request, comma list (default 16)")
    sweep.add_argument("--threads", default="1", help="requests posted at once by as many threads (default 1)")
    sweep.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    sweep.add_argument("--repeats", type=int, default=10, help="timed repetitions (default 10)")
    sweep.add_argument("--verify", type=int, default=4, help="fragments byte-checked per case; 0: none (default 4)")
    sweep.add_argument("--peer", help="host:port of a `kvxfer-bench target` started by hand (default: start one)")
    sweep.add_argument("--token", help="the side-channel token the --peer target requires")
    sweep.add_argument("--initiator-gpu", type=int, default=0, help="GPU of the initiator's cuda memory")
    sweep.add_argument("--target-gpu", type=int, help="GPU of the target's cuda memory (default 1 if present, else 0)")
    sweep.add_argument(
        "--ceiling",
        default="copy",
        choices=["copy", "perftest"],
        help="copy: contiguous copy of the same bytes on the memory path; perftest: ucx_perftest "
        "per fragment size for ucx host rows",
    )
    sweep.add_argument("--ceiling-bytes", help="bytes of the copy ceiling (default: each row's own request bytes)")
    sweep.add_argument("--max-request", default="1G", help="skip cases moving more bytes per repetition (1G)")
    sweep.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per transfer (default 120)")
    sweep.add_argument(
        "--compare",
        action="append",
        choices=["nixl"],
        help="also run NIXL on the same work (skipped with a note when NIXL is not installed)",
    )
    sweep.add_argument("--plot", help="write GB/s vs fragment size (log-log) to this PNG")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(run=commands.sweep)


def _target_parser(subcommands: Any) -> None:
    target = subcommands.add_parser("target", help="the passive side of a sweep, started by hand (see sweep --peer)")
    target.add_argument("--backend", default="ucx", help="backend of the target agent (default ucx)")
    target.add_argument("--listen", default="127.0.0.1:0", help="side channel host:port (0.0.0.0:PORT for peers)")
    target.add_argument("--token", help="a secret initiators must present")
    target.add_argument("--memory", default="host", help="memory kinds to offer: host, cuda or host,cuda")
    target.add_argument("--nbytes", default="1G", help="bytes per memory kind (default 1G)")
    target.add_argument("--device", type=int, default=0, help="GPU of the cuda memory")
    target.add_argument("--once", action="store_true", help="exit when the first initiator says goodbye")
    target.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    target.set_defaults(run=commands.target)


def _serve_parser(subcommands: Any) -> None:
    serve = subcommands.add_parser(
        "serve",
        help="TTFT / ITL / throughput / goodput of an OpenAI-compatible endpoint (aiperf's definitions)",
        description="Streams /v1/completions requests of exactly ISL prompt token ids and OSL output tokens "
        "(ignore_eos) at each concurrency; reports aiperf's metrics (kvxfer/bench/serve.py says how each "
        "is defined) and, when the server reports it, kvxfer's TTFT breakdown.",
    )
    serve.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    serve.add_argument("--model", required=True, help="model id, as /v1/models lists it")
    serve.add_argument("--concurrency", default="1,4,16", help="comma list of requests in flight (1,4,16)")
    serve.add_argument("--requests", type=int, default=32, help="requests per load point (at least concurrency)")
    serve.add_argument("--isl", type=int, default=2000, help="prompt tokens per request (2000)")
    serve.add_argument("--osl", type=int, default=200, help="output tokens per request (200)")
    serve.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT limit (ms)")
    serve.add_argument("--slo-itl-ms", type=float, help="goodput: ITL limit (ms)")
    serve.add_argument("--warmup", type=int, default=2, help="untimed requests before each load point")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request")
    serve.set_defaults(run=_serve)


def _kernels_parser(subcommands: Any) -> None:
    kernels = subcommands.add_parser(
        "kernels",
        help="gather/scatter/re-tile kernels' GB/s on one GPU (python -m kvxfer.bench.kernels)",
        description="Runs kvxfer.bench.kernels with the arguments that follow (--quick, --json PATH, --gib G, "
        "--repeats N, --fragments KIB ...); says so and exits 0 without a GPU.",
    )
    kernels.set_defaults(run=commands.kernels)


def _ceiling_parser(subcommands: Any) -> None:
    ceiling = subcommands.add_parser(
        "ceiling", help="raw ceilings: memcpy, device/peer copy, pinned h2d/d2h, ucx_perftest"
    )
    ceiling.add_argument("--host-bytes", default="256M", help="bytes of the memcpy (default 256M)")
    ceiling.add_argument("--device-bytes", default="1G", help="bytes of the GPU copies (default 1G)")
    ceiling.add_argument("--repeats", type=int, default=10)
    ceiling.add_argument("--perftest-sizes", default="4K,64K,1M,64M", help="ucx_perftest message sizes")
    ceiling.add_argument("--no-perftest", action="store_true", help="skip ucx_perftest")
    ceiling.set_defaults(run=commands.ceiling)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvxfer-bench`."""
    root = parser()
    args, extra = root.parse_known_args(argv)
    if extra and args.command != "kernels":
        root.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.run(args))
    except KvxferError as error:
        print(f"kvxfer-bench {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
