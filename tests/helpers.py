"""Small builders shared by tests (not fixtures: plain functions, explicit at the call site)."""

from __future__ import annotations

import numpy as np

import kvxfer
from kvxfer.backends.mock import MockBackend


def random_bytes(nbytes: int, seed: int | None = None) -> np.ndarray:
    """uint8[nbytes] of random data (never zeros: zeros hide unwritten bytes)."""
    data = np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8).copy()
    data[data == 0] = 1
    return data


def agent_pair(nbytes: int = 1 << 16, backend: str | MockBackend = "local", **kwargs):
    """Two agents in this process, each with one registered region "buf": (src agent, dst agent, src array,
    dst array, peer of src as seen by dst). The source holds random bytes, the destination zeros."""
    source_agent = kvxfer.Agent("src", backends=[backend if isinstance(backend, str) else MockBackend()], **kwargs)
    destination_agent = kvxfer.Agent("dst", backends=[backend], **kwargs)
    source, destination = random_bytes(nbytes), np.zeros(nbytes, dtype=np.uint8)
    source_agent.register(source, name="buf")
    destination_agent.register(destination, name="buf")
    peer = destination_agent.connect(source_agent.metadata())
    return source_agent, destination_agent, source, destination, peer
