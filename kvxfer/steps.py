"""Steps of a pipe request and the one handle over all of them.

A KV pipe request is several steps: a backend transfer per rank pair, a kernel launch, a local re-tile after a
staged transfer. :class:`PipeHandle` looks like a :class:`~kvxfer.handle.TransferHandle` (poll / wait / cancel /
release, a deadline) and finishes only when every step has; its ``on_done`` work (checksums, notifications)
runs once, after all the data is in place.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from .errors import (ConfigError, DescriptorError, KvxferError, TransferCancelledError, TransferError, TransferTimeoutError,
                     UsageError)
from .handle import TransferHandle, TransferState
from .spec import as_index_array, selection_ids


class Step:
    """One piece of work; ``poll`` returns its state, ``error`` says why it failed."""

    error: KvxferError | None = None

    def poll(self) -> TransferState:
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop it; return once it touches no memory any more."""

    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for progress (returns early when the step may have finished)."""
        time.sleep(min(seconds, 1e-4))


class TransferStep(Step):
    """A backend transfer posted through the agent."""

    def __init__(self, handle: TransferHandle) -> None:
        self.handle = handle

    def poll(self) -> TransferState:
        state = self.handle.poll()
        self.error = self.handle.error
        return state

    def cancel(self) -> None:
        self.handle.cancel()

    def block(self, seconds: float) -> None:
        self.handle._backend.idle_wait(self.handle._request, seconds)


class EventStep(Step):
    """A kernel launched on a CUDA stream; done when the event recorded after it has fired."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def poll(self) -> TransferState:
        return TransferState.DONE if self.event.done else TransferState.PENDING

    def cancel(self) -> None:
        self.event.synchronize()

    def block(self, seconds: float) -> None:
        self.event.synchronize()  # a local kernel: it ends on its own, and soon


