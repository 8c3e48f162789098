import asyncio

import numpy as np
import pytest

from kvxfer import Descs, TransferCancelledError, TransferState, aio
from kvxfer.backends.mock import Fault
from tests.helpers import agent_pair


def test_await_transfer_and_notification():
    src_agent, dst_agent, src, dst, peer = agent_pair(1 << 16)

    async def main():
        plan = dst_agent.plan(Descs.from_ranges(dst_agent.regions[0], [0], 1 << 16), peer,
                              Descs.from_ranges(peer.region("buf"), [0], 1 << 16))
        handle = await aio.wait(dst_agent.read(plan, notify=b"n"))
        return handle, await aio.notifications(src_agent, timeout=2)

    with src_agent, dst_agent:
        handle, notes = asyncio.run(main())
        assert handle.state is TransferState.DONE and np.array_equal(src, dst)
        assert [n.payload for n in notes] == [b"n"]


def test_await_cancelled_transfer_raises():
    src_agent, dst_agent, src, dst, peer = agent_pair(1 << 16, backend="mock")
    dst_agent._backends[0].on_post = lambda *a: Fault.delay(1.0)

    async def main():
        plan = dst_agent.plan(Descs.from_ranges(dst_agent.regions[0], [0], 64), peer,
                              Descs.from_ranges(peer.region("buf"), [0], 64))
        handle = dst_agent.read(plan)
        asyncio.get_running_loop().call_later(0.05, handle.cancel)
        await aio.wait(handle)

    with src_agent, dst_agent:
        with pytest.raises(TransferCancelledError):
            asyncio.run(main())
