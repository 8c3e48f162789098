"""Thin Pythonic wrappers of a UCP context and of memory registrations (``ucp_mem_map`` + packed rkeys)."""

from __future__ import annotations

from typing import Any

from ....errors import RegistrationError, UcxStatusError
from . import cdef
from .library import UcxLibrary
from .status import check


class Context:
    """A UCP context with the RMA, active-message and wakeup features. Close it last, after its workers."""

    def __init__(self, library: UcxLibrary, name: str) -> None:
        self.library = library
        ffi, lib = library.ffi, library.lib
        config = ffi.new("ucp_config_t **")
        check(library, lib.ucp_config_read(ffi.NULL, ffi.NULL, config), "ucp_config_read")
        params = ffi.new("ucp_params_t *")
        self._name = ffi.new("char[]", name.encode()[:63])
        params.field_mask = cdef.UCP_PARAM_FIELD_FEATURES | cdef.UCP_PARAM_FIELD_NAME
        params.features = cdef.UCP_FEATURE_RMA | cdef.UCP_FEATURE_AM | cdef.UCP_FEATURE_WAKEUP
        params.name = self._name
        handle = ffi.new("ucp_context_h *")
        try:
            # ucp_init() is a static inline in ucp.h; it calls ucp_init_version with the header's API version.
            # Ours is the loaded library's own (we only set fields that every 1.x since 1.12 knows).
            major, minor, _release = library.version
            check(library, lib.ucp_init_version(major, minor, params, config[0], handle), "ucp_init")
        finally:
            lib.ucp_config_release(config[0])
        self.handle: Any = handle[0]

    def map(self, addr: int, nbytes: int, cuda: bool) -> MemoryHandle:
        """Register ``[addr, addr + nbytes)`` (host, or CUDA device memory when ``cuda``)."""
        return MemoryHandle(self, addr, nbytes, cuda)

    def close(self) -> None:
        """Release the context (idempotent)."""
        if self.handle is not None:
            self.library.lib.ucp_cleanup(self.handle)
            self.handle = None


class MemoryHandle:
    """A ``ucp_mem_map`` registration of existing memory and its packed remote key (bytes for the metadata)."""

    def __init__(self, context: Context, addr: int, nbytes: int, cuda: bool) -> None:
        library = context.library
        ffi, lib = library.ffi, library.lib
        self._context = context
        self.addr, self.nbytes, self.cuda = addr, nbytes, cuda
        params = ffi.new("ucp_mem_map_params_t *")
        params.field_mask = (
            cdef.UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | cdef.UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | cdef.UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE
        )
        params.address = ffi.cast("void *", addr)
        params.length = nbytes
        params.memory_type = cdef.UCS_MEMORY_TYPE_CUDA if cuda else cdef.UCS_MEMORY_TYPE_HOST
        handle = ffi.new("ucp_mem_h *")
        try:
            check(library, lib.ucp_mem_map(context.handle, params, handle), "ucp_mem_map")
        except UcxStatusError as error:
            kind = "CUDA" if cuda else "host"
            raise RegistrationError(
                f"ucp_mem_map of {nbytes} bytes of {kind} memory at {addr:#x} failed: {error}"
            ) from error
        self.handle: Any = handle[0]
        buffer, size = ffi.new("void **"), ffi.new("size_t *")
        try:
            check(library, lib.ucp_rkey_pack(context.handle, self.handle, buffer, size), "ucp_rkey_pack")
        except UcxStatusError as error:
            lib.ucp_mem_unmap(context.handle, self.handle)
            raise RegistrationError(f"ucp_rkey_pack failed: {error}") from error
        self.packed_rkey = bytes(ffi.buffer(buffer[0], size[0]))
        lib.ucp_rkey_buffer_release(buffer[0])

    def close(self) -> None:
        """Unregister (idempotent)."""
        if self.handle is not None and self._context.handle is not None:
            self._context.library.lib.ucp_mem_unmap(self._context.handle, self.handle)
        self.handle = None
