"""KVPipe over CUDA IPC: prefill ranks in their own processes (GPU ``source``), decode ranks here (GPU 0),
with TP re-tiling, block-size and layout changes; expected caches built on the host from one sequence."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import kvxfer
from kvxfer import KVPipe, TransferState
from tests.helpers import make_spec, write_sequence

TOKENS, HEADS, PARTS, SEED = 45, 8, 2, 5


def sequence() -> np.ndarray:
    from tests.helpers import DIM, LAYERS

    rng = np.random.default_rng(SEED)
    return rng.standard_normal((LAYERS, PARTS, TOKENS, HEADS, DIM)).astype(np.float32)


def prefill_rank(conn, spec, block_ids, device, backend):
    import cupy

    cupy.cuda.Device(device).use()
    host = np.zeros(spec.tensor_shape, np.float32)
    write_sequence(host, spec, block_ids, sequence())
    cache = cupy.asarray(host)
    with kvxfer.Agent(f"p{spec.tp_rank}", backends=[backend]) as agent:
        agent.register(cache, name="kv")
        conn.send(agent.metadata())
        conn.recv()  # until the test is done
    conn.send("bye")


@pytest.mark.parametrize(
    "p_tp, d_tp, p_block, d_block, p_layout, d_layout, strategy",
    [
        (1, 2, 16, 16, "HND", "HND", "auto"),
        (2, 1, 16, 32, "NHD", "HND", "auto"),
        (2, 4, 32, 16, "HND", "NHD", "auto"),
        (1, 1, 16, 16, "HND", "HND", "direct"),
        (2, 1, 16, 32, "HND", "NHD", "staged"),
    ],
)
@pytest.mark.parametrize(
    "source", [pytest.param(0, marks=pytest.mark.gpu), pytest.param(1, marks=pytest.mark.multi_gpu)]
)
def test_pull_over_cuda_ipc(source, p_tp, d_tp, p_block, d_block, p_layout, d_layout, strategy):
    import cupy

    p_specs = [make_spec(r, p_tp, HEADS, p_block, p_layout, PARTS) for r in range(p_tp)]
    d_specs = [make_spec(r, d_tp, HEADS, d_block, d_layout, PARTS) for r in range(d_tp)]
    rng = np.random.default_rng(1)
    p_ids = rng.permutation(p_specs[0].num_blocks)[: -(-TOKENS // p_block)]
    d_ids = rng.permutation(d_specs[0].num_blocks)[: -(-TOKENS // d_block)]
    context = multiprocessing.get_context("spawn")
    children = []
    for spec in p_specs:
        conn, child = context.Pipe()
        process = context.Process(target=prefill_rank, args=(child, spec, p_ids, source, "cuda_ipc"), daemon=True)
        process.start()
        children.append((conn, process))
    try:
        metas = [conn.recv() for conn, _ in children]
        for rank, spec in enumerate(d_specs):
            with kvxfer.Agent(f"d{rank}", backends=["cuda_ipc"]) as agent:
                with cupy.cuda.Device(0):
                    cache = cupy.full(int(np.prod(spec.tensor_shape)), -7.0, dtype=cupy.float32)
                agent.register(cache, name="kv")
                peers = [agent.connect(meta) for meta in metas]
                pipe = KVPipe(agent, spec, peers, p_specs, strategy=strategy)
                handle = pipe.pull(d_ids, p_ids, num_tokens=TOKENS, notify=b"done")
                handle.wait(timeout=60)
                assert handle.state is TransferState.DONE
                expected = np.full(spec.tensor_shape, -7.0, np.float32)
                write_sequence(expected, spec, d_ids, sequence())
                np.testing.assert_array_equal(cache.get().reshape(spec.tensor_shape), expected)
                if strategy == "auto":
                    assert {r.strategy for r in pipe.routes} == {"kernel"}
                pipe.close()
    finally:
        for conn, process in children:
            conn.send("exit")
            process.join(20)
