"""Prefill and decode engine ranks in spawned processes, driven over pipes (a test helper, not a test).

Each side is one torch.distributed world (gloo on CPU, NCCL on GPUs) of ``world`` processes; a TP size of 1 uses
rank 0 only and a TP size equal to the world uses every rank, so one set of processes serves several (p, d)
pairs. Each worker builds, per ``setup``, a tiny model, its engine, an agent and a connector, and answers
commands; KV moves between the processes through the agent backend (UCX on CPU, CUDA IPC on GPUs).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from pathlib import Path
from typing import Any

COMMAND_TIMEOUT = 120.0

SYSTEM = list(range(100, 140))  # a 40-token shared prefix
PROMPTS = [
    [*SYSTEM, 1, 2, 3],
    SYSTEM + [5] * 9,
    list(range(3, 30)),
    SYSTEM[:20] + [7] * 5,
    [9, 8, 7],
    SYSTEM + [7] * 30,
    list(range(60, 77)),
]
MAX_TOKENS = 8


def requests() -> list[Any]:
    from kvxfer.engine import Request, SamplingParams

    return [Request(f"r{i}", p, SamplingParams(max_tokens=MAX_TOKENS)) for i, p in enumerate(PROMPTS)]


def prefix_hit(index: int, block_size: int) -> int:
    """Prompt tokens of PROMPTS[index] a prefix cache holding the earlier prompts' full blocks serves (whole
    blocks, at least one token left to compute)."""
    prompt, best = PROMPTS[index], 0
    for earlier in PROMPTS[:index]:
        pairs = enumerate(zip(prompt, earlier, strict=False))  # prompts differ in length on purpose
        common = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(earlier)))
        shared = min(common, len(earlier) - len(earlier) % block_size, len(prompt) - 1)
        best = max(best, shared - shared % block_size)
    return best


def _setup(role: str, rank: int, world: int, device: str, options: dict[str, Any]) -> Any:
    import kvxfer
    from kvxfer.engine import (
        CacheConfig,
        DecodeConnector,
        DecodeEngine,
        Model,
        ModelConfig,
        PrefillConnector,
        PrefillEngine,
        TensorParallel,
    )

    size = options[f"{role}_tp"]
    if rank >= size:
        return None
    tp = TensorParallel(rank, size) if size > 1 else TensorParallel()
    config = ModelConfig.preset(options.get("preset", "tiny"), **options.get("model", {}))
    model = Model.random(config, seed=options.get("seed", 1), tp=tp, device=device)
    cache = CacheConfig(**options[f"{role}_cache"])
    agent = kvxfer.Agent(f"{role}{rank}-{options['name']}", backends=[options["backend"]])
    if role == "prefill":
        connector: Any = PrefillConnector(PrefillEngine(model, cache), agent, lease_ttl=options.get("lease_ttl", 10.0))
    else:
        connector = DecodeConnector(DecodeEngine(model, cache), agent, timeout=options.get("timeout", 60.0))
    return connector


def _prefill(connector: Any, group: str, requests: list[Any], push: list[bytes] | None) -> list[Any]:
    from kvxfer.engine import KVWanted
    from kvxfer.engine.messages import request_from_wire

    if push is not None:
        results = [connector.push(KVWanted.decode(wanted)) for wanted in push]
        return [(r.request_id, r.ok, r.error, r.first_token) for r in results]
    readies = [connector.prefill(request_from_wire(wire), group) for wire in requests]
    return [ready.encode() for ready in readies]


def _serve(connector: Any, readies: list[bytes], batch: int) -> dict[str, Any]:
    """Receive KVReady messages ``batch`` at a time, decode a step between batches, then run to the end."""
    admissions = []
    engine = connector.engine
    outputs = []
    for start in range(0, len(readies), batch):
        for ready in readies[start : start + batch]:
            connector.receive(ready)
        admissions.extend(connector.wait())
        outputs.extend(engine.step())
    outputs.extend(engine.run(timeout_s=60))
    return _decode_report(connector, admissions, outputs)


def _decode_report(connector: Any, admissions: list[Any], outputs: list[Any]) -> dict[str, Any]:
    engine = connector.engine
    return {
        "admissions": [
            (a.request_id, a.admitted, a.error, a.num_cached_tokens, a.start_token, a.num_transferred_tokens)
            for a in admissions
        ],
        "tokens": {o.request_id: list(o.output_token_ids) for o in outputs},
        "free": engine.num_free_blocks,
        "total": engine.spec.num_blocks,
        "pending": connector.pending_request_ids,
        "strategy": connector.pipe(connector.groups[0]).strategy,
    }


def _command(state: dict[str, Any], role: str, rank: int, world: int, device: str, command: str, args: tuple) -> Any:
    connector = state.get("connector")
    if command == "setup":
        state["connector"] = _setup(role, rank, world, device, args[0])
        return None if state["connector"] is None else state["connector"].info().encode()
    if connector is None:
        return None  # an idle rank (TP smaller than the world)
    if command == "connect":
        state["group"] = connector.connect(args[0])
        return state["group"]
    if command == "prefill":
        return _prefill(connector, state["group"], args[0], args[1] if len(args) > 1 else None)
    if command == "reserve_push":
        from kvxfer.engine.messages import request_from_wire

        return [connector.reserve_push(request_from_wire(wire), state["group"]).encode() for wire in args[0]]
    if command == "finish_push":
        admissions = connector.wait()
        return _decode_report(connector, admissions, connector.engine.run(timeout_s=60))
    if command == "serve":
        return _serve(connector, args[0], args[1])
    if command == "receive_late":  # a decode that got the message late: receive, wait, report
        admissions = connector.wait() if connector.receive(args[0]) is not None else []
        return _decode_report(connector, admissions, connector.engine.run(timeout_s=60))
    if command == "drain":
        ok = connector.drain(args[0])
        engine = connector.engine
        return {
            "drained": ok,
            "free": engine.num_free_blocks,
            "total": engine.spec.num_blocks,
            "computed": engine.runner.num_computed_tokens,
            "released": connector.num_released,
            "expired": connector.num_expired,
            "held": connector.held_request_ids,
        }
    if command == "teardown":
        connector.close()
        connector.agent.close()
        state.clear()
        return None
    raise ValueError(f"unknown command {command!r}")


def _worker(connection: Any, role: str, rank: int, world: int, store: str, device: int, environ: dict) -> None:
    os.environ.update(environ)
    import torch

    torch.set_num_threads(1)
    from kvxfer.engine import init_tensor_parallel

    where = "cpu"
    if device >= 0:
        torch.cuda.set_device(device)
        where = f"cuda:{device}"
    if world > 1:
        init_tensor_parallel(
            rank, world, f"file://{store}", backend="nccl" if device >= 0 else "gloo", timeout_s=COMMAND_TIMEOUT
        )
    connection.send(os.getpid())
    state: dict[str, Any] = {}
    while True:
        command, *args = connection.recv()
        if command == "quit":
            connection.send(None)
            return
        try:
            connection.send(_command(state, role, rank, world, where, command, tuple(args)))
        except BaseException as error:  # noqa: BLE001 report any failure (pytest outcomes too), keep serving: the test decides
            connection.send(RuntimeError(f"{role} rank {rank}: {error!r}\n{traceback.format_exc()}"))


class Side:
    """The ``world`` worker processes of one side ("prefill" or "decode")."""

    def __init__(
        self, role: str, world: int, tmp: Path, devices: list[int] | None = None, environ: dict[str, str] | None = None
    ) -> None:
        context = multiprocessing.get_context("spawn")
        # Host memory needs no UCX mmap hooks (faster start); NCCL must never use NVLink multicast (NVLS).
        env = {"UCX_MEM_MMAP_HOOK_MODE": "none"} if devices is None else {"NCCL_NVLS_ENABLE": "0"}
        env.update(environ or {})
        self.role, self.connections, self.processes = role, [], []
        for rank in range(world):
            mine, theirs = context.Pipe()
            device = -1 if devices is None else devices[rank % len(devices)]
            process = context.Process(
                target=_worker, args=(theirs, role, rank, world, str(tmp / f"{role}-store"), device, env), daemon=True
            )
            process.start()
            theirs.close()
            self.connections.append(mine)
            self.processes.append(process)
        self.pids = [self._receive(c, COMMAND_TIMEOUT) for c in self.connections]

    def call(self, *command: Any, ranks: list[int] | None = None, timeout: float = COMMAND_TIMEOUT) -> list[Any]:
        """Send ``command`` to every rank (or ``ranks``) at once, then collect the answers in rank order."""
        chosen = range(len(self.connections)) if ranks is None else ranks
        for rank in chosen:
            self.connections[rank].send(command)
        answers = [self._receive(self.connections[rank], timeout) for rank in chosen]
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers

    @staticmethod
    def _receive(connection: Any, timeout: float) -> Any:
        if not connection.poll(timeout):
            raise TimeoutError(f"a worker did not answer within {timeout} s")
        return connection.recv()

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pids[rank], sig)

    def close(self) -> None:
        for connection, process in zip(self.connections, self.processes, strict=True):
            if process.is_alive():
                try:
                    os.kill(process.pid, signal.SIGCONT)
                    connection.send(("quit",))
                    self._receive(connection, 10.0)
                except (OSError, EOFError, TimeoutError):
                    pass
        for process in self.processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
