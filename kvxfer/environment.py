"""Every ``KVXFER_*`` environment variable kvxfer reads, in one place (docs/env.md lists the same).

kvxfer never writes ``os.environ``.
"""

from __future__ import annotations

import os

from .errors import ConfigError

#: name -> what it does. Reading a name not listed here is a bug.
VARIABLES = {
    "KVXFER_HOST_ID": "Override the host identity peers compare to decide same-host paths (default: hostname + "
    "kernel boot id).",
    "KVXFER_BACKENDS": "Comma-separated backends an Agent creates when none are given (default: all available).",
    "KVXFER_LOG_LEVEL": "Log level of the 'kvxfer' logger set by the command-line tools (default WARNING).",
    "KVXFER_CACHE_DIR": "Cache of converted models (default ~/.cache/kvxfer).",
    "KVXFER_CUDA_IPC_EARLY_NOTIFY": "cuda_ipc: send a notification with the copy's launch, delivered by the peer "
    "once the copy's interprocess event completes (1, default), or after "
    "completion (0).",
    "KVXFER_CUDA_GRAPHS": "Reference engines: 1 replays decode steps as CUDA graphs per batch-size bucket on a GPU "
    "(default 0: eager; the graphs have not yet run on a GPU).",
    "KVXFER_PIPE_GPU_ADDRESSING": "KVPipe kernel routes: 1 derives fragment addresses on the GPU from block ids "
    "(default 0: host-built tables; the block-id kernel has not yet run on a GPU).",
    "KVXFER_UCX_LIB": "Path of a libucp.so to use instead of the libucx wheel's (e.g. a system UCX with verbs).",
    "KVXFER_UCX_ERROR_MODE": "UCX endpoint error handling: auto (none on one host, peer across hosts), peer, none.",
    "KVXFER_UCX_CMA": "Same-host host memory through batched process_vm_readv/writev: auto or off.",
    "KVXFER_UCX_CMA_INLINE": "Cross-memory bytes a UCX post copies on the posting thread; all of a transfer up to "
    "this size (8388608).",
    "KVXFER_UCX_CMA_THREADS": "Copy threads of the UCX cross-memory path; 0: one fewer than the cores, 1 to 2 (0).",
    "KVXFER_UCX_STAGE_BELOW": "On the UCX path, host fragments averaging fewer bytes than this are staged (32768).",
    "KVXFER_UCX_STAGE_CHUNK": "Bytes per staged UCX message (4194304).",
    "KVXFER_UCX_STAGE_INFLIGHT": "Staged UCX messages in flight per transfer (4).",
    "KVXFER_UCX_LIVENESS_INTERVAL": "Seconds between liveness checks of same-host UCX peers without a pidfd (0.2).",
    "KVXFER_UCX_ONE_SIDED": "Who may reach this agent's regions one-sidedly over UCX: same-uid (same-host peers of "
    "our uid, checked against our export table) or off (target-checked staged messages only; "
    "RDMA keys still allowed).",
}


def snapshot(prefix: str) -> dict[str, str]:
    """The set variables among :data:`VARIABLES` whose names start with ``prefix``."""
    return {name: value for name in VARIABLES if name.startswith(prefix) and (value := read(name)) is not None}


def read(name: str, default: str | None = None) -> str | None:
    """The value of ``name`` (one of :data:`VARIABLES`), or ``default`` when unset or empty."""
    if name not in VARIABLES:
        raise ConfigError(f"kvxfer reads no environment variable {name!r}; known: {sorted(VARIABLES)}")
    value = os.environ.get(name, "")
    return value if value else default


def host_id() -> str:
    """This host's identity: ``KVXFER_HOST_ID``, else hostname plus the kernel's boot id (so two containers with
    one hostname on different machines still differ)."""
    override = read("KVXFER_HOST_ID")
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            boot = file.read().strip()
    except OSError:
        boot = ""
    return f"{os.uname().nodename}/{boot}"
