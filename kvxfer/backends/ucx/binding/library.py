"""Loading libucp through cffi (ABI mode); the loaded library's few calls on requests and keys (status.py turns
UCS status codes into kvxfer errors).

ABI mode, not API mode: it needs neither a C compiler nor Python headers at run time (the GPU machines are not
known to have either), and the per-call cost it adds (~1 µs) is off the hot path: large fragments amortize it,
small ones are batched (cross-memory attach) or staged. docs/backends.md has the measurements behind this choice.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from ....errors import BackendUnavailableError
from ..config import UcxConfig
from . import cdef

_log = logging.getLogger("kvxfer.ucx")

_LOCK = threading.Lock()


@dataclass(frozen=True)
class UcxLibrary:
    """The loaded libucp: ``ffi``, ``lib`` (UCP functions), ``libc``, where it came from and its version."""

    ffi: Any
    lib: Any
    libc: Any
    path: str
    version: tuple[int, int, int]
    source: str  # "wheel" (the libucx package) or "KVXFER_UCX_LIB"

    @property
    def version_string(self) -> str:
        """e.g. "1.22.0"."""
        return ".".join(str(part) for part in self.version)

    def status_text(self, status: int) -> str:
        """UCX's name for a status code, e.g. "Connection reset by remote peer"."""
        return str(self.ffi.string(self.lib.ucs_status_string(status)).decode(errors="replace"))

    def request_status(self, request: int) -> int:
        """UCS_INPROGRESS while ``request`` (an int from a ``*_nbx`` call) runs; else its final status (the request
        is then freed)."""
        status = self.lib.ucp_request_check_status(request)
        if status != cdef.UCS_INPROGRESS:
            self.lib.ucp_request_free(request)
        return int(status)

    def free_request(self, request: int) -> None:
        """Release ``request`` without waiting for it: UCX frees it when (if ever) it completes."""
        self.lib.ucp_request_free(request)

    def destroy_rkey(self, rkey: Any) -> None:
        """Release an unpacked remote key (binding.Endpoint.unpack_rkey)."""
        self.lib.ucp_rkey_destroy(rkey)


def load_library(config: UcxConfig | None = None) -> UcxLibrary:
    """The process-wide libucp, loaded once: ``config.library_path``, else ``KVXFER_UCX_LIB``, else the libucx
    wheel's. A later request naming a different library raises (one process cannot hold two UCX builds); one
    naming none gets the loaded library.

    Raises BackendUnavailableError naming what is missing.
    """
    global _LOADED
    requested = (config.library_path if config is not None else None) or UcxConfig.from_env().library_path
    with _LOCK:
        if _LOADED is None:
            _LOADED = _load(requested)
        elif requested and os.path.realpath(requested) != _LOADED.path:
            # Two UCX builds in one process clash symbol by symbol (a wheel's libuct against a system libucs).
            if not os.path.exists(requested):
                raise BackendUnavailableError(f"KVXFER_UCX_LIB={requested!r} does not exist")
            raise BackendUnavailableError(
                f"KVXFER_UCX_LIB={requested!r}: this process already loaded libucp "
                f"{_LOADED.path} ({_LOADED.source}); one process cannot use two UCX builds"
            )
        return _LOADED


_LOADED: UcxLibrary | None = None
MIN_MINOR = 14  # 1.13 fails our tests (see _load); 1.14-1.21 untested
TESTED_MINOR = 22  # the libucx wheels' version, tested on every run


def _load(library_path: str | None) -> UcxLibrary:
    try:
        import cffi
    except ImportError as error:
        raise BackendUnavailableError(f"the UCX backend needs cffi ({error}); install kvxfer[ucx]") from None
    if library_path:
        path, source = library_path, "KVXFER_UCX_LIB"
        if not os.path.exists(path):
            raise BackendUnavailableError(f"KVXFER_UCX_LIB={path!r} does not exist")
        # A symlink elsewhere: load the file itself, so that its $ORIGIN finds libuct/libucs beside it.
        path = os.path.realpath(path)
    else:
        path, source = _wheel_library(), "wheel"
    ffi = cffi.FFI()
    ffi.cdef(cdef.UCP_CDEF)
    ffi.cdef(cdef.LIBC_CDEF)
    try:
        lib = ffi.dlopen(path)
    except OSError as error:
        raise BackendUnavailableError(f"cannot load libucp from {path} ({source}): {error}") from None
    libc = ffi.dlopen(None)
    major, minor, release = ffi.new("unsigned *"), ffi.new("unsigned *"), ffi.new("unsigned *")
    lib.ucp_get_version(major, minor, release)
    version = (int(major[0]), int(minor[0]), int(release[0]))
    if version[0] != 1 or version[1] < MIN_MINOR:
        # Seen with Debian bookworm's 1.13.1: ucp_ep_query names no transports, large notifications over tcp are
        # lost, and a worker closed after its peer was SIGKILLed aborts the process (docs/backends.md).
        raise BackendUnavailableError(
            f"libucp {'.'.join(map(str, version))} at {path} is too old; need >= "
            f"1.{MIN_MINOR} (tested: 1.{TESTED_MINOR})"
        )
    if version[1] < TESTED_MINOR:
        _log.warning(
            "ucx: libucp %s at %s is older than the tested 1.%d", ".".join(map(str, version)), path, TESTED_MINOR
        )
    return UcxLibrary(ffi=ffi, lib=lib, libc=libc, path=os.path.realpath(path), version=version, source=source)


def _wheel_library() -> str:
    try:
        import libucx
    except ImportError as error:
        raise BackendUnavailableError(
            f"no UCX library: the libucx wheel is not installed ({error}); install kvxfer[ucx] "
            "(libucx-cu12 or libucx-cu13) or point KVXFER_UCX_LIB at a libucp.so"
        ) from None
    try:
        # Preloads libucs/libuct/libucp (RTLD_LOCAL) so that libucp's own dependencies resolve from the wheel.
        libucx.load_library()
    except OSError as error:
        raise BackendUnavailableError(f"the libucx wheel failed to load its libraries: {error}") from None
    path = os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so.0")
    if not os.path.exists(path):
        raise BackendUnavailableError(f"the libucx wheel has no {path}")
    return path


def ucx_available() -> str | None:
    """None when the UCX backend can be used here, else a one-line reason."""
    try:
        load_library()
    except BackendUnavailableError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 a broken install must read as "unavailable", never crash collection
        return f"{type(error).__name__}: {error}"
    return None
