"""kvxfer.serve: the serving layer (router, prefill queue, policy, P/D workers) on top of the KV pipe.

Submodules import their own heavy dependencies (fastapi, uvicorn, zmq, torch); importing this package needs nothing
beyond ``kvxfer`` itself.
"""

from __future__ import annotations

__all__: list[str] = []
