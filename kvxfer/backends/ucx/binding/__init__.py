"""The cffi binding of UCP (and of the two libc cross-memory calls): the only code of the UCX backend that touches
``ffi`` / ``lib``. Everything above it holds handles and ints it got from here.

- :mod:`.cdef`: the C declarations (ABI mode) and UCP constants.
- :mod:`.library`: loading libucp once per process (:func:`load_library`, :func:`ucx_available`), and the few
  calls on requests and keys (:class:`UcxLibrary`).
- :mod:`.status`: UCS status codes, and the one place where they become :class:`kvxfer.errors.UcxStatusError`.
- :mod:`.context`: a UCP context and memory registrations (:class:`Context`, :class:`MemoryHandle`).
- :mod:`.worker`: a UCP worker, progress, active messages out, endpoint errors (:class:`Worker`).
- :mod:`.inbox`: active messages in, handed to a :class:`Receiver` (:class:`Inbox`).
- :mod:`.endpoint`: an endpoint to a peer worker, remote keys, puts / gets / flush (:class:`Endpoint`).
- :mod:`.process_vm`: ``process_vm_readv`` / ``process_vm_writev`` (:class:`VmCall`).

Importing this package imports neither cffi nor UCX: :func:`load_library` does.
"""

from . import cdef
from .context import Context, MemoryHandle
from .endpoint import Endpoint
from .inbox import Buffers, Inbox, Receiver, UserSpan
from .library import UcxLibrary, load_library, ucx_available
from .process_vm import VmCall
from .status import UCS_ERR_CANCELED, UCS_INPROGRESS, UCS_OK, check, pointer_status, started, status_error
from .worker import Worker

__all__ = [
    "UCS_ERR_CANCELED",
    "UCS_INPROGRESS",
    "UCS_OK",
    "Buffers",
    "Context",
    "Endpoint",
    "Inbox",
    "MemoryHandle",
    "Receiver",
    "UcxLibrary",
    "UserSpan",
    "VmCall",
    "Worker",
    "cdef",
    "check",
    "load_library",
    "pointer_status",
    "started",
    "status_error",
    "ucx_available",
]
