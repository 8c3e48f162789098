"""The `kvxfer` command: demo, serve, router, worker."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .environment import read as read_env


def _serving_arguments(command: argparse.ArgumentParser, default_port: int) -> None:
    command.add_argument("--model", required=True, help="tiny-random, smollm2 (SmolLM2-135M-Instruct) or an HF dir")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=default_port, help="HTTP port (0: any free port)")
    command.add_argument(
        "--control",
        default="tcp://127.0.0.1:0",
        help="zmq address the router binds for its workers (port 0: any; printed when ready)",
    )
    command.add_argument("--policy", default=None, help="routing policy thresholds (.yaml / .json)")
    command.add_argument("--request-timeout", type=float, default=300.0, help="total deadline of a request (s)")
    command.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, how long requests in flight may finish (s)",
    )
    command.add_argument(
        "--ready-timeout", type=float, default=600.0, help="how long to wait for every worker to register (s)"
    )
    command.add_argument("--log-level", default="warning", help="uvicorn's log level")
    command.add_argument(
        "--discovery",
        default=None,
        help="etcd://host:port[/cluster]: publish the control address "
        "in etcd and drop workers whose lease expires (default: embedded)",
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser of `kvxfer`."""
    root = argparse.ArgumentParser(prog="kvxfer", description="kvxfer: move LLM KV caches from prefill to decode")
    commands = root.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="serve SmolLM2 1P1D and ask it a question (--kv: the KV-only demo)")
    demo.add_argument("--kv", action="store_true", help="move one request's paged KV cache between two agents")
    demo.add_argument("--model", default="smollm2", help="model of the serving demo")
    demo.add_argument("--question", default="What is the capital of France?")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--tokens", type=int, default=None, help="KV demo (implies --kv): request size (default 2048)")
    demo.add_argument("--block-size", type=int, default=None, help="KV demo (implies --kv): block size (default 16)")
    demo.add_argument("--backend", default=None, help="KV demo (implies --kv): local (default) or mock")

    serve = commands.add_parser("serve", help="router + prefill/decode worker processes on this machine")
    _serving_arguments(serve, 8000)
    serve.add_argument("--prefill", type=int, default=1, help="prefill workers")
    serve.add_argument("--decode", type=int, default=1, help="decode workers")
    serve.add_argument("--agg", type=int, default=0, help="aggregated workers (prefill + decode)")
    serve.add_argument("--device", default=None, help="device of every worker (default: cuda:i mod n, else cpu)")
    serve.add_argument("--dtype", default=None, help="model dtype on the workers (float32, bfloat16, float16)")
    serve.add_argument("--random-weights", action="store_true", help="the model's shape and tokenizer, random weights")
    serve.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker")
    serve.add_argument("--max-batch", type=int, default=None, help="requests per worker batch")
    serve.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks per worker")
    serve.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per CPU worker (default: the cores divided among the CPU workers)",
    )

    router = commands.add_parser("router", help="the OpenAI-compatible router alone; workers connect to --control")
    _serving_arguments(router, 8000)
    router.set_defaults(random_weights=False)

    commands.add_parser(
        "worker", help="one prefill / decode / agg worker (its options: `kvxfer worker -h`)", add_help=False
    )
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kvxfer`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # the worker parses its own arguments
        from .serve.worker import main as worker_main

        return int(worker_main(argv[1:]))
    args = parser().parse_args(argv)
    logging.basicConfig(level=read_env("KVXFER_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        if args.kv or (args.tokens, args.block_size, args.backend) != (None, None, None):
            from .demo import main as kv_demo

            return kv_demo(args.tokens or 2048, args.block_size or 16, args.backend or "local")
        from .serve.demo import main as serve_demo

        return serve_demo(args.model, args.question, args.max_tokens)
    if args.command in ("serve", "router"):
        for count in ("prefill", "decode", "agg"):
            if getattr(args, count, 0) < 0:
                parser().error(f"--{count} must be >= 0")
        if args.command == "serve" and args.decode + args.agg < 1:
            parser().error("kvxfer serve needs at least one --decode or --agg worker")
        from .serve.launcher import main as launch

        return launch(args, spawn_workers=args.command == "serve")
    return 2


if __name__ == "__main__":
    sys.exit(main())
