"""A kvxfer Agent with the UCX backend in a spawned process, driven over a pipe (test helper, not a test).

The child registers one region "buf" of ``nbytes`` (host memory, or CUDA memory on ``device`` >= 0) and answers
commands: digests of block lists, fills, notification waits (with a digest or a scribble at the moment the
notification is seen, to check ordering), connecting back to the test's agent, and writing to it.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kvxfer.backends.base import Backend
    from kvxfer.backends.ucx import UcxBackend

COMMAND_TIMEOUT = 60.0


def ucx_backend(backend: Backend) -> UcxBackend:
    """``backend`` as the UcxBackend it is; TypeError when it is another backend."""
    from kvxfer.backends.ucx import UcxBackend

    if not isinstance(backend, UcxBackend):
        raise TypeError(f"expected the ucx backend, got {type(backend).__name__}")
    return backend


def digest(buffer: np.ndarray, offsets: Any, size: int) -> str:
    """blake2b of the blocks ``buffer[offsets[i]:offsets[i] + size]`` concatenated in order (uint8 buffer, host)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    hasher = hashlib.blake2b(digest_size=16)
    if size % 8 == 0 and np.all(offsets % size == 0) and buffer.size % size == 0:
        hasher.update(np.ascontiguousarray(buffer.reshape(-1, size)[offsets // size]).tobytes())
    else:
        for offset in offsets.tolist():
            hasher.update(buffer[offset : offset + size].tobytes())
    return hasher.hexdigest()


def random_fill(buffer: np.ndarray, seed: int) -> None:
    """Fill a uint8 host buffer with seeded random bytes (never zero)."""
    data = np.frombuffer(np.random.default_rng(seed).bytes(buffer.size), dtype=np.uint8)
    buffer[:] = data
    buffer[buffer == 0] = 1


CANARY = 0xC5


def _serve(
    connection: Any, name: str, nbytes: int, device: int, environ: dict[str, str], canary: int = 0, backend: str = "ucx"
) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in UCX or CUDA prints the Python stack of every thread to stderr
    os.environ.update(environ)
    import kvxfer

    with kvxfer.Agent(name, backends=[backend]) as agent:
        if device >= 0:
            import cupy

            cupy.cuda.Device(device).use()
            memory = cupy.zeros(nbytes, dtype=cupy.uint8)
            host = lambda: cupy.asnumpy(memory)  # noqa: E731

            def fill(seed: int) -> None:
                staging = np.empty(nbytes, dtype=np.uint8)
                random_fill(staging, seed)
                memory.set(staging)
        else:
            # ``canary`` bytes right after the region, never registered: nothing a peer does may change them.
            backing = np.zeros(nbytes + canary, dtype=np.uint8)
            backing[nbytes:] = CANARY
            memory = backing[:nbytes]
            host = lambda: memory  # noqa: E731

            def fill(seed: int) -> None:
                random_fill(memory, seed)

        region = agent.register(memory, name="buf")
        connection.send((agent.metadata(), region.addr))
        peer = None
        while True:
            command, *args = connection.recv()
            try:
                if command == "quit":
                    connection.send(None)
                    return
                if command == "digest":
                    connection.send(digest(host(), *args))
                elif command == "fill":
                    fill(args[0])
                    connection.send(None)
                elif command == "notes":
                    connection.send([(n.peer_name, n.payload) for n in agent.notifications(timeout=args[0])])
                elif command == "digest_on_note":
                    offsets, size, timeout = args
                    notes = agent.notifications(timeout=timeout)
                    connection.send(([n.payload for n in notes], digest(host(), offsets, size)))
                elif command == "scribble_on_note":
                    offsets, size, timeout = args
                    notes = agent.notifications(timeout=timeout)
                    for offset in np.asarray(offsets).tolist():
                        memory[offset : offset + size] = 0xEE
                    connection.send([n.payload for n in notes])
                elif command == "connect":
                    peer = agent.connect(args[0])
                    connection.send(None)
                elif command == "notify":
                    if peer is None:
                        raise ValueError("notify before connect")
                    agent.notify(peer, args[0])
                    connection.send(None)
                elif command == "canary":  # True while every unregistered byte after the region is intact
                    connection.send(bool((backing[nbytes:] == CANARY).all()))
                elif command == "pid":
                    connection.send(os.getpid())
                elif command == "forms":  # active messages received, per UCX delivery form
                    connection.send(dict(ucx_backend(agent._backends[0]).services.worker.inbox.forms))
                else:
                    connection.send(ValueError(f"unknown command {command!r}"))
            except Exception as error:  # noqa: BLE001 sent to the parent, keep serving: the test decides
                connection.send(error)


class RemoteAgent:
    """The parent's handle on the child (a context manager; always kills the child on exit)."""

    mode: str  # set by tests that parametrize the child's one-sided mode

    def __init__(
        self,
        name: str = "remote",
        nbytes: int = 1 << 20,
        device: int = -1,
        environ: dict[str, str] | None = None,
        canary: int = 0,
        backend: str = "ucx",
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        # Skipping UCX's mmap hooks makes the child's library load ~400 ms faster; host transfers do not need them.
        env = {"UCX_MEM_MMAP_HOOK_MODE": "none"} if device < 0 else {}
        env.update(environ or {})
        self.process = context.Process(
            target=_serve, args=(child, name, nbytes, device, env, canary, backend), daemon=True
        )
        self.process.start()
        child.close()
        self.name, self.nbytes = name, nbytes
        self.metadata, self.addr = self._receive(COMMAND_TIMEOUT)

    def call(self, *command: Any, timeout: float = COMMAND_TIMEOUT) -> Any:
        """Run one command in the child and return its answer (re-raising what it raised)."""
        self.send(*command)
        return self.answer(timeout)

    def send(self, *command: Any) -> None:
        """Start a command; :meth:`answer` collects its result."""
        self._connection.send(command)

    def answer(self, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The result of the command started last."""
        result = self._receive(timeout)
        if isinstance(result, Exception):
            raise result
        return result

    def _receive(self, timeout: float) -> Any:
        if not self._connection.poll(timeout):
            raise TimeoutError(f"remote agent {self.name!r} did not answer within {timeout} s")
        return self._connection.recv()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the child."""
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, sig)

    def stop(self, seconds: float = 10.0) -> None:
        """SIGSTOP the child and return once every one of its threads is stopped (kill() only queues the signal:
        on a loaded machine a thread may run on for a while, e.g. answer one more message)."""
        self.kill(signal.SIGSTOP)
        pid = self.process.pid
        give_up = time.monotonic() + seconds
        while time.monotonic() < give_up:
            states = []
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as file:
                        states.append(file.read().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue
            if states and all(state in "Tt" for state in states):
                return
            time.sleep(0.001)
        raise TimeoutError(f"remote agent {self.name!r} (pid {pid}) did not stop within {seconds} s")

    def close(self) -> None:
        """Ask the child to quit; kill it if it does not within a few seconds."""
        if self.process.is_alive():
            try:
                self.kill(signal.SIGCONT)
                self._connection.send(("quit",))
                self._receive(10.0)
            except (OSError, EOFError, TimeoutError):
                pass
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self._connection.close()
        if not self.process.is_alive():
            self.process.close()  # its sentinel pipes now, not whenever the object is collected

    def __enter__(self) -> RemoteAgent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
