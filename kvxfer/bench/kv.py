"""`kvxfer-bench kv`: one model-shaped request through KVPipe, prefill TP -> decode TP, beside the same backend
moving one contiguous buffer of the same size in the same run (the ceiling).

Prefill ranks run in their own processes (GPU ``--p-gpu`` or host memory); decode ranks are agents of this
process (GPU ``--d-gpu``) that post their pulls one after another, then wait for all. With ``--backend local``
every agent lives in this process (host memory). ``--decode-processes`` puts each decode rank in a process of its
own, starting together; all decode ranks share ``--d-gpu``, so on one GPU their kernels then time-slice between
contexts (measured on H200: 0.51 of the ceiling for p1 -> d2 against 0.78 in one process), which a real
deployment, one GPU per decode rank, does not pay.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..agent import Agent
from ..descs import Descs
from ..errors import ConfigError, PeerDisconnectedError
from ..spec import KVCacheSpec, KVLayout

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
        return KVCacheSpec(
            num_layers=layers,
            num_blocks=blocks,
            block_size=block,
            num_kv_heads=max(heads // tp, 1),
            head_dim=dim,
            dtype="bfloat16",
            layout=KVLayout.parse(layout),
            tp_rank=rank,
            tp_size=tp,
            total_kv_heads=heads,
            model=self.model,
        )

    @property
    def on_gpu(self) -> bool:
        return self.backend != "local" and self.backend != "ucx-host"


def _allocate(spec: KVCacheSpec, device: int | None, fill: bool) -> Any:
    if device is None:
        if not fill:
            return np.ones(spec.nbytes, np.uint8)
        return np.frombuffer(np.random.default_rng(0).bytes(spec.nbytes), np.uint8).copy()
    import cupy

    with cupy.cuda.Device(device):
        if fill:
            return cupy.random.default_rng(0).integers(1, 256, spec.nbytes, dtype=cupy.uint8)
        return cupy.ones(spec.nbytes, dtype=cupy.uint8)


def _start(context: Any, target: Any, args: tuple) -> tuple[Any, Any]:
    """A daemon process running ``target(child_end, *args)``: (our end of its pipe, the process). Our copy of the
    child's end is closed, so a process that dies makes ``recv`` raise instead of waiting forever."""
    conn, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return conn, process


def _receive(conn: Any, process: Any, name: str) -> Any:
    """The next message from ``process``; PeerDisconnectedError when it exited instead of answering."""
    try:
        return conn.recv()
    except EOFError:
        process.join(5)
        raise PeerDisconnectedError(
            f"{name} exited (code {process.exitcode}) before answering; its traceback is above", name
        ) from None


def _goodbye(conn: Any, message: Any) -> None:
    """Send ``message`` to a child that may already have exited."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError: it is gone already
        pass


def _prefill_rank(conn: Any, setup: Setup, rank: int) -> None:
    backend = "ucx" if setup.backend == "ucx-host" else setup.backend
    with Agent(f"prefill-{rank}", backends=[backend]) as agent:
        agent.register(_allocate(setup.spec("p", rank), setup.p_gpu if setup.on_gpu else None, True), name="kv")
        conn.send(agent.metadata())
        conn.recv()


class _Rank:
    """One decode rank: its agent, cache and pipe to every prefill rank."""

    def __init__(self, setup: Setup, rank: int, metas: list[bytes]) -> None:
        from ..pipe import KVPipe

        backend = "ucx" if setup.backend == "ucx-host" else setup.backend
        self.agent = Agent(f"decode-{rank}", backends=[backend])
        spec = setup.spec("d", rank)
        self.agent.register(_allocate(spec, setup.d_gpu if setup.on_gpu else None, False), name="kv")
        peers = [self.agent.connect(meta) for meta in metas]
        self.pipe = KVPipe(self.agent, spec, peers, [setup.spec("p", r) for r in range(setup.p_tp)])

    def pull(self, d_ids: np.ndarray, p_ids: np.ndarray, tokens: int) -> tuple[float, int]:
        """Pull one request; (seconds until pull() returned, bytes)."""
        start = time.perf_counter()
        handle = self.pipe.pull(d_ids, p_ids, num_tokens=tokens)
        posted = time.perf_counter() - start
        handle.wait(timeout=120)
        return posted, handle.nbytes

    def close(self) -> None:
        self.pipe.close()
        self.agent.close()


def _profiler() -> Any:
    import cProfile

    return cProfile.Profile()


def _profile_text(profiler: Any) -> str:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def _pull_all(ranks: list[_Rank], d_ids: np.ndarray, p_ids: np.ndarray, tokens: int) -> tuple[float, float, int]:
    """Every rank's pull posted, then all waited for: (seconds in all, longest post, bytes)."""
    start = time.perf_counter()
    handles, posts = [], []
    for rank in ranks:
        begin = time.perf_counter()
        handles.append(rank.pipe.pull(d_ids, p_ids, num_tokens=tokens))
        posts.append(time.perf_counter() - begin)
    for handle in handles:
        handle.wait(timeout=120)
    return time.perf_counter() - start, max(posts), sum(handle.nbytes for handle in handles)


