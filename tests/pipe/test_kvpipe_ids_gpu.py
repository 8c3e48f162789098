"""KVPipe pulls over CUDA IPC with fragment addresses derived on the GPU from block ids (``gpu_addressing``)
against the same pulls through host-built tables (``gpu_addressing = False``): prefill ranks in their own
processes, decode ranks here; the same bytes land, and the expected caches are built on the host."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import kvxfer
from kvxfer import KVPipe, TransferState
from tests.helpers import make_spec, write_sequence
from tests.pipe.test_kvpipe_gpu import HEADS, PARTS, TOKENS, prefill_rank, sequence

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


@pytest.mark.parametrize(
    "p_tp, d_tp, p_block, d_block, p_layout, d_layout, tokens",
    [
        (1, 1, 16, 16, "HND", "HND", TOKENS),
        (1, 1, 16, 16, "HND", "HND", 32),  # whole blocks only: every box a full run
        (1, 2, 16, 16, "HND", "HND", TOKENS),
        (2, 1, 16, 32, "NHD", "HND", TOKENS),
        (2, 4, 32, 16, "HND", "NHD", TOKENS),
    ],
)
def test_pull_by_block_ids_equals_pull_by_tables(p_tp, d_tp, p_block, d_block, p_layout, d_layout, tokens):
    import cupy

    p_specs = [make_spec(r, p_tp, HEADS, p_block, p_layout, PARTS) for r in range(p_tp)]
    d_specs = [make_spec(r, d_tp, HEADS, d_block, d_layout, PARTS) for r in range(d_tp)]
    rng = np.random.default_rng(2)
    p_ids = rng.permutation(p_specs[0].num_blocks)[: -(-TOKENS // p_block)]
    d_ids = rng.permutation(d_specs[0].num_blocks)[: -(-tokens // d_block)]
    context = multiprocessing.get_context("spawn")
    children = []
    for spec in p_specs:
        conn, child = context.Pipe()
        process = context.Process(target=prefill_rank, args=(child, spec, p_ids, 0, "cuda_ipc"), daemon=True)
        process.start()
        children.append((conn, process))
    try:
        metas = [conn.recv() for conn, _ in children]
        for rank, spec in enumerate(d_specs):
            landed = {}
            for addressing in (True, False):
                with kvxfer.Agent(f"d{rank}{'ids' if addressing else 'tables'}", backends=["cuda_ipc"]) as agent:
                    with cupy.cuda.Device(0):
                        cache = cupy.full(int(np.prod(spec.tensor_shape)), -7.0, dtype=cupy.float32)
                    agent.register(cache, name="kv")
                    peers = [agent.connect(meta) for meta in metas]
                    pipe = KVPipe(agent, spec, peers, p_specs)
                    pipe.gpu_addressing = addressing
                    for _ in range(2):  # a second pull reuses the route's launch and a ring slot
                        handle = pipe.pull(d_ids, p_ids[: -(-tokens // p_block)], num_tokens=tokens)
                        handle.wait(timeout=60)
                        assert handle.state is TransferState.DONE
                    launches = list(pipe._strategies._id_launches.values())
                    assert {r.strategy.value for r in pipe.routes} == {"kernel"}
                    if addressing:  # every route launched by block ids
                        assert len(launches) == len(pipe.routes) and None not in launches
                    else:
                        assert not launches
                    landed[addressing] = cache.get().reshape(spec.tensor_shape)
                    pipe.close()
            expected = np.full(spec.tensor_shape, -7.0, np.float32)
            write_sequence(expected, spec, d_ids, sequence()[:, :, :tokens])
            np.testing.assert_array_equal(landed[True], expected)
            np.testing.assert_array_equal(landed[False], expected)
    finally:
        for conn, process in children:
            conn.send("exit")
            process.join(20)
