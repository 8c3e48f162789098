"""``kvxfer worker``: a long-running process around one engine, its connector and a scheduling loop thread.

Roles: ``prefill`` (PrefillEngine + PrefillConnector: answers ``prefill`` with ``prefilled``), ``decode``
(DecodeEngine + DecodeConnector: ``decode`` pulls the K/V and decodes; ``generate`` prefills locally and decodes),
``agg`` (DecodeEngine alone: ``generate`` only; no agent, no KV moves). The worker connects one zmq DEALER to the
router (:class:`~kvxfer.serve.control.WorkerLink`), sends ``register`` on every (re)connection and ``load`` every
0.25 s (the heartbeat), and serves until told to stop.

Stopping: ``shutdown`` or SIGTERM/SIGINT drains (no new requests; running ones finish within ``drain_s``, then the
rest are aborted; a prefill worker waits for its held blocks to be pulled), closes the agent and the link, and
exits 0. When the link to the router stays down for ``--router-timeout`` seconds (5 by default; counted from the
start until the first connection too), the worker aborts everything and exits 3 — the launcher or the operator
restarts it. Bad arguments exit 2, a failure of the scheduling loop exits 1.

``--model``: any name or directory :func:`kvxfer.models.load_model` knows ("tiny-random", "smollm2", a Hugging Face
directory); ``preset:<name>`` builds an engine preset (``preset:tiny``) with seeded random weights instead.
``--tp N`` runs N rank processes (see :mod:`kvxfer.serve.worker_tp`); this process is rank 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import ConfigError, KvxferError
from .protocol import Register

logger = logging.getLogger("kvxfer.serve")

HEARTBEAT_S = 0.25
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ROUTER_LOST = 0, 1, 2, 3


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options (``kvxfer worker`` and ``python -m kvxfer.serve.worker``)."""
    parser.add_argument("--role", required=True, choices=("prefill", "decode", "agg"))
    parser.add_argument("--model", required=True, help="load_model name or directory, or preset:<engine preset>")
    parser.add_argument(
        "--router",
        default=None,
        help="the router's control address, e.g. tcp://127.0.0.1:7100 (or found through --discovery)",
    )
    parser.add_argument(
        "--discovery",
        default=None,
        help="etcd://host:port[/cluster]: publish this worker under a lease and find the router there",
    )
    parser.add_argument(
        "--discovery-ttl", type=float, default=3.0, help="seconds the etcd lease outlives the last keepalive"
    )
    parser.add_argument("--name", default=None, help="unique worker name (default: <role>-<pid>)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (processes over torch.distributed)")
    parser.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16; default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="address the agent's side channel listens on")
    parser.add_argument("--backends", default=None, help="comma-separated kvxfer backends (default: all available)")
    parser.add_argument("--num-blocks", type=int, default=512, help="KV cache blocks")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--max-batch", type=int, default=64, help="running requests (decode) / prompts per batch")
    parser.add_argument("--max-batch-tokens", type=int, default=2048, help="prompt tokens per prefill step")
    parser.add_argument("--max-queue", type=int, default=256, help="prefill role: queued requests before refusing")
    parser.add_argument("--lease-ttl", type=float, default=10.0, help="prefill role: seconds blocks wait for a pull")
    parser.add_argument("--transfer-timeout", type=float, default=30.0, help="decode role: seconds a pull may take")
    parser.add_argument("--drain-s", type=float, default=10.0, help="seconds SIGTERM lets running requests finish")
    parser.add_argument("--router-timeout", type=float, default=5.0, help="exit 3 after this long without the router")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of preset:<name> models")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the model's shape and tokenizer with seeded random weights (load_model(random_weights))",
    )
    parser.add_argument("--cache-dir", default=None, help="kvxfer.models cache directory")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is best when several CPU workers share a host)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding the shared secret the agent's side channel requires (multi-host)",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve the side channel on a non-loopback --host without a token (trusted networks)",
    )
    parser.add_argument("--log-level", default="WARNING")


