"""The two systems bench/ucx_host.py compares, behind one interface, and the child-process loop that drives them.

Each side owns a pool of host memory (random bytes, pages touched before timing), exchanges metadata with its
peer, prepares a transfer (fragment size, local and remote block offsets) once, then times it repeatedly.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np


class KvxferSide:
    """A kvxfer Agent with one UCX backend; ``settings`` are UcxConfig fields (e.g. {"cma": "off"})."""

    def __init__(self, name: str, pool_nbytes: int, settings: dict[str, Any], device: int) -> None:
        import kvxfer
        from kvxfer.backends.ucx import UcxBackend
        from kvxfer.backends.ucx.config import UcxConfig

        self.kvxfer = kvxfer
        self.agent = kvxfer.Agent(
            name, backends=[UcxBackend(UcxConfig(**settings))], timeouts=kvxfer.Timeouts(transfer=300.0)
        )
        self.pool = _pool(pool_nbytes, device)
        self.region = self.agent.register(self.pool, name="pool")
        self.device = device
        self.plans: dict[str, Any] = {}
        self.peer = None

    def metadata(self) -> tuple[bytes, int, int]:
        return self.agent.metadata(), self.region.addr, self.device

    def connect(self, metadata: bytes, _remote_base: int, _remote_device: int) -> None:
        self.peer = self.agent.connect(metadata)

    def describe(self) -> str:
        backend = self.peer.backends[0]
        return ",".join(f"{t}/{d}" for t, d in backend.transports(self.peer))

    def prepare(self, key: str, fragment: int, local_offsets: np.ndarray, remote_offsets: np.ndarray) -> str:
        Descs = self.kvxfer.Descs
        plan = self.agent.plan(
            Descs.from_ranges(self.region, local_offsets, fragment),
            self.peer,
            Descs.from_ranges(self.peer.region("pool"), remote_offsets, fragment),
        )
        self.plans[key] = plan
        return plan.backend.data_path(plan)

    def run(self, key: str, op: str, notify: bytes | None = None) -> float:
        plan = self.plans[key]
        began = time.perf_counter()
        handle = (self.agent.read if op == "READ" else self.agent.write)(plan, notify=notify)
        handle.wait(300.0)
        return time.perf_counter() - began

    def wait_note(self) -> None:
        while not self.agent.notifications(timeout=10.0):
            pass

    def close(self) -> None:
        self.agent.close()


class NixlSide:
    """A NIXL 1.5 agent with its UCX backend (its defaults: progress thread, peer error handling)."""

    def __init__(self, name: str, pool_nbytes: int, _settings: dict[str, Any], device: int) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = name
        self.agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        self.pool = _pool(pool_nbytes, device)
        self.device, self.memory = max(device, 0), ("VRAM" if device >= 0 else "DRAM")
        self.base = _address(self.pool)
        self.agent.register_memory([(self.base, pool_nbytes, self.device, "")], self.memory)
        self.handles: dict[tuple[str, str], Any] = {}
        self.prepared: dict[str, Any] = {}
        self.remote_name: str | None = None
        self.remote_base = self.remote_device = 0

    def metadata(self) -> tuple[bytes, int, int]:
        return self.agent.get_agent_metadata(), self.base, self.device

    def connect(self, metadata: bytes, remote_base: int, remote_device: int) -> None:
        self.remote_name = self.agent.add_remote_agent(metadata)
        self.remote_base, self.remote_device = remote_base, max(remote_device, 0)

    def describe(self) -> str:
        return "nixl-ucx"

    def prepare(self, key: str, fragment: int, local_offsets: np.ndarray, remote_offsets: np.ndarray) -> str:
        local = _nixl_descs(self.base, local_offsets, fragment, self.device)
        remote = _nixl_descs(self.remote_base, remote_offsets, fragment, self.remote_device)
        local_side = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, self.memory)
        remote_side = self.agent.prep_xfer_dlist(self.remote_name, remote, self.memory)
        self.prepared[key] = (local_side, remote_side, np.arange(len(local_offsets), dtype=np.int32))
        return "nixl"

    def _handle(self, key: str, op: str, notify: bytes | None) -> Any:
        if (key, op) not in self.handles:
            local_side, remote_side, index = self.prepared[key]
            self.handles[(key, op)] = self.agent.make_prepped_xfer(
                op, local_side, index, remote_side, index, notify or b""
            )
        return self.handles[(key, op)]

    def run(self, key: str, op: str, notify: bytes | None = None) -> float:
        handle = self._handle(key, op, notify)
        began = time.perf_counter()
        state = self.agent.transfer(handle, notify or b"")
        while state == "PROC":
            state = self.agent.check_xfer_state(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL transfer ended in state {state}")
        return time.perf_counter() - began

    def wait_note(self) -> None:
        give_up = time.monotonic() + 10.0
        while not any(self.agent.get_new_notifs().values()):
            if time.monotonic() > give_up:
                raise TimeoutError("NIXL notification did not arrive within 10 s")

    def close(self) -> None:
        for handle in self.handles.values():
            self.agent.release_xfer_handle(handle)
        self.handles.clear()


def _pool(nbytes: int, device: int) -> Any:
    """Random bytes (pages touched) in host memory, or on CUDA device ``device`` >= 0 (via cupy)."""
    pool = np.frombuffer(np.random.default_rng(os.getpid()).bytes(nbytes), dtype=np.uint8).copy()
    if device < 0:
        return pool
    import cupy

    cupy.cuda.Device(device).use()
    return cupy.asarray(pool)


def _address(pool: Any) -> int:
    return pool.data.ptr if hasattr(pool, "data") and hasattr(pool.data, "ptr") else pool.ctypes.data


def _nixl_descs(base: int, offsets: np.ndarray, fragment: int, device: int) -> np.ndarray:
    descs = np.zeros((len(offsets), 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base) + offsets.astype(np.uint64)
    descs[:, 1] = fragment
    descs[:, 2] = device
    return descs


SIDES = {"kvxfer": KvxferSide, "nixl": NixlSide}


def serve(
    connection: Any,
    system: str,
    name: str,
    pool_nbytes: int,
    settings: dict[str, Any],
    environ: dict[str, str],
    device: int = -1,
) -> None:
    """Child-process loop: build the side, then run commands from the orchestrator until "close"."""
    os.environ.update(environ)
    try:
        side = SIDES[system](name, pool_nbytes, settings, device)
        connection.send(side.metadata())
    except Exception:  # noqa: BLE001 the child reports any setup failure to the orchestrator, which raises it
        connection.send(RuntimeError(traceback.format_exc()))
        return
    while True:
        command, *args = connection.recv()
        try:
            if command == "close":
                side.close()
                connection.send(None)
                return
            if command == "connect":
                side.connect(*args)
                connection.send(side.describe())
            elif command == "prepare":
                connection.send(side.prepare(*args))
            elif command == "time":
                key, op, repeats = args
                side.run(key, op)  # warm-up: wireup, registration caches, page faults
                connection.send([side.run(key, op) for _ in range(repeats)])
            elif command == "ping":  # initiator of a round trip: write + notify, then wait for the answer
                key, count = args
                times = []
                for _ in range(count):
                    began = time.perf_counter()
                    side.run(key, "WRITE", b"ping")
                    side.wait_note()
                    times.append(time.perf_counter() - began)
                connection.send(times)
            elif command == "pong":  # the other end: wait for a ping, answer with write + notify
                key, count = args
                connection.send(None)
                for _ in range(count):
                    side.wait_note()
                    side.run(key, "WRITE", b"pong")
            else:
                connection.send(ValueError(f"unknown command {command!r}"))
        except Exception:  # noqa: BLE001 the child loop must not die: the orchestrator raises the traceback
            connection.send(RuntimeError(traceback.format_exc()))