def _decode_rank(conn: Any, setup: Setup, rank: int, metas: list[bytes], ids: tuple, profile: bool) -> None:
    """A decode rank in its own process: pull at each start time the parent sends, report when it ended."""
    decode = _Rank(setup, rank, metas)
    profiler = _profiler() if profile else None
    try:
        while True:
            command = conn.recv()
            if command[0] == "exit":
                break
            if command[0] == "ceiling":
                conn.send(_contiguous(decode.agent, decode.agent.peer("prefill-0"), command[1], command[2]))
                continue
            while time.monotonic() < command[1]:  # start together with the other ranks
                pass
            if profiler is not None:
                profiler.enable()
            posted, nbytes = decode.pull(ids[1], ids[0], setup.tokens)
            if profiler is not None:
                profiler.disable()
            conn.send((time.monotonic(), posted, nbytes, decode.pipe.strategy))
        if profiler is not None:
            conn.send(_profile_text(profiler))
    finally:
        decode.close()


def run(setup: Setup, repeats: int = 20, profile: bool = False, decode_processes: bool = False) -> list[dict[str, Any]]:
    """Median ms and GB/s of one request (all decode ranks) and of the contiguous ceiling. With ``profile``, decode
    rank 0 (all ranks, in one process) prints where its host time went; see the module docstring for where ranks
    run."""
    in_process = setup.backend == "local"
    decode_here = in_process or not decode_processes
    context, prefill, metas, local_prefill = multiprocessing.get_context("spawn"), [], [], []
    p_spec0, d_spec0 = setup.spec("p", 0), setup.spec("d", 0)  # a bad setup fails here, not in a child
    for rank in range(setup.p_tp):
        if in_process:
            agent = Agent(f"prefill-{rank}", backends=["local"])
            agent.register(_allocate(setup.spec("p", rank), None, True), name="kv")
            local_prefill.append(agent)
            metas.append(agent.metadata())
            continue
        prefill.append(_start(context, _prefill_rank, (setup, rank)))
    metas += [_receive(conn, process, f"prefill-{rank}") for rank, (conn, process) in enumerate(prefill)]
    rng = np.random.default_rng(1)
    ids = (
        rng.permutation(p_spec0.num_blocks)[: -(-setup.tokens // p_spec0.block_size)],
        rng.permutation(d_spec0.num_blocks)[: -(-setup.tokens // d_spec0.block_size)],
    )
    ranks = list(range(setup.d_tp)) if setup.only_rank is None else [setup.only_rank]
    decode: list[Any] = []
    try:
        if decode_here:
            local = [_Rank(setup, rank, metas) for rank in ranks]
            decode = local
            profiler = _profiler() if profile else None
            samples = []
            for _ in range(repeats + 2):
                if profiler is not None:
                    profiler.enable()
                samples.append(_pull_all(local, ids[1], ids[0], setup.tokens))
                if profiler is not None:
                    profiler.disable()
            strategy = local[0].pipe.strategy
            nbytes = samples[-1][2]
            ceiling = _contiguous(local[0].agent, local[0].agent.peer("prefill-0"), nbytes, repeats)
            report = _profile_text(profiler) if profiler is not None else ""
        else:
            for rank in ranks:
                decode.append(_start(context, _decode_rank, (setup, rank, metas, ids, profile and rank == ranks[0])))
            samples = []
            for _ in range(repeats + 2):
                start = time.monotonic() + 0.01
                for conn, _ in decode:
                    conn.send(("go", start))
                answers = [
                    _receive(conn, process, f"decode-{rank}")
                    for rank, (conn, process) in zip(ranks, decode, strict=True)
                ]
                samples.append(
                    (max(a[0] for a in answers) - start, max(a[1] for a in answers), sum(a[2] for a in answers))
                )
            strategy, nbytes = answers[0][3], samples[-1][2]
            decode[0][0].send(("ceiling", nbytes, repeats))
            ceiling = decode[0][0].recv()
            for conn, _ in decode:
                _goodbye(conn, ("exit",))
            report = decode[0][0].recv() if profile else ""
        request = float(np.median([s[0] for s in samples[2:]]))
        if report:
            print(report)
        return [
            {
                "model": setup.model,
                "tokens": setup.tokens,
                "p_tp": setup.p_tp,
                "d_tp": setup.d_tp,
                "ranks": len(ranks),
                "decode": "processes" if not decode_here else "one process",
                "blocks": f"{p_spec0.block_size}->{d_spec0.block_size}",
                "layout": f"{p_spec0.layout.value}->{d_spec0.layout.value}",
                "strategy": strategy,
                "fragment_B": _piece(setup),
                "fragments": nbytes // _piece(setup),
                "MiB": nbytes / 2**20,
                "ms": request * 1e3,
                "post_ms": float(np.median([s[1] for s in samples[2:]])) * 1e3,
                "GB/s": nbytes / request / 1e9,
                "ceiling_GB/s": nbytes / ceiling / 1e9,
                "ratio": ceiling / request,
            }
        ]
    finally:
        for item in decode:
            if isinstance(item, _Rank):
                item.close()
            else:
                _goodbye(item[0], ("exit",))  # a rank left waiting after another one failed
                item[1].join(30)
        for agent in local_prefill:
            agent.close()
        for conn, process in prefill:
            _goodbye(conn, "exit")
            process.join(30)


def _piece(setup: Setup) -> int:
    """Bytes of one contiguous piece of the prefill cache a decode rank reads (the request's fragment size)."""
    p_spec, d_spec = setup.spec("p", 0), setup.spec("d", 0)
    heads = min(p_spec.num_kv_heads, d_spec.num_kv_heads)
    return p_spec.fragments((0, heads))[1]


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
