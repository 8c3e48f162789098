"""Process tuning an application may opt into (kvxfer itself never calls these: they change the whole process)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("kvxfer")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(trim_nbytes: int = 256 << 20, mmap_threshold: int = 64 << 20, top_pad: int = 16 << 20) -> bool:
    """Ask glibc's malloc to keep freed memory instead of handing it back to the kernel at once.

    Building a plan allocates a few fresh arrays of hundreds of KiB per request; by default glibc serves them with
    ``mmap`` or trims them off the heap when freed, so the next request page-faults every page again (measured on a
    2-core VM: ~2 µs a fault, 3/4 of a 40,960-descriptor plan's build time). Engines and servers that build plans per
    request should call this once at start (the serve workers do). Returns False where the C library has no
    ``mallopt`` (not glibc); then nothing changed. Arguments are bytes; all must be > 0.
    """
    for name, value in (("trim_nbytes", trim_nbytes), ("mmap_threshold", mmap_threshold), ("top_pad", top_pad)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            from .errors import ConfigError

            raise ConfigError(f"keep_freed_memory: {name} must be an int in (0, 2**31), got {value!r}")
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("keep_freed_memory: no mallopt in this C library; unchanged")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    results = [
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold),
        mallopt(_M_TRIM_THRESHOLD, trim_nbytes),
        mallopt(_M_TOP_PAD, top_pad),
    ]
    return all(result == 1 for result in results)
