"""A UCP endpoint to one peer worker, its unpacked remote keys, and one-sided puts/gets over it.

Every method is called with the worker's lock held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ....errors import UcxStatusError
from . import cdef
from .status import check, closed_error, pointer_status, started, status_error
from .worker import Worker

_MAX_TRANSPORT_ENTRIES = 32


class Endpoint:
    """``ucp_ep_create`` from a peer's worker address, with an error handler reporting to ``on_error(status)``."""

    def __init__(
        self, worker: Worker, address: bytes, peer_mode: bool, name: str, on_error: Callable[[int], None]
    ) -> None:
        library = worker.library
        ffi, lib = library.ffi, library.lib
        self.library, self.worker, self.peer_mode = library, worker, peer_mode
        self.failed_status: int | None = None
        self._on_error = on_error
        self._watch = worker.watch_endpoint(self._on_ep_error)  # the worker owns the C callback (worker.py)
        self._address = ffi.new("char[]", address)
        self._name = ffi.new("char[]", name.encode()[:31])
        params = ffi.new("ucp_ep_params_t *")
        params.field_mask = (
            cdef.UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
            | cdef.UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
            | cdef.UCP_EP_PARAM_FIELD_ERR_HANDLER
            | cdef.UCP_EP_PARAM_FIELD_NAME
        )
        params.address = ffi.cast("ucp_address_t *", self._address)
        params.err_mode = cdef.UCP_ERR_HANDLING_MODE_PEER if peer_mode else cdef.UCP_ERR_HANDLING_MODE_NONE
        params.err_handler.cb = worker.ep_error_callback
        params.err_handler.arg = ffi.cast("void *", self._watch)
        params.name = self._name
        handle = ffi.new("ucp_ep_h *")
        try:
            check(library, lib.ucp_ep_create(worker.handle, params, handle), "ucp_ep_create")
        except UcxStatusError:
            worker.unwatch_endpoint(self._watch)
            raise
        self.handle: Any = handle[0]
        self.key = int(ffi.cast("uintptr_t", self.handle))  # the int ucp_ep_h the worker tracks sends by
        self._rma_param = ffi.new("ucp_request_param_t *")
        self._rma_param.op_attr_mask = cdef.UCP_OP_ATTR_FIELD_MEMH
        self._flush_param = ffi.new("ucp_request_param_t *")

    def _on_ep_error(self, status: int) -> None:
        self.failed_status = status
        self._on_error(status)

    def check_open(self, call: str) -> None:
        """Raise UcxStatusError if the endpoint was closed (UCX would dereference NULL)."""
        if self.handle is None:  # closed (its link was lost): UCX would dereference NULL
            raise closed_error(call)

    def unpack_rkey(self, packed: bytes) -> Any:
        """A ucp_rkey_h for a peer region's packed key; release with :meth:`destroy_rkey`."""
        self.check_open("ucp_ep_rkey_unpack")
        ffi, lib = self.library.ffi, self.library.lib
        rkey = ffi.new("ucp_rkey_h *")
        check(self.library, lib.ucp_ep_rkey_unpack(self.handle, ffi.from_buffer(packed), rkey), "ucp_ep_rkey_unpack")
        return rkey[0]

    def destroy_rkey(self, rkey: Any) -> None:
        """Release an unpacked key."""
        self.library.lib.ucp_rkey_destroy(rkey)

    def rma(
        self,
        write: bool,
        local: Sequence[int],
        remote: Sequence[int],
        nbytes: Sequence[int],
        rkeys: Sequence[Any],
        memhs: Sequence[Any],
    ) -> None:
        """Issue one put (``write``) or get per fragment; requests are released at once (completion is observed
        by a later :meth:`flush`). Raises UcxStatusError on the first immediate failure."""
        self.check_open("ucp_put_nbx" if write else "ucp_get_nbx")
        lib, param, ep = self.library.lib, self._rma_param, self.handle
        operation = lib.ucp_put_nbx if write else lib.ucp_get_nbx
        free = lib.ucp_request_free
        floor = 2**64 + cdef.UCS_ERR_LAST
        for local_addr, remote_addr, size, rkey, memh in zip(local, remote, nbytes, rkeys, memhs, strict=True):
            param.memh = memh
            request = operation(ep, local_addr, size, remote_addr, rkey, param)
            if request:
                if request >= floor:
                    raise status_error(self.library, request - 2**64, "ucp_put_nbx" if write else "ucp_get_nbx")
                free(request)

    def flush(self) -> int:
        """Start ``ucp_ep_flush_nbx``: 0 when already complete, else a request to poll with
        :meth:`UcxLibrary.request_status`."""
        self.check_open("ucp_ep_flush_nbx")
        return started(
            self.library, self.library.lib.ucp_ep_flush_nbx(self.handle, self._flush_param), "ucp_ep_flush_nbx"
        )

    def transports(self) -> list[tuple[str, str]]:
        """(transport, device) per lane, e.g. [("sysv", "memory"), ("cma", "memory")] or [("tcp", "lo")]."""
        ffi, lib = self.library.ffi, self.library.lib
        entries = ffi.new("ucp_transport_entry_t[]", _MAX_TRANSPORT_ENTRIES)
        attr = ffi.new("ucp_ep_attr_t *")
        attr.field_mask = cdef.UCP_EP_ATTR_FIELD_TRANSPORTS
        attr.transports.entries = entries
        attr.transports.num_entries = _MAX_TRANSPORT_ENTRIES
        attr.transports.entry_size = ffi.sizeof("ucp_transport_entry_t")
        try:
            check(self.library, lib.ucp_ep_query(self.handle, attr), "ucp_ep_query")
        except UcxStatusError:
            return []
        lanes = []
        for i in range(attr.transports.num_entries):
            entry = entries[i]
            lanes.append((_text(ffi, entry.transport_name), _text(ffi, entry.device_name)))
        return lanes

    def close(self, force: bool) -> int:
        """Start closing: 0 when closed at once, else a request to poll. ``force`` only in peer error mode."""
        if self.handle is None:
            return 0
        ffi, lib = self.library.ffi, self.library.lib
        param = ffi.new("ucp_request_param_t *")
        if force:
            param.op_attr_mask = cdef.UCP_OP_ATTR_FIELD_FLAGS
            param.flags = cdef.UCP_EP_CLOSE_FLAG_FORCE
        request = lib.ucp_ep_close_nbx(self.handle, param)
        self.handle = None
        self.worker.unwatch_endpoint(self._watch)
        return request if pointer_status(request) == cdef.UCS_INPROGRESS else 0


def _text(ffi: Any, pointer: Any) -> str:
    return ffi.string(pointer).decode(errors="replace") if pointer != ffi.NULL else ""
