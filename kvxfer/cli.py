"""The `kvxfer` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .environment import read as read_env


def parser() -> argparse.ArgumentParser:
    """The argument parser of `kvxfer`."""
    root = argparse.ArgumentParser(prog="kvxfer", description="kvxfer: move LLM KV caches from prefill to decode")
    commands = root.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="move one request's paged KV cache between two agents and check it")
    demo.add_argument("--tokens", type=int, default=2048)
    demo.add_argument("--block-size", type=int, default=16)
    demo.add_argument("--backend", default="local", help="local (default) or mock")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvxfer`."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=read_env("KVXFER_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from .demo import main as demo

        return demo(args.tokens, args.block_size, args.backend)
    return 2


if __name__ == "__main__":
    sys.exit(main())
