"""``process_vm_readv`` / ``process_vm_writev`` through libc (declared in cdef.py, loaded with libucp).

One :class:`VmCall` is one system call's iovec lists, turned into C pointers once: the cross-memory path
(cma.py) runs the same batches many times (plans are posted many times), so no ``ffi.cast`` per call.
"""

from __future__ import annotations

import numpy as np

from .library import UcxLibrary


class VmCall:
    """``local`` and ``remote`` (uint64[k, 2] iovec arrays (base, length), host; kept alive by the caller) as
    the arguments of one cross-memory call."""

    def __init__(self, library: UcxLibrary, local: np.ndarray, remote: np.ndarray) -> None:
        ffi, libc = library.ffi, library.libc
        self._ffi = ffi
        self._read, self._write = libc.process_vm_readv, libc.process_vm_writev
        self._local = ffi.cast("struct iovec *", local.ctypes.data)
        self._remote = ffi.cast("struct iovec *", remote.ctypes.data)
        self._nlocal, self._nremote = len(local), len(remote)

    def run(self, pid: int, write: bool) -> int:
        """Move the bytes to (``write``) or from process ``pid``: the byte count moved, or ``-errno``."""
        call = self._write if write else self._read
        moved = int(call(pid, self._local, self._nlocal, self._remote, self._nremote, 0))
        return moved if moved >= 0 else -int(self._ffi.errno)
