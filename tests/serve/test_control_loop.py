"""LoopRouterLink: the router's control socket served on an asyncio loop, against a real WorkerLink (zmq, tcp)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from kvxfer.errors import ConfigError
from kvxfer.serve import protocol as p
from kvxfer.serve.control import WorkerLink
from kvxfer.serve.control_loop import BATCH, LoopRouterLink

pytestmark = pytest.mark.timeout(60)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_round_trip_batches_unroutable_and_bad_frames() -> None:
    async def scenario() -> None:
        at_router: list[tuple[bytes, p.AnyMessage]] = []
        at_worker: list[p.AnyMessage] = []
        link = LoopRouterLink("tcp://127.0.0.1:0", lambda i, m: at_router.append((i, m)), asyncio.get_running_loop())
        worker = WorkerLink(link.address, "w0", at_worker.append)
        try:
            worker.send(p.Abort("first"))
            worker.send(p.TokensBatch((p.Tokens("a", (1,)), p.Tokens("b", (2,), "length"))))
            await _until(lambda: len(at_router) == 3)
            assert at_router[0] == (b"w0", p.Abort("first"))
            assert [m.rid for _, m in at_router[1:]] == ["a", "b"]  # a batch arrives as its Tokens
            assert link.send(b"w0", p.Abort("a"))
            assert not link.send(b"nobody", p.Abort("b"))  # unroutable: counted, not raised
            await _until(lambda: at_worker == [p.Abort("a")])
            assert link.num_unsent == 1 and link.num_sent == 1
            worker._queue([b"\x93garbage"])  # a bad frame: dropped, the link keeps going
            worker.send(p.Abort("z"))
            await _until(lambda: at_router[-1] == (b"w0", p.Abort("z")))
            assert link.num_dropped == 1
            # more frames than one loop turn handles: all arrive, in order, and the loop stays responsive
            for i in range(BATCH * 3):
                worker.send(p.Abort(f"n{i}"))
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.get_running_loop().create_task(ticker())
            await _until(lambda: len(at_router) == 4 + BATCH * 3)
            task.cancel()
            assert [m.rid for _, m in at_router[4:]] == [f"n{i}" for i in range(BATCH * 3)]  # type: ignore[union-attr]
            assert ticks > 0
        finally:
            worker.close()
            link.close()
        assert not link.send(b"w0", p.Abort("late"))  # closed: refused and counted
        link.close()  # twice is fine

    asyncio.run(scenario())


def test_a_taken_address_is_a_config_error() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with LoopRouterLink("tcp://127.0.0.1:0", lambda i, m: None, loop) as first:
            with pytest.raises(ConfigError, match="cannot bind"):
                LoopRouterLink(first.address, lambda i, m: None, loop)

    asyncio.run(scenario())