def build_model(
    spec: str,
    device: str,
    dtype: str | None,
    seed: int,
    random_weights: bool = False,
    cache_dir: str | None = None,
    tp: Any = None,
) -> tuple[str, Any]:
    """(served model name, kvxfer.engine.Model of this TP rank) for ``--model``."""
    from ..engine import Model, ModelConfig

    if spec.startswith("preset:"):
        changes = {"dtype": dtype} if dtype else {}
        config = ModelConfig.preset(spec.split(":", 1)[1], **changes)
        return spec, Model.random(config, seed=seed, tp=tp, device=device)
    from ..models import load_model

    if random_weights:
        try:
            bundle = load_model(spec, cache_dir=cache_dir, random_weights=True)  # type: ignore[call-arg]
        except TypeError as error:
            raise ConfigError(f"--random-weights: this kvxfer.models.load_model does not take it ({error})") from None
    else:
        bundle = load_model(spec, cache_dir=cache_dir)
    return bundle.name, bundle.build(device=device, dtype=dtype, tp=tp)


def kv_bytes_per_token(spec: Any) -> int:
    """K/V bytes of one token over the whole model: every layer, every KV head once (however ranks replicate them)."""
    per_head = spec.block_nbytes // spec.block_size // spec.num_kv_heads  # one layer
    return int(per_head * (spec.total_kv_heads or spec.num_kv_heads * spec.tp_size) * spec.num_layers)


class Worker:
    """The worker process's objects: engine, connector, agent, loop, link (built from parsed arguments)."""

    def __init__(self, args: argparse.Namespace, rank: int = 0, tp: Any = None, control: Any = None) -> None:
        from ..engine import CacheConfig
        from .worker_tp import gather_rank_info, make_sync, rank_device

        size = 1 if tp is None else tp.size
        if not args.router and not args.discovery:
            raise ConfigError("kvxfer worker: give --router or --discovery")
        if args.tp != size:
            raise ConfigError(f"kvxfer worker: --tp {args.tp} but this process is in a group of {size}")
        self.args, self.rank = args, rank
        self.name = args.name or f"{args.role}-{os.getpid()}"
        self.device = rank_device(args.device, rank)
        self.model_name, model = build_model(
            args.model, self.device, args.dtype, args.seed, args.random_weights, args.cache_dir, tp
        )
        cache = CacheConfig(num_blocks=args.num_blocks, block_size=args.block_size)
        self.agent: Any = None
        self.connector: Any = None
        self.loop = self._build_loop(args, model, cache)
        spec = (self.connector.engine if self.connector is not None else self.loop.engine).spec
        rank_info: tuple[bytes, ...] = ()
        if self.connector is not None:
            rank_info = (self.connector.info().encode(),)
            if size > 1:
                rank_info = gather_rank_info(rank_info[0], size)
        if size > 1:
            self.loop.sync, self.loop.leader = make_sync(control), rank == 0
        self.register = Register(
            self.name,
            args.role,
            self.model_name,
            args.block_size,
            args.num_blocks,
            kv_bytes_per_token(spec),
            rank_info,
            args.max_batch,
            args.device,
        )
        self.link: Any = None
        self._register_pending = False
        self.discovery: Any = None

    def _build_loop(self, args: argparse.Namespace, model: Any, cache: Any) -> Any:
        import kvxfer

        from ..engine import (
            DecodeConnector,
            DecodeEngine,
            PrefillConnector,
            PrefillEngine,
        )
        from .worker_decode import DecodeLoop
        from .worker_prefill import PrefillLoop

        if args.role != "agg":
            backends = args.backends.split(",") if args.backends else None
            agent_name = self.name if self.rank == 0 else f"{self.name}.r{self.rank}"
            token = Path(args.token_file).read_text().strip() if args.token_file else None
            self.agent = kvxfer.Agent(
                agent_name,
                backends=backends,
                listen=f"{args.host}:0",
                token=token,
                allow_unauthenticated=args.allow_unauthenticated,
            )
        if args.role == "prefill":
            self.connector = PrefillConnector(PrefillEngine(model, cache), self.agent, lease_ttl=args.lease_ttl)
            return PrefillLoop(
                self.name,
                self._send,
                self.connector,
                max_queue=args.max_queue,
                max_batch=args.max_batch,
                max_batch_tokens=args.max_batch_tokens,
            )
        engine = DecodeEngine(model, cache, max_batch_size=args.max_batch, max_num_batched_tokens=args.max_batch_tokens)
        if args.role == "decode":
            self.connector = DecodeConnector(engine, self.agent, timeout=args.transfer_timeout)
        return DecodeLoop(self.name, self._send, engine, self.connector, kv_bytes_per_token(engine.spec))

    def _on_connect(self) -> None:
        """(Re)connected to the router: (re)register (a router that restarted knows nothing of this worker)."""
        if self.link is None:  # connected before run() stored the link: run() sends it
            self._register_pending = True
        else:
            self.link.send(self.register)

    def _send(self, message: Any) -> bool:
        return self.link is not None and bool(self.link.send(message))

    def run(self) -> int:
        """Serve until drained or the router is lost; the exit code."""
        from .control import WorkerLink

        router = self.args.router
        if self.args.discovery:
            from .discovery_link import WorkerDiscoveryLink, worker_record

            self.discovery = WorkerDiscoveryLink(
                self.args.discovery,
                worker_record(self.register, self.agent.listen_address if self.agent is not None else None),
                self.args.discovery_ttl,
            )
            router = router or self.discovery.find_router(timeout_s=max(self.args.router_timeout, 30.0))
        self.link = WorkerLink(router, self.name, self.loop.post, on_connect=self._on_connect)
        if self.discovery is not None:
            self.discovery.start()
        if self._register_pending:  # connected before self.link was set: the callback could not send
            self.link.send(self.register)
        self.loop.start()
        logger.warning(
            "worker %s: %s on %s, model %s, agent %s, router %s",
            self.name,
            self.args.role,
            self.args.device,
            self.model_name,
            self.agent.listen_address if self.agent else None,
            router,
        )
        code = EXIT_OK
        next_beat = time.monotonic()
        while self.loop.alive:
            if time.monotonic() >= next_beat:
                if self.link.connected:
                    self.link.send(self.loop.load)
                next_beat = time.monotonic() + HEARTBEAT_S
            if self.link.disconnected_s > self.args.router_timeout:
                logger.error(
                    "worker %s: no router at %s for %.1f s: aborting everything and exiting",
                    self.name,
                    router,
                    self.args.router_timeout,
                )
                self.loop.stop()
                code = EXIT_ROUTER_LOST
                break
            time.sleep(0.02)
        self.loop.join(30.0)
        if self.loop.error is not None:
            code = EXIT_FAILED
        if code == EXIT_OK and self.link.connected:
            self.link.send(self.loop.load)  # the final free-block counts
        return code

    def close(self) -> None:
        """Close the discovery record, the link, the connector's pipes and the agent (after :meth:`run`)."""
        if self.discovery is not None:
            self.discovery.close()  # revokes the lease: the router drops this worker at once
        if self.link is not None:
            self.link.close(linger_s=1.0)
        if self.connector is not None:
            self.connector.close()
        if self.agent is not None:
            self.agent.close()

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.warning("worker %s: signal %d: draining for %.1f s", self.name, signum, self.args.drain_s)
        self.loop.drain(self.args.drain_s)