class FutureStep(Step):
    """Host work running on a thread."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def poll(self) -> TransferState:
        if not self.future.done():
            return TransferState.PENDING
        error = self.future.exception()
        if error is None:
            return TransferState.DONE
        self.error = error if isinstance(error, KvxferError) else TransferError(f"host copy failed: {error}")
        return TransferState.FAILED

    def cancel(self) -> None:
        if not self.future.cancel():
            self.future.exception()  # already running: wait for it to finish

    def block(self, seconds: float) -> None:
        from concurrent.futures import wait

        wait([self.future], timeout=seconds)


class ChainStep(Step):
    """``first``, then the step ``then()`` starts once ``first`` is done."""

    def __init__(self, first: Step, then: Callable[[], Step]) -> None:
        self.current, self._then, self._started = first, then, False

    def poll(self) -> TransferState:
        state = self.current.poll()
        if state is TransferState.DONE and not self._started:
            self._started = True
            try:
                self.current = self._then()
            except KvxferError as error:
                self.error = error
                return TransferState.FAILED
            state = self.current.poll()
        self.error = self.current.error or self.error
        return state

    def cancel(self) -> None:
        self._started = True  # nothing new starts after a cancel
        self.current.cancel()

    def block(self, seconds: float) -> None:
        self.current.block(seconds)


class PipeHandle:
    """The handle of one pipe request (pull or push). ``strategy`` names how each rank pair moves its bytes."""

    def __init__(self, steps: list[Step], deadline: float, default_timeout: float, strategy: str,
                 nbytes: int, on_done: Callable[[], None] | None = None, gate: Callable[[], bool] | None = None,
                 on_final: Callable[["PipeHandle"], None] | None = None) -> None:
        self._steps = list(steps)
        self._lock = threading.RLock()
        self._state = TransferState.PENDING
        self._error: KvxferError | None = None
        self._released = False
        self._on_done = on_done
        self._gate = gate  # more steps may still come (streamed layers) while it says False
        self._on_final = on_final
        self._last_states: list[TransferState] = []
        self._default_timeout = default_timeout
        self.deadline = deadline
        self.strategy = strategy
        self.nbytes = nbytes
        self.posted_at = time.monotonic()
        self.finished_at: float | None = None

    def add(self, steps: list[Step]) -> None:
        """Attach steps posted later (layers streamed as they become ready)."""
        with self._lock:
            if self._state.final:
                raise UsageError(f"this request is already {self._state.value}")
            self._steps.extend(steps)

    @property
    def state(self) -> TransferState:
        """The last observed state."""
        return self._state

    @property
    def error(self) -> KvxferError | None:
        """Why it failed or was cancelled."""
        return self._error

    def poll(self) -> TransferState:
        """Observe every step without blocking; enforces the deadline; runs ``on_done`` once at the end."""
        if self._released:
            raise UsageError("this handle was released")
        with self._lock:
            if self._state.final:
                return self._state
            states = [step.poll() for step in self._steps]
            self._last_states = states
            failed = next((s for s, state in zip(self._steps, states) if state.final and
                           state is not TransferState.DONE), None)
            if failed is not None:
                self._abort(TransferState.FAILED, failed.error or TransferError("a step of the transfer failed"))
            elif all(state is TransferState.DONE for state in states) and (self._gate is None or self._gate()):
                self._complete()
            elif time.monotonic() > self.deadline:
                self._abort(TransferState.FAILED, TransferTimeoutError(
                    f"KV transfer of {self.nbytes} bytes missed its deadline", self))
            return self._state

    def _complete(self) -> None:
        try:
            if self._on_done is not None:
                self._on_done()
        except KvxferError as error:
            self._finish(TransferState.FAILED, error)
            return
        self._finish(TransferState.DONE, None)

    def _abort(self, state: TransferState, error: KvxferError) -> None:
        for step in self._steps:
            try:
                step.cancel()
            except KvxferError:
                pass
        self._finish(state, error)

    def _finish(self, state: TransferState, error: KvxferError | None) -> None:
        self._state, self._error = state, error
        if error is not None and getattr(error, "handle", self) is None:
            error.handle = self
        self.finished_at = time.monotonic()
        if self._on_final is not None:
            self._on_final(self)

    def wait(self, timeout: float | None = None) -> "PipeHandle":
        """Block until final (default limit: the agent's transfer timeout); return self when DONE, else raise."""
        limit = self._default_timeout if timeout is None else timeout
        if limit < 0:
            raise ConfigError(f"timeout must be >= 0, got {timeout}")
        give_up = time.monotonic() + limit
        while not self.poll().final:
            now = time.monotonic()
            if now >= give_up:
                raise TransferTimeoutError(f"wait timed out after {limit} s; the transfer is still in flight", self)
            self.block(min(give_up - now, 5e-3))
        if self._state is TransferState.DONE:
            return self
        assert self._error is not None
        raise self._error

    def block(self, seconds: float) -> None:
        """Wait up to ``seconds`` for an unfinished step to progress (each step knows how to sleep until it does);
        :meth:`poll` afterwards says where the request stands."""
        with self._lock:
            busy = [step for step, state in zip(self._steps, self._last_states) if state is not TransferState.DONE]
        (busy[0] if busy else Step()).block(seconds)

    def cancel(self) -> None:
        """Cancel every step; no byte lands after this returns (on backends that guarantee it)."""
        with self._lock:
            if not self._state.final:
                self._abort(TransferState.CANCELLED, TransferCancelledError("KV transfer was cancelled", self))

    def release(self) -> None:
        """Cancel if still in flight, then forget the handle."""
        if not self._released:
            self.cancel()
            self._released = True

    @property
    def seconds(self) -> float | None:
        """Time from the first post to the moment the final state was observed."""
        return None if self.finished_at is None else self.finished_at - self.posted_at

    def __enter__(self) -> "PipeHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PipeHandle({self.strategy}, {self.nbytes} bytes, {self._state.value})"


class LayerStream(PipeHandle):
    """A push or pull whose layers move as they are marked ready (push: by the caller; pull: by the peers'
    announcements)."""

    def __init__(self, pipe: Any, request: Any, steps: list[Step], deadline: float, limit: float,
                 nbytes: int) -> None:
        self._pipe, self._request, self._pending_layers = pipe, request, set(int(x) for x in request.layers)
        super().__init__(steps, deadline, limit, pipe.strategy, nbytes, on_done=lambda: pipe._finish(request),
                         gate=lambda: not self._pending_layers, on_final=lambda h: pipe._final(request, h))

    def ready(self, layers: Any) -> None:
        """Layers (an id, ids or a range) are computed: start moving them."""
        chosen = as_index_array(selection_ids(layers, self._pipe.spec.num_layers), "layers", self._pipe.spec.num_layers)
        with self._lock:
            fresh = [int(x) for x in chosen if int(x) in self._pending_layers]
            if len(fresh) != len(chosen):
                raise DescriptorError(f"layers {sorted(set(chosen.tolist()) - set(fresh))} are not awaited by this "
                                      f"request")
            if self.poll().final:  # a failed or cancelled request posts nothing more
                raise UsageError(f"this request is already {self.state.value}")
            ids = np.asarray(fresh, dtype=np.int64)
            request = self._request
            steps = [s for route, tokens in zip(request.routes, request.tokens)
                     for s in self._pipe._work.steps(request.op, route, request.local, request.remote, tokens, ids)]
            self.add(steps)
            self._pending_layers.difference_update(fresh)

    def announced(self, layers: list[int]) -> None:
        """Every peer announced ``layers``: move those this pull awaits (from the delivering thread)."""
        with self._lock:
            wanted = [x for x in layers if x in self._pending_layers]
            if not wanted or self._released or self.poll().final:
                return
            try:
                self.ready(wanted)
            except KvxferError as error:  # the pull cannot go on: fail it now rather than at its deadline
                if not self._state.final:
                    self._abort(TransferState.FAILED, error)
