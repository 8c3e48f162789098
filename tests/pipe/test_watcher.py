"""The pipe's watcher (kvxfer/pipe/watcher.py): requests finish though nobody waits; the thread stops at close."""

from __future__ import annotations

import time
from concurrent.futures import Future

from kvxfer import TransferState
from kvxfer.pipe.handle import PipeHandle
from kvxfer.pipe.steps import FutureStep
from kvxfer.pipe.watcher import Watcher


def test_watcher_finishes_handles_nobody_waits_for():
    future: Future[None] = Future()
    handle = PipeHandle([FutureStep(future)], time.monotonic() + 5, 5.0, "direct", 64)
    watcher = Watcher()
    watcher.watch(handle)
    future.set_result(None)
    give_up = time.monotonic() + 5
    while handle.state is TransferState.PENDING and time.monotonic() < give_up:
        time.sleep(0.005)
    assert handle.state is TransferState.DONE  # observed by the watcher, not by us
    watcher.close()
    assert not watcher._thread.is_alive()
