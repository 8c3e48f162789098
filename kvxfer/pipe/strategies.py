"""The steps each strategy posts for one route of a request (see :mod:`kvxfer.pipe.route` for the strategies)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..backends.base import Op
from ..descs import Descs
from ..environment import read as read_env
from ..errors import ConfigError, KvxferError
from ..handle import TransferState
from ..memory import Region, RemoteRegion
from ..peer import Peer
from ..spec import KVCacheSpec
from .launcher import Launcher
from .route import Route, Strategy
from .staging import StagingPool, staging_spec_for
from .steps import Step, TransferStep

if TYPE_CHECKING:
    from ..agent import Agent
    from ..kernels.id_launch import IdLaunch


class StagedStep(Step):
    """A staged route's work: ``first`` (a transfer or a gather), then the step ``then()`` starts once ``first``
    is done (a re-tile or a transfer); ``staging`` is the buffer between them, back to the pool when the
    request ends."""

    def __init__(self, first: Step, then: Callable[[], Step], staging: Region) -> None:
        self.current, self._then, self._started, self.staging = first, then, False, staging

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


class Strategies:
    """Builds the steps that move one route's share of a request between ``agent``'s cache ``region`` (laid out by
    ``spec``) and a peer's: kernel launches through ``launcher``, transfers through the agent, staging buffers
    from ``staging``."""

    def __init__(
        self, agent: Agent, region: Region, spec: KVCacheSpec, launcher: Launcher, staging: StagingPool
    ) -> None:
        self.agent, self.region, self.spec = agent, region, spec
        self.launcher, self.staging = launcher, staging
        #: kernel routes on a GPU derive fragment addresses on the GPU from block ids where the specs allow
        #: (False, the default until the block-id kernel has run on a GPU — it was written on a machine without
        #: one: every launch walks host-built tables, as before; KVXFER_PIPE_GPU_ADDRESSING=1 turns it on)
        self.gpu_addressing = read_env("KVXFER_PIPE_GPU_ADDRESSING", "0") == "1"
        self._id_launches: dict[tuple[int, Op], IdLaunch | None] = {}

    def steps(
        self, op: Op, route: Route, local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int, layers: np.ndarray
    ) -> list[Step]:
        """The steps that move ``tokens`` tokens of ``layers`` for one route (READ: pull, WRITE: push)."""
        if route.strategy is Strategy.KERNEL:
            return [self._kernel(op, route, local_ids, remote_ids, tokens, layers)]
        if route.strategy is Strategy.DIRECT:
            plan = self.agent.plan(*self._direct_descs(route, local_ids, remote_ids, tokens, layers))
            return [TransferStep(self.agent.read(plan) if op is Op.READ else self.agent.write(plan))]
        return [self._staged(op, route, local_ids, remote_ids, tokens, layers)]

    def _direct_descs(
        self, route: Route, local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int, layers: np.ndarray
    ) -> tuple[Descs, Peer, Descs]:
        """Whole blocks as fragments, and a partly filled last block row by row (so nothing past ``tokens``
        is written)."""
        heads, full = route.heads, tokens // self.spec.block_size
        sides: list[tuple[Region | RemoteRegion, KVCacheSpec, np.ndarray, tuple[int, int]]] = [
            (self.region, self.spec, local_ids, heads.local_heads),
            (route.region, route.spec, remote_ids, heads.remote_heads),
        ]
        descs = []
        for region, spec, ids, head_range in sides:
            parts = [Descs.from_blocks(region, spec, ids[:full], layers=layers, heads=head_range)] if full else []
            if tokens % spec.block_size:
                offsets, row = spec.row_offsets(
                    int(ids[full]), tokens % spec.block_size, layers=layers, heads=head_range
                )
                parts.append(Descs.from_ranges(region, offsets, row))
            descs.append(Descs.concat(parts))
        return descs[0], route.peer, descs[1]

    def _kernel(
        self, op: Op, route: Route, local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int, layers: np.ndarray
    ) -> Step:
        if self.gpu_addressing and self.launcher.device >= 0:
            launch = self._id_launch(op, route)
            if launch is not None and launch.fits(tokens, len(layers)):
                src_ids, dst_ids = (remote_ids, local_ids) if op is Op.READ else (local_ids, remote_ids)
                return self.launcher.launch_ids(launch, src_ids, dst_ids, layers, tokens)
        from .. import kernels  # lazy: `import kvxfer` loads no kernel planner

        heads, here = route.heads, (self.region.addr, self.region.nbytes)
        assert route.mapped is not None  # a kernel route maps the peer region (route.choose_route)
        there = (route.mapped, route.region.nbytes)
        if op is Op.READ:
            plan = kernels.plan_kv_copy(
                route.spec,
                self.spec,
                remote_ids,
                local_ids,
                num_tokens=tokens,
                src_layers=layers,
                src_heads=heads.remote_heads,
                dst_heads=heads.local_heads,
            )
            return self.launcher.launch(plan, there, here)
        plan = kernels.plan_kv_copy(
            self.spec,
            route.spec,
            local_ids,
            remote_ids,
            num_tokens=tokens,
            src_layers=layers,
            src_heads=heads.local_heads,
            dst_heads=heads.remote_heads,
        )
        return self.launcher.launch(plan, here, there)

    def _id_launch(self, op: Op, route: Route) -> IdLaunch | None:
        """The block-id kernel's launch for ``route`` in direction ``op`` (made once per route); None where the
        table path must plan it: specs the id kernel does not cover, a peer with fewer layers than this cache (the
        pipe checked layer ids against this cache only), or regions that overlap (the table path checks them)."""
        key = (id(route), op)
        if key in self._id_launches:
            return self._id_launches[key]
        from ..kernels.id_copy import id_copy_form  # lazy: `import kvxfer` loads no kernel planner

        assert route.mapped is not None  # a kernel route maps the peer region (route.choose_route)
        heads, here, there = route.heads, (self.region.addr, self.region.nbytes), (route.mapped, route.region.nbytes)
        if op is Op.READ:
            form = id_copy_form(route.spec, self.spec, heads.remote_heads, heads.local_heads)
            source, target = there, here
        else:
            form = id_copy_form(self.spec, route.spec, heads.local_heads, heads.remote_heads)
            source, target = here, there
        apart = source[0] + source[1] <= target[0] or target[0] + target[1] <= source[0]
        launch = None
        if form is not None and route.spec.num_layers >= self.spec.num_layers and apart:
            launch = self.launcher.prepare_ids(form, source[0], target[0])
        self._id_launches[key] = launch
        return launch

    def _staged(
        self, op: Op, route: Route, local_ids: np.ndarray, remote_ids: np.ndarray, tokens: int, layers: np.ndarray
    ) -> Step:
        from .. import kernels  # lazy: `import kvxfer` loads no kernel planner

        heads = route.heads
        stage_spec = staging_spec_for(route.spec, heads.remote_heads, len(remote_ids), len(layers))
        remote = Descs.from_blocks(route.region, route.spec, remote_ids, layers=layers, heads=heads.remote_heads)
        piece = int(remote.nbytes[0])
        if len(remote) * piece != stage_spec.nbytes:
            raise ConfigError(
                f"cannot stage peer {route.peer.name!r}: its fragments ({len(remote)} x {piece} B) do "
                f"not tile a staging buffer of {stage_spec.nbytes} B"
            )
        staging = self.staging.acquire(stage_spec.nbytes)
        local = Descs.from_ranges(staging, np.arange(len(remote), dtype=np.int64) * piece, piece)
        plan = self.agent.plan(local, route.peer, remote)
        stage_ids, stage_layers = np.arange(len(remote_ids)), np.arange(len(layers))
        stage_heads = (0, heads.num_heads)
        here, buffer = (self.region.addr, self.region.nbytes), (staging.addr, staging.nbytes)
        if op is Op.READ:
            retile = kernels.plan_kv_copy(
                stage_spec,
                self.spec,
                stage_ids,
                local_ids,
                num_tokens=tokens,
                src_layers=stage_layers,
                dst_layers=layers,
                src_heads=stage_heads,
                dst_heads=heads.local_heads,
            )
            return StagedStep(
                TransferStep(self.agent.read(plan)), lambda: self.launcher.launch(retile, buffer, here), staging
            )
        gather = kernels.plan_kv_copy(
            self.spec,
            stage_spec,
            local_ids,
            stage_ids,
            num_tokens=tokens,
            src_layers=layers,
            dst_layers=stage_layers,
            src_heads=heads.local_heads,
            dst_heads=stage_heads,
        )
        return StagedStep(
            self.launcher.launch(gather, here, buffer), lambda: TransferStep(self.agent.write(plan)), staging
        )
