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
