"""UCX backend: one-sided UCP put/get through a thin cffi binding; host and CUDA memory; any UCX transport.

``ucx_available()`` says (without raising) whether libucp loads here; ``UcxBackend`` is the backend (a facade over
the parts services.py lists); ``binding/`` is the cffi binding. Importing this package imports neither cffi nor
UCX: both load when a backend is attached.
"""

from .backend import UcxBackend
from .binding import ucx_available

__all__ = ["UcxBackend", "ucx_available"]
