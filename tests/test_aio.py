import asyncio

import numpy as np
import pytest

from kvxfer import (
    Agent,
    Descs,
    KVCacheSpec,
    KVPipe,
    PipeHandle,
    TransferCancelledError,
    TransferState,
    TransferTimeoutError,
    aio,
)
from kvxfer.backends.mock import Fault
from tests.helpers import agent_pair


def test_await_transfer_and_notification():
    src_agent, dst_agent, src, dst, peer = agent_pair(1 << 16)

    async def main():
        plan = dst_agent.plan(
            Descs.from_ranges(dst_agent.regions[0], [0], 1 << 16),
            peer,
            Descs.from_ranges(peer.region("buf"), [0], 1 << 16),
        )
        handle = await aio.wait(dst_agent.read(plan, notify=b"n"))
        return handle, await aio.notifications(src_agent, timeout=2)

    with src_agent, dst_agent:
        handle, notes = asyncio.run(main())
        assert handle.state is TransferState.DONE and np.array_equal(src, dst)
        assert [n.payload for n in notes] == [b"n"]


def test_await_cancelled_transfer_raises():
    src_agent, dst_agent, _src, _dst, peer = agent_pair(1 << 16, backend="mock")
    dst_agent._backends[0].on_post = lambda *a: Fault.delay(1.0)

    async def main():
        plan = dst_agent.plan(
            Descs.from_ranges(dst_agent.regions[0], [0], 64), peer, Descs.from_ranges(peer.region("buf"), [0], 64)
        )
        handle = dst_agent.read(plan)
        asyncio.get_running_loop().call_later(0.05, handle.cancel)
        await aio.wait(handle)

    with src_agent, dst_agent:
        with pytest.raises(TransferCancelledError):
            asyncio.run(main())


def test_await_pipe_handle():
    spec = KVCacheSpec(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_dim=4, dtype="float32")
    source = np.random.default_rng(0).standard_normal(spec.tensor_shape).astype(np.float32)
    target = np.zeros(spec.tensor_shape, np.float32)
    with Agent("p", backends=["local"]) as prefill, Agent("d", backends=["local"]) as decode:
        prefill.register(source, name="kv")
        decode.register(target, name="kv")
        pipe = KVPipe(decode, spec, decode.connect(prefill.metadata()), spec)
        try:
            handle = asyncio.run(aio.wait(pipe.pull([0, 1, 2, 3], [0, 1, 2, 3], notify=b"n")))
            assert isinstance(handle, PipeHandle) and handle.state is TransferState.DONE
            assert np.array_equal(source, target)
            assert [n.payload for n in prefill.notifications(timeout=2)] == [b"n"]
            handle.release()
        finally:
            pipe.close()


def test_await_pipe_handle_times_out_like_its_wait():
    src_agent, dst_agent, _src, _dst, _peer = agent_pair(1 << 16, backend="mock")
    dst_agent._backends[0].on_post = lambda *a: Fault.delay(1.0)
    spec = KVCacheSpec(num_layers=1, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=4, dtype="float32")
    with src_agent, dst_agent:
        for agent in (src_agent, dst_agent):
            agent.register(np.zeros(spec.tensor_shape, np.float32), name="kv")
        pipe = KVPipe(dst_agent, spec, dst_agent.connect(src_agent.metadata()), spec, strategy="direct")
        try:
            handle = pipe.pull([0], [0])
            with pytest.raises(TransferTimeoutError) as caught:
                asyncio.run(aio.wait(handle, timeout=0.05))
            assert caught.value.handle is handle and handle.state is TransferState.PENDING
            handle.release()
        finally:
            pipe.close()
