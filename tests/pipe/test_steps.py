"""Steps and the pipe handle over them (kvxfer/pipe/steps.py, strategies.StagedStep, handle.py)."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

import kvxfer
from kvxfer import TransferError, TransferState
from kvxfer.pipe.handle import PipeHandle
from kvxfer.pipe.steps import FutureStep, Step
from kvxfer.pipe.strategies import StagedStep


def finished(error: BaseException | None = None) -> FutureStep:
    future: Future[None] = Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return FutureStep(future)


def test_future_step_states_and_error_conversion():
    assert finished().poll() is TransferState.DONE
    step = finished(OSError("disk"))
    assert step.poll() is TransferState.FAILED
    assert isinstance(step.error, TransferError) and "disk" in str(step.error)
    pending = FutureStep(Future())
    assert pending.poll() is TransferState.PENDING
    pending.cancel()
    assert pending.future.cancelled()


def test_staged_step_starts_its_second_half_once_the_first_is_done():
    started = []
    first: Future[None] = Future()
    step = StagedStep(FutureStep(first), lambda: started.append(1) or finished(), staging=None)
    assert step.poll() is TransferState.PENDING and not started
    first.set_result(None)
    assert step.poll() is TransferState.DONE and started == [1]
    assert step.poll() is TransferState.DONE and started == [1]  # once


def test_staged_step_fails_when_its_second_half_cannot_start():
    def refuse() -> Step:
        raise kvxfer.ConfigError("no kernel")

    step = StagedStep(finished(), refuse, staging=None)
    assert step.poll() is TransferState.FAILED and "no kernel" in str(step.error)


def test_cancelled_staged_step_never_starts_its_second_half():
    started = []
    first: Future[None] = Future()
    step = StagedStep(FutureStep(first), lambda: started.append(1) or finished(), staging=None)
    step.cancel()
    assert first.cancelled() and not started


def test_pipe_handle_protocol_and_deadline():
    pending = FutureStep(Future())
    handle = PipeHandle([finished(), pending], time.monotonic() + 0.05, 1.0, "direct", 64)
    assert isinstance(handle, kvxfer.Handle) and handle.default_timeout == 1.0
    with pytest.raises(kvxfer.TransferTimeoutError, match="deadline"):
        handle.wait()
    assert handle.state is TransferState.FAILED and handle.seconds is not None
    with PipeHandle([finished()], time.monotonic() + 5, 1.0, "direct", 64) as done:
        assert done.wait() is done and done.result() is done
    assert done.released
    with pytest.raises(kvxfer.UsageError):
        done.poll()
