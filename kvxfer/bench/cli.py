"""The `kvxfer-bench` command: one subcommand per kind of measurement."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .report import print_table, write_csv, write_json


def _local(args: argparse.Namespace) -> int:
    from . import local

    tables = {"plan / select / post": local.plan_and_post(repeats=args.repeats),
              "local backend vs numpy copy": local.bandwidth(total_nbytes=args.total_mib << 20,
                                                             repeats=max(3, args.repeats // 10))}
    _emit(args, tables)
    return 0


def _ipc(args: argparse.Namespace) -> int:
    from . import ipc

    rows = ipc.run(source=args.source, target=args.target, tokens=args.tokens, block_size=args.block_size,
                   strategy=args.strategy, repeats=args.repeats)
    _emit(args, {f"cuda_ipc GPU{args.source} -> GPU{args.target} (pull, until the notification arrives)": rows})
    return 0


def _kv(args: argparse.Namespace) -> int:
    from . import kv

    dims = tuple(int(x) for x in args.dims.split(",")) if args.dims else None
    setup = kv.Setup(model=args.model, tokens=args.tokens, block_size=args.block_size,
                     d_block_size=args.d_block_size, layout=args.layout, d_layout=args.d_layout, p_tp=args.p_tp,
                     d_tp=args.d_tp, backend=args.backend, p_gpu=args.p_gpu, d_gpu=args.d_gpu,
                     only_rank=args.only_rank, dims=dims)
    _emit(args, {f"KV request through KVPipe ({args.backend})": kv.run(setup, repeats=args.repeats)})
    return 0


def _emit(args: argparse.Namespace, tables: dict[str, list[dict]]) -> None:
    for title, rows in tables.items():
        print_table(title, rows)
    if args.json:
        write_json(args.json, {"subcommand": args.command, "tables": tables})
    if args.csv:
        write_csv(args.csv, [dict(table=title, **row) for title, rows in tables.items() for row in rows])


def parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    root = argparse.ArgumentParser(prog="kvxfer-bench", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="plan/post costs and local-backend GB/s on host memory")
    local.add_argument("--repeats", type=int, default=50)
    local.add_argument("--total-mib", type=int, default=256, help="bytes moved per bandwidth row (MiB)")
    local.set_defaults(run=_local)
    ipc = commands.add_parser("ipc", help="GPU->GPU between two processes through the CUDA IPC backend")
    ipc.add_argument("--source", type=int, default=0, help="GPU of the prefill (source) process")
    ipc.add_argument("--target", type=int, default=1, help="GPU of the decode (pulling) process")
    ipc.add_argument("--tokens", type=int, default=4096)
    ipc.add_argument("--block-size", type=int, default=16)
    ipc.add_argument("--strategy", default="auto", choices=["auto", "kernel", "copy"])
    ipc.add_argument("--repeats", type=int, default=20)
    ipc.set_defaults(run=_ipc)
    kv = commands.add_parser("kv", help="one model-shaped request through KVPipe (prefill TP -> decode TP)")
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
    kv.set_defaults(run=_kv)
    for sub in commands.choices.values():
        sub.add_argument("--json", help="write results to this JSON file")
        sub.add_argument("--csv", help="write results to this CSV file")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvxfer-bench`."""
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
