"""The UCX backend's settings, read from ``KVXFER_UCX_*`` environment variables in this one place.

| variable | default | meaning |
|---|---|---|
| KVXFER_UCX_LIB | (the libucx wheel) | path of a libucp.so to load instead, e.g. a system UCX built with verbs |
| KVXFER_UCX_ERROR_MODE | auto | endpoint error handling: auto (none on one host, peer across hosts), peer, none |
| KVXFER_UCX_CMA | auto | same-host host memory through batched process_vm_readv/writev: auto or off |
| KVXFER_UCX_CMA_INLINE | 8388608 | cross-memory bytes a post copies on the posting thread (all of a smaller transfer) |
| KVXFER_UCX_CMA_THREADS | 0 | copy threads of the cross-memory path; 0: one fewer than the cores, 1 to 2 |
| KVXFER_UCX_STAGE_BELOW | 32768 | on the UCX path, host fragments averaging fewer bytes than this are staged |
| KVXFER_UCX_STAGE_CHUNK | 4194304 | bytes per staged message |
| KVXFER_UCX_STAGE_INFLIGHT | 4 | staged messages in flight per transfer |
| KVXFER_UCX_LIVENESS_INTERVAL | 0.2 | seconds between liveness checks of same-host peers without a pidfd |
| KVXFER_UCX_ONE_SIDED | same-uid | who may move bytes in and out of our regions one-sidedly (cma, UCX puts over shared
  memory or tcp, where nothing below checks bounds): same-uid (same-host peers of our uid, which could ptrace us
  anyway, after checking our export table) or off (only target-checked staged messages; RDMA rkeys still allowed) |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...environment import snapshot
from ...errors import ConfigError

_ERROR_MODES = ("auto", "peer", "none")
_CMA_MODES = ("auto", "off")
_ONE_SIDED_MODES = ("same-uid", "off")


@dataclass(frozen=True)
class UcxConfig:
    """Validated UCX backend settings (see the module docstring for each)."""

    library_path: str | None = None
    error_mode: str = "auto"
    cma: str = "auto"
    cma_inline: int = 8 << 20
    cma_threads: int = 0
    stage_below: int = 32 << 10
    stage_chunk: int = 4 << 20
    stage_inflight: int = 4
    liveness_interval: float = 0.2
    one_sided: str = "same-uid"

    def __post_init__(self) -> None:
        if self.error_mode not in _ERROR_MODES:
            raise ConfigError(f"KVXFER_UCX_ERROR_MODE must be one of {_ERROR_MODES}, got {self.error_mode!r}")
        if self.cma not in _CMA_MODES:
            raise ConfigError(f"KVXFER_UCX_CMA must be one of {_CMA_MODES}, got {self.cma!r}")
        if not 0 <= self.cma_inline <= 1 << 40:
            raise ConfigError(f"KVXFER_UCX_CMA_INLINE must be in [0, 2**40], got {self.cma_inline}")
        if not 0 <= self.cma_threads <= 64:
            raise ConfigError(f"KVXFER_UCX_CMA_THREADS must be in [0, 64], got {self.cma_threads}")
        if self.stage_below < 0:
            raise ConfigError(f"KVXFER_UCX_STAGE_BELOW must be >= 0, got {self.stage_below}")
        if not 4096 <= self.stage_chunk <= 1 << 30:
            raise ConfigError(f"KVXFER_UCX_STAGE_CHUNK must be in [4096, 2**30], got {self.stage_chunk}")
        if not 1 <= self.stage_inflight <= 64:
            raise ConfigError(f"KVXFER_UCX_STAGE_INFLIGHT must be in [1, 64], got {self.stage_inflight}")
        if self.one_sided not in _ONE_SIDED_MODES:
            raise ConfigError(f"KVXFER_UCX_ONE_SIDED must be one of {_ONE_SIDED_MODES}, got {self.one_sided!r}")
        if not 0 < self.liveness_interval <= 60:
            raise ConfigError(f"KVXFER_UCX_LIVENESS_INTERVAL must be in (0, 60], got {self.liveness_interval}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UcxConfig:
        """Settings from ``environ`` (default: the process environment, read through kvxfer.environment);
        unset variables keep their defaults."""
        env = snapshot("KVXFER_UCX_") if environ is None else environ
        return cls(
            library_path=env.get("KVXFER_UCX_LIB") or None,
            error_mode=env.get("KVXFER_UCX_ERROR_MODE", "auto").strip().lower(),
            cma=env.get("KVXFER_UCX_CMA", "auto").strip().lower(),
            cma_inline=_int(env, "KVXFER_UCX_CMA_INLINE", cls.cma_inline),
            cma_threads=_int(env, "KVXFER_UCX_CMA_THREADS", cls.cma_threads),
            stage_below=_int(env, "KVXFER_UCX_STAGE_BELOW", cls.stage_below),
            stage_chunk=_int(env, "KVXFER_UCX_STAGE_CHUNK", cls.stage_chunk),
            stage_inflight=_int(env, "KVXFER_UCX_STAGE_INFLIGHT", cls.stage_inflight),
            liveness_interval=_float(env, "KVXFER_UCX_LIVENESS_INTERVAL", cls.liveness_interval),
            one_sided=env.get("KVXFER_UCX_ONE_SIDED", "same-uid").strip().lower(),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None
