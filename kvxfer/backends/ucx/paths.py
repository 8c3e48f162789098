"""Which data path a UCX transfer takes, and the request class that runs it (transfer.py, staged.py,
device_staged.py). docs/backends.md explains the choices and their measurements."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from ...devices import cuda_available
from ...errors import DescriptorError
from ..base import Op
from .config import UcxConfig
from .device_staged import DeviceStagedTransfer
from .link import Link
from .services import Services
from .staged import StagedTransfer
from .transfer import CmaTransfer, DirectTransfer, UcxRequest

if TYPE_CHECKING:
    from ...plan import TransferPlan

#: A staged transfer costs a round trip through the target (~0.3 ms here): worth it from ~100 fragments.
STAGE_MIN_FRAGMENTS = 128


class DataPath(str, Enum):
    """How a post moves its bytes."""

    CMA = "cma"  # same-host host memory: batched process_vm_readv/writev
    STAGED = "staged"  # packed into few messages the target checks (host), or through GPU slots (device)
    DIRECT = "direct"  # one UCP put/get per fragment, then an endpoint flush

    def __str__(self) -> str:
        return self.value


def choose(plan: TransferPlan, link: Link, config: UcxConfig, slot_nbytes: int) -> DataPath:
    """The path of ``plan`` to ``link``'s peer. A peer whose memory may not be reached one-sidedly
    (``link.one_sided_ok``) gets staged messages only, which it checks; DescriptorError when such a plan cannot be
    staged. ``slot_nbytes``: bytes per GPU staging slot."""
    if plan.on_device:
        if _stage_on_device(plan, config, slot_nbytes):
            return DataPath.STAGED
        if link.one_sided_ok:
            return DataPath.DIRECT
        reason = _device_stage_refusal(plan)
        if reason is None:
            return DataPath.STAGED
        raise DescriptorError(
            f"peer {link.name!r} accepts only target-checked (staged) transfers over its "
            f"transports, and this plan cannot be staged: {reason}"
        )
    if link.cma_ok:
        return DataPath.CMA
    if not link.one_sided_ok:
        if (plan.local.device >= 0).any() or (plan.remote.device >= 0).any():  # pragma: no cover (on_device)
            raise DescriptorError("mixed host/device plans need one-sided access")
        return DataPath.STAGED
    small = plan.nbytes < config.stage_below * len(plan)
    return DataPath.STAGED if small and len(plan) >= STAGE_MIN_FRAGMENTS else DataPath.DIRECT


def _device_stage_refusal(plan: TransferPlan) -> str | None:
    """Why ``plan`` (CUDA memory) cannot go through GPU staging slots at all; None if it can."""
    local, remote = plan.local, plan.remote
    if (local.device < 0).any() or (remote.device < 0).any():
        return "it mixes host and CUDA memory"
    if (local.device != local.device[0]).any():
        return "its local fragments are on several devices"
    if not cuda_available():
        return "CUDA is not available here"
    return None


def _stage_on_device(plan: TransferPlan, config: UcxConfig, slot_nbytes: int) -> bool:
    local, remote = plan.local, plan.remote
    if len(plan) < STAGE_MIN_FRAGMENTS or plan.nbytes >= config.stage_below * len(plan):
        return False
    if (local.device < 0).any() or (remote.device < 0).any() or (local.device != local.device[0]).any():
        return False
    return int(local.nbytes.max()) <= slot_nbytes and cuda_available()


def new_request(
    services: Services, link: Link, op: Op, plan: TransferPlan, notify: bytes | None, path: DataPath
) -> UcxRequest:
    """The request that moves ``plan`` along ``path`` (not started)."""
    if path is DataPath.CMA:
        return CmaTransfer(services, link, op, plan, notify)
    if path is DataPath.DIRECT:
        return DirectTransfer(services, link, op, plan, notify)
    if plan.on_device:
        return DeviceStagedTransfer(services, link, op, plan, notify)
    return StagedTransfer(services, link, op, plan, notify)
