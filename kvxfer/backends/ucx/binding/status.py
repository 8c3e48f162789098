"""UCS status codes and the one place where they become kvxfer errors (:class:`kvxfer.errors.UcxStatusError`).

UCP returns a ``ucs_status_t`` (a signed byte: 0 OK, 1 in progress, negative an error) or a ``ucs_status_ptr_t``,
which the binding declares as ``uintptr_t`` (cdef.py): 0 = done, ``>= 2**64 - 100`` = an error status, else a
request to poll and free.
"""

from __future__ import annotations

from ....errors import UcxStatusError
from . import cdef
from .library import UcxLibrary

UCS_OK = cdef.UCS_OK
UCS_INPROGRESS = cdef.UCS_INPROGRESS
UCS_ERR_BUSY = cdef.UCS_ERR_BUSY
UCS_ERR_CANCELED = cdef.UCS_ERR_CANCELED

_PTR_ERROR_FLOOR = 2**64 + cdef.UCS_ERR_LAST


def pointer_status(pointer: int) -> int:
    """The status a ``ucs_status_ptr_t`` (as an int) carries: 0 for NULL, negative for an error, 1 (INPROGRESS)
    for a request."""
    if pointer == 0:
        return cdef.UCS_OK
    if pointer >= _PTR_ERROR_FLOOR:
        return pointer - 2**64
    return cdef.UCS_INPROGRESS


def status_error(library: UcxLibrary, status: int, call: str) -> UcxStatusError:
    """The error for ``call`` failing with ``status`` (its text from UCX)."""
    return UcxStatusError(f"{call} failed: {library.status_text(status)} ({status})", status, call)


def closed_error(call: str) -> UcxStatusError:
    """The error for ``call`` on an endpoint or worker already closed (UCX would dereference NULL)."""
    return UcxStatusError(f"{call}: the endpoint or worker is closed", cdef.UCS_ERR_NOT_CONNECTED, call)


def check(library: UcxLibrary, status: int, call: str) -> None:
    """Raise UcxStatusError unless ``status`` is UCS_OK."""
    if status != cdef.UCS_OK:
        raise status_error(library, status, call)


def started(library: UcxLibrary, pointer: int, call: str) -> int:
    """The request a ``ucs_status_ptr_t`` returned by ``call`` carries: 0 when the operation completed at once;
    UcxStatusError when it failed."""
    status = pointer_status(pointer)
    if status < 0:
        raise status_error(library, status, call)
    return 0 if status == cdef.UCS_OK else pointer
