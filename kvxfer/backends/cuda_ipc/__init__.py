"""CUDA IPC backend: same-host GPU<->GPU transfers between processes (legacy IPC handles and VMM fds)."""

from .backend import CudaIpcBackend
from .driver import VmmAllocation

__all__ = ["CudaIpcBackend", "VmmAllocation"]
