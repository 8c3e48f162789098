"""`kvxfer serve` and `kvxfer router`: the router (uvicorn, in this process) and, for serve, its worker processes.

``kvxfer serve`` binds the HTTP socket and the control socket, starts ``--prefill`` + ``--decode`` + ``--agg``
worker subprocesses (CPU by default; worker i on ``cuda:(i mod n)`` when n GPUs are present), waits until all of
them registered, then prints one ``kvxfer serve: ready ...`` line. SIGINT / SIGTERM drain: new requests get 503,
requests in flight finish (up to ``--drain-timeout``), workers get ``shutdown`` and are reaped (SIGTERM, then
SIGKILL, if they linger); exit status 0. Workers also die with this process (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from ..errors import ConfigError
from .api import ServedModel, create_app
from .policy_config import PolicyConfig
from .router import Router

logger = logging.getLogger("kvxfer.serve")
READY_TIMEOUT_S = 600.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the launcher drains first, then stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class WorkerProcess:
    """One worker subprocess and the arguments it was started with."""

    name: str
    role: str
    device: str
    process: subprocess.Popen[bytes]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux / no glibc: workers still exit on losing the router (their heartbeat)
        pass


def devices(count: int, requested: str | None, tp: int = 1) -> list[str]:
    """The device of each of ``count`` workers: ``requested`` for all, else with n GPUs worker i on cuda:(i x tp mod
    n) (a TP worker's rank r uses the next devices: cuda:K+r), else cpu."""
    if requested:
        return [requested] * count
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    return [f"cuda:{(i * tp) % gpus}" if gpus else "cpu" for i in range(count)]


def cpu_threads(args: argparse.Namespace, devices_: list[str]) -> int | None:
    """torch threads per CPU worker: ``--threads``, else the cores shared among the CPU workers (spinning threads
    of several workers on the same cores slow everyone down)."""
    if getattr(args, "threads", None):
        return int(args.threads)
    on_cpu = sum(device == "cpu" for device in devices_) * max(getattr(args, "tp", None) or 1, 1)
    return max(1, (os.cpu_count() or 1) // on_cpu) if on_cpu else None


def start_workers(args: argparse.Namespace, control: str) -> list[WorkerProcess]:
    """Start the worker subprocesses of ``kvxfer serve``."""
    roles = ["prefill"] * args.prefill + ["decode"] * args.decode + ["agg"] * args.agg
    extra: list[str] = []
    for flag in ("dtype", "num_blocks", "max_batch", "tp", "discovery"):
        value = getattr(args, flag, None)
        if value is not None:
            extra += [f"--{flag.replace('_', '-')}", str(value)]
    if getattr(args, "random_weights", False):
        extra.append("--random-weights")
    placed = devices(len(roles), args.device, getattr(args, "tp", None) or 1)
    threads = cpu_threads(args, placed)
    workers, counters = [], {"prefill": 0, "decode": 0, "agg": 0}
    for role, device in zip(roles, placed, strict=True):
        name = f"{role}-{counters[role]}"
        counters[role] += 1
        command = [
            sys.executable,
            "-m",
            "kvxfer.cli",
            "worker",
            "--role",
            role,
            "--model",
            args.model,
            "--device",
            device,
            "--router",
            control,
            "--name",
            name,
            *extra,
        ]
        if device == "cpu" and threads is not None:
            command += ["--threads", str(threads)]
        logger.info("serve: starting %s", " ".join(command))
        process = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        workers.append(WorkerProcess(name, role, device, process))
    return workers


def stop_workers(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Wait for the workers to exit (they were sent ``shutdown``), then SIGTERM, then SIGKILL stragglers."""
    for sig, wait_s in ((None, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [w for w in workers if w.process.poll() is None]
        if not alive:
            return
        for worker in alive:
            if sig is not None:
                logger.warning("serve: worker %s still running: sending %s", worker.name, sig.name)
                worker.process.send_signal(sig)
        give_up = time.monotonic() + wait_s
        for worker in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(give_up - time.monotonic(), 0.01))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket at host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no Nagle delay
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error}") from error
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def _wait_ready(router: Router, workers: list[WorkerProcess], stop: asyncio.Event, timeout_s: float) -> str:
    """'' when every worker registered; else why not (a worker exited, timeout, or a stop signal)."""
    names = {w.name for w in workers}
    give_up = time.monotonic() + timeout_s
    while not names <= set(router.registry.workers):
        dead = [w for w in workers if w.process.poll() is not None]
        if dead:
            return f"worker {dead[0].name} exited with status {dead[0].process.returncode} before registering"
        if stop.is_set():
            return "stopped before the workers registered"
        if time.monotonic() > give_up:
            missing = sorted(names - set(router.registry.workers))
            return f"workers {missing} did not register within {timeout_s:.0f} s"
        await asyncio.sleep(0.05)
    return ""


async def run(args: argparse.Namespace, spawn_workers: bool) -> int:
    """Serve until SIGINT / SIGTERM; returns the exit status."""
    from ..models import load_model

    bundle = load_model(args.model, random_weights=bool(getattr(args, "random_weights", False)))
    aliases = frozenset({args.model, str(bundle.directory)})
    served = ServedModel(bundle.name, bundle.tokenizer, bundle.config.max_position, aliases)
    config = PolicyConfig.from_file(args.policy) if args.policy else PolicyConfig()
    router = Router(
        bundle.name,
        args.control,
        config,
        request_timeout_s=args.request_timeout,
        aliases=aliases,
        vocab_size=bundle.tokenizer.vocab_size,
    )
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    control = await router.start()
    if getattr(args, "discovery", None):
        from .discovery_link import RouterDiscoveryLink

        router.discovery = RouterDiscoveryLink(
            args.discovery, control, bundle.name, router.worker_gone, loop=asyncio.get_running_loop()
        )
        router.discovery.start()
    server = _Server(
        uvicorn.Config(
            create_app(router, served),
            lifespan="off",
            access_log=False,
            log_level=args.log_level.lower(),
            timeout_graceful_shutdown=5,
        )
    )
    server_task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    workers = start_workers(args, control) if spawn_workers else []
    status = 0
    problem = await _wait_ready(router, workers, stop, args.ready_timeout)
    if problem:
        print(f"kvxfer serve: not ready: {problem}", file=sys.stderr, flush=True)
        status = 1
    else:
        roles = ", ".join(f"{w.name}@{w.device}" for w in workers) or "none yet (they connect to the control URL)"
        print(
            f"kvxfer {'serve' if spawn_workers else 'router'}: ready on http://{host}:{port} model={bundle.name} "
            f"control={control} workers: {roles}",
            flush=True,
        )
        stop_task = loop.create_task(stop.wait())
        await asyncio.wait({stop_task, server_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
    print("kvxfer serve: draining", file=sys.stderr, flush=True)
    await router.close(drain_s=args.drain_timeout)
    if router.discovery is not None:
        await asyncio.to_thread(router.discovery.close)
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await server_task
    await asyncio.to_thread(stop_workers, workers, 10.0)
    sock.close()
    return status


def main(args: argparse.Namespace, spawn_workers: bool = True) -> int:
    """Entry point of ``kvxfer serve`` (``spawn_workers``) and ``kvxfer router``."""
    try:
        return asyncio.run(run(args, spawn_workers))
    except ConfigError as error:
        print(f"kvxfer: {error}", file=sys.stderr)
        return 2