def run_worker(args: argparse.Namespace) -> int:
    """Run a worker from parsed :func:`add_worker_arguments` options; returns the process exit code."""
    from ..tuning import keep_freed_memory
    from .worker_tp import join_group, spawn_followers, stop_followers

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not keep_freed_memory():
        logger.info("kvxfer worker: no glibc mallopt here; freed memory goes back to the system at once")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.tp < 1:
        print(f"kvxfer worker: --tp must be >= 1, got {args.tp}", file=sys.stderr)
        return EXIT_USAGE
    args.name = args.name or f"{args.role}-{os.getpid()}"
    followers: list[Any] = []
    store = None
    try:
        tp = control = None
        if args.tp > 1:
            init_method, followers, store = spawn_followers(args)
            tp, control = join_group(0, args.tp, init_method, args.device)
        worker = Worker(args, 0, tp, control)
    except (KvxferError, OSError, ImportError, RuntimeError) as error:
        print(f"kvxfer worker: {type(error).__name__}: {error}", file=sys.stderr)
        for process in followers:
            process.terminate()
        return EXIT_USAGE
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, worker.on_signal)
        signal.signal(signal.SIGINT, worker.on_signal)
    try:
        return worker.run()
    except ConfigError as error:  # --discovery found no router
        print(f"kvxfer worker: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        worker.close()
        stop_followers(followers)
        if store is not None:
            store.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -m kvxfer.serve.worker --role ... --model ... --router ...``."""
    parser = argparse.ArgumentParser(prog="kvxfer worker", description=__doc__.split("\n\n")[0])
    add_worker_arguments(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
