"""The pipe's kernel launcher: one KV copy plan between two spans of memory, on the pipe's CUDA stream (a GPU
cache) or on its host copy thread (a host cache)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import devices
from ..memory import MemoryKind, Region
from .steps import EventStep, FutureStep, Step

if TYPE_CHECKING:
    from ..kernels import KVCopyPlan
    from ..kernels.id_copy import IdCopyForm
    from ..kernels.id_launch import IdLaunch

#: (address, nbytes) of a span the kernel reads or writes
Span = tuple[int, int]


class Launcher:
    """Launches KV copies for one pipe: ``device`` >= 0 launches on a non-blocking stream of that GPU, -1 copies
    on one host thread. Both are created on first use."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._executor: ThreadPoolExecutor | None = None
        self._stream: Any = None  # cupy.cuda.Stream
        self._id_kernels: ModuleType | None = None  # kvxfer.kernels.id_launch, once a block-id launch is prepared

    def launch(self, plan: KVCopyPlan, source: Span, target: Span) -> Step:
        """Start copying by ``plan`` from ``source`` to ``target``; the returned step says when it is done."""
        from .. import kernels  # lazy: `import kvxfer` loads no kernel planner

        if self.device >= 0:
            from ..devices import cupy_module

            cupy = cupy_module()
            with cupy.cuda.Device(self.device):
                if self._stream is None:
                    self._stream = cupy.cuda.Stream(non_blocking=True)
                kernels.copy_kv_pointers(
                    source[0], source[1], target[0], target[1], plan, device=self.device, stream=self._stream
                )
                event = cupy.cuda.Event(block=False, disable_timing=True)
                event.record(self._stream)
            return EventStep(event)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvxfer-pipe")
        return FutureStep(self._executor.submit(_host_copy, plan, source, target))

    def prepare_ids(self, form: IdCopyForm, source: int, target: int) -> IdLaunch:
        """The block-id kernel's launch of ``form`` from the region at ``source`` to the one at ``target`` (device
        pointers; GPU launchers only). Compiles the kernel on first use."""
        from ..kernels import id_launch  # lazy: `import kvxfer` loads no kernel launcher

        self._id_kernels = id_launch  # launch_ids finds it here (an import per call costs ~1 us)
        with devices.cupy_module().cuda.Device(self.device):
            return id_launch.prepare(form, source, target, self.device)

    def launch_ids(
        self, launch: IdLaunch, src_ids: np.ndarray, dst_ids: np.ndarray, layers: np.ndarray, tokens: int
    ) -> Step:
        """Copy ``tokens`` tokens of ``layers`` (int64[k], host; the same ids on both sides) from blocks
        ``src_ids`` into ``dst_ids`` (int64, host, checked by the caller) with one block-id kernel launch on the
        pipe's stream; the step is done when the launch is (through the ids' ring slot: no event per call).
        ``launch`` comes from :meth:`prepare_ids`."""
        assert self._id_kernels is not None, "prepare_ids made the launch"
        cupy = devices.cupy_module()
        with cupy.cuda.Device(self.device):
            if self._stream is None:
                self._stream = cupy.cuda.Stream(non_blocking=True)
            completion = self._id_kernels.launch_ids(
                launch, src_ids, dst_ids, layers, layers, tokens, device=self.device, stream=self._stream
            )
        return EventStep(completion)

    def close(self) -> None:
        """Stop the host copy thread (after the copies it holds)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _host_copy(plan: KVCopyPlan, source: Span, target: Span) -> None:
    from .. import kernels  # lazy: `import kvxfer` loads no kernel planner

    source_view = Region.from_ptr(source[0], source[1], MemoryKind.HOST).as_numpy()
    target_view = Region.from_ptr(target[0], target[1], MemoryKind.HOST).as_numpy()
    kernels.copy_kv(source_view, target_view, plan)
