"""`kvxfer-bench kv`: one model-shaped request through KVPipe, prefill TP -> decode TP, beside the same backend
moving one contiguous buffer of the same size in the same run (the ceiling).

Prefill ranks run in their own processes (GPU ``--p-gpu`` or host memory); decode ranks are agents of this
process (GPU ``--d-gpu``). With ``--backend local`` every agent lives in this process (host memory).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..agent import Agent
from ..descs import Descs
from ..errors import ConfigError
from ..spec import KVCacheSpec

MODELS = {"llama-3.1-8b": (32, 8, 128), "llama-3.1-70b": (80, 8, 128), "qwen3-32b": (64, 8, 128)}


@dataclass(frozen=True)
class Setup:
    """What one run moves: model dims, tokens, block sizes, layouts, TP sizes, where memory lives."""

    model: str = "llama-3.1-8b"
    tokens: int = 4096
    block_size: int = 16
    d_block_size: int | None = None
    layout: str = "HND"
    d_layout: str | None = None
    p_tp: int = 1
    d_tp: int = 1
    backend: str = "cuda_ipc"
    p_gpu: int = 0
    d_gpu: int = 1
    only_rank: int | None = None
    dims: tuple[int, int, int] | None = None

    def spec(self, side: str, rank: int) -> KVCacheSpec:
        layers, heads, dim = self.dims or MODELS.get(self.model, (0, 0, 0))
        if not layers:
            raise ConfigError(f"unknown model {self.model!r}; known: {sorted(MODELS)} (or give --dims L,H,D)")
        tp = self.p_tp if side == "p" else self.d_tp
        block = self.block_size if side == "p" else (self.d_block_size or self.block_size)
        layout = self.layout if side == "p" else (self.d_layout or self.layout)
        blocks = 2 * -(-self.tokens // block)
        return KVCacheSpec(num_layers=layers, num_blocks=blocks, block_size=block, num_kv_heads=max(heads // tp, 1),
                           head_dim=dim, dtype="bfloat16", layout=layout, tp_rank=rank, tp_size=tp,
                           total_kv_heads=heads, model=self.model)

    @property
    def on_gpu(self) -> bool:
        return self.backend != "local" and self.backend != "ucx-host"


def _allocate(spec: KVCacheSpec, device: int | None, fill: bool) -> Any:
    if device is None:
        data = np.frombuffer(np.random.default_rng(0).bytes(spec.nbytes), np.uint8) if fill else None
        return data.copy() if fill else np.ones(spec.nbytes, np.uint8)
    import cupy

    with cupy.cuda.Device(device):
        if fill:
            return cupy.random.default_rng(0).integers(1, 256, spec.nbytes, dtype=cupy.uint8)
        return cupy.ones(spec.nbytes, dtype=cupy.uint8)


def _prefill_rank(conn: Any, setup: Setup, rank: int) -> None:
    backend = "ucx" if setup.backend == "ucx-host" else setup.backend
    with Agent(f"prefill-{rank}", backends=[backend]) as agent:
        agent.register(_allocate(setup.spec("p", rank), setup.p_gpu if setup.on_gpu else None, True), name="kv")
        conn.send(agent.metadata())
        conn.recv()


def run(setup: Setup, repeats: int = 20) -> list[dict[str, Any]]:
    """Median ms and GB/s of the request and of the contiguous ceiling, per decode-rank set."""
    from ..pipe import KVPipe

    backend = "ucx" if setup.backend == "ucx-host" else setup.backend
    in_process = setup.backend == "local"
    context, children, metas, local_prefill = multiprocessing.get_context("spawn"), [], [], []
    for rank in range(setup.p_tp):
        if in_process:
            agent = Agent(f"prefill-{rank}", backends=["local"])
            agent.register(_allocate(setup.spec("p", rank), None, True), name="kv")
            local_prefill.append(agent)
            metas.append(agent.metadata())
            continue
        conn, child = context.Pipe()
        process = context.Process(target=_prefill_rank, args=(child, setup, rank), daemon=True)
        process.start()
        children.append((conn, process))
    metas += [conn.recv() for conn, _ in children]
    ranks = range(setup.d_tp) if setup.only_rank is None else [setup.only_rank]
    decode, pipes = [], []
    rng = np.random.default_rng(1)
    p_spec0, d_spec0 = setup.spec("p", 0), setup.spec("d", 0)
    p_ids = rng.permutation(p_spec0.num_blocks)[:-(-setup.tokens // p_spec0.block_size)]
    d_ids = rng.permutation(d_spec0.num_blocks)[:-(-setup.tokens // d_spec0.block_size)]
    try:
        for rank in ranks:
            agent = Agent(f"decode-{rank}", backends=[backend])
            decode.append(agent)
            agent.register(_allocate(setup.spec("d", rank), setup.d_gpu if setup.on_gpu else None, False), name="kv")
            peers = [agent.connect(meta) for meta in metas]
            pipes.append(KVPipe(agent, setup.spec("d", rank), peers, [setup.spec("p", r) for r in range(setup.p_tp)]))
        seconds = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            handles = [pipe.pull(d_ids, p_ids, num_tokens=setup.tokens) for pipe in pipes]
            for handle in handles:
                handle.wait(timeout=120)
            seconds.append(time.perf_counter() - start)
        nbytes = sum(handle.nbytes for handle in handles)
        request = float(np.median(seconds[2:]))
        ceiling = _contiguous(decode[0], decode[0].peer("prefill-0"), nbytes, repeats)
        return [{"model": setup.model, "tokens": setup.tokens, "p_tp": setup.p_tp, "d_tp": setup.d_tp,
                 "ranks": len(pipes), "blocks": f"{p_spec0.block_size}->{d_spec0.block_size}",
                 "layout": f"{p_spec0.layout.value}->{d_spec0.layout.value}", "strategy": pipes[0].strategy,
                 "MiB": nbytes / 2**20, "ms": request * 1e3, "GB/s": nbytes / request / 1e9,
                 "ceiling_GB/s": nbytes / ceiling / 1e9, "ratio": ceiling / request}]
    finally:
        for pipe in pipes:
            pipe.close()
        for agent in decode + local_prefill:
            agent.close()
        for conn, process in children:
            conn.send("exit")
            process.join(30)


def _contiguous(agent: Agent, peer: Any, nbytes: int, repeats: int) -> float:
    """Median seconds for the same backend to pull one contiguous span of ``nbytes`` from the peer."""
    local, remote = agent.regions[0], peer.region("kv")
    size = min(nbytes, local.nbytes, remote.nbytes)
    plan = agent.plan(Descs.from_ranges(local, [0], size), peer, Descs.from_ranges(remote, [0], size))
    seconds = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        agent.read(plan).wait(timeout=120)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds[2:])) * nbytes / size
