"""Backend registry: names to factories, imported lazily so optional dependencies stay optional."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence

from ..environment import read as read_env
from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, BackendContext

logger = logging.getLogger("kvxfer")

#: name -> "module:Class". A new backend is a file and a line here.
FACTORIES = {
    "local": "kvxfer.backends.local:LocalBackend",
    "mock": "kvxfer.backends.mock:MockBackend",
    "cuda_ipc": "kvxfer.backends.cuda_ipc:CudaIpcBackend",
    "ucx": "kvxfer.backends.ucx:UcxBackend",
}

#: What an Agent creates when it is given no backends: each one that is available here.
DEFAULT = ("local", "cuda_ipc", "ucx")


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``; BackendUnavailableError when its module cannot be imported."""
    if name not in FACTORIES:
        raise ConfigError(f"unknown backend {name!r}; known: {sorted(FACTORIES)}")
    module_name, _, class_name = FACTORIES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BackendUnavailableError(f"backend {name!r} cannot be imported: {error}") from None
    backend = getattr(module, class_name, None)
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        raise BackendUnavailableError(f"backend {name!r}: {module_name} has no Backend class {class_name}")
    return backend


def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can be created here, else why not."""
    try:
        return backend_class(name).unavailable_reason()
    except BackendUnavailableError as error:
        return str(error)


def create_all(requested: Sequence[str | Backend] | None, context: BackendContext) -> list[Backend]:
    """Create (or adopt) and attach the agent's backends. Explicit names must be available; defaults may not."""
    explicit = requested is not None
    if requested is None:
        configured = read_env("KVXFER_BACKENDS")
        explicit = configured is not None
        requested = [n.strip() for n in configured.split(",") if n.strip()] if configured else list(DEFAULT)
    created: list[Backend] = []
    for item in requested:
        if isinstance(item, Backend):
            backend = item
        else:
            reason = unavailable_reason(item)
            if reason is not None:
                if explicit:
                    raise BackendUnavailableError(
                        f"backend {item!r} is unavailable: {reason}; available: "
                        f"{[n for n in FACTORIES if unavailable_reason(n) is None]}"
                    )
                logger.debug("backend %s skipped: %s", item, reason)
                continue
            backend = backend_class(item)()
        if any(b.caps.wire == backend.caps.wire for b in created):
            raise ConfigError(
                f"backends {[b.caps.name for b in created]} and {backend.caps.name!r} speak the same "
                f"wire protocol {backend.caps.wire!r}; give one of them"
            )
        backend.attach(context)
        created.append(backend)
    if not created:
        raise BackendUnavailableError("no backend is available; 'local' always is: pass backends=('local',)")
    return created


__all__ = ["DEFAULT", "FACTORIES", "Backend", "BackendContext", "backend_class", "create_all", "unavailable_reason"]
