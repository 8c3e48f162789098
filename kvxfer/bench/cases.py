"""What a sweep measures: the grid of cases, the memory each side moves (random pools) and the byte checks.

A case is one point of the grid backend x memory kinds x op x fragment size x fragments per request (batch) x
initiator threads. Its fragments sit at shuffled, distinct slots of each side's pool (independent permutations on
the two sides, so nothing coalesces by accident); the same case always gets the same slots, whichever system
(kvxfer or NIXL) moves them.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..devices import Array
from ..errors import ConfigError

KINDS = ("host", "cuda")
OPS = ("READ", "WRITE")
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
}
#: Widest window of one sampled fragment that the byte check compares.
VERIFY_WINDOW = 64 << 10


@dataclass(frozen=True)
class Case:
    """One measurement: ``batch`` fragments of ``fragment`` bytes per request, ``threads`` requests at once.

    ``initiator`` / ``target``: memory kind ("host" or "cuda") of the side that posts and of the passive side.
    """

    backend: str
    initiator: str
    target: str
    op: str
    fragment: int
    batch: int
    threads: int

    @property
    def nbytes(self) -> int:
        """Bytes moved by one repetition (all threads together)."""
        return self.fragment * self.batch * self.threads

    @property
    def seed(self) -> int:
        """A seed that depends on the work only (not on the backend): kvxfer and NIXL move the same slots."""
        return zlib.crc32(
            f"{self.initiator}:{self.target}:{self.op}:{self.fragment}:{self.batch}:{self.threads}".encode()
        )

    def offsets(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(initiator offsets, target offsets): per thread, int64[batch] byte offsets into a pool of ``nbytes``."""
        rng = np.random.default_rng(self.seed)
        slots = self.batch * self.threads
        local, remote = (rng.permutation(slots).astype(np.int64) * self.fragment for _ in range(2))
        return np.split(local, self.threads), np.split(remote, self.threads)


def parse_bytes(text: str | int) -> int:
    """Bytes from "4096", "4K", "64MiB", "1G" (binary units)."""
    if isinstance(text, int):
        return text
    cleaned = str(text).strip().upper()
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        value = int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ConfigError(f"expected a byte count like 4096, 4K, 64M or 1G, got {text!r}") from None
    if value <= 0:
        raise ConfigError(f"byte counts must be > 0, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    """Fragment sizes from "4K-64M" (doubling) or a comma list "4K,32K,2M"."""
    if "-" in text and "," not in text:
        low_text, high_text = text.split("-", 1)
        low, high = parse_bytes(low_text), parse_bytes(high_text)
        if high < low:
            raise ConfigError(f"size range must go up, got {text!r}")
        sizes = []
        while low <= high:
            sizes.append(low)
            low *= 2
        return sizes
    return sorted({parse_bytes(part) for part in text.split(",") if part.strip()})


def parse_ints(text: str, argument: str) -> list[int]:
    """Positive ints from a comma list ("1,16,64")."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{argument} must be a comma list of ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{argument} must list ints >= 1, got {text!r}")
    return values


def parse_memory(text: str) -> list[tuple[str, str]]:
    """Initiator:target memory kinds from "host:host,cuda:cuda" (a bare "host" means "host:host"; "all": 4 pairs)."""
    if text.strip() == "all":
        return list(itertools.product(KINDS, KINDS))
    pairs = []
    for part in text.split(","):
        sides = part.strip().split(":")
        if len(sides) == 1:
            sides = sides * 2
        if len(sides) != 2 or any(side not in KINDS for side in sides):
            raise ConfigError(f"memory must be initiator:target pairs of {KINDS} (or 'all'), got {part!r}")
        pairs.append((sides[0], sides[1]))
    return pairs


def expand(
    backends: Sequence[str],
    memory: Sequence[tuple[str, str]],
    ops: Sequence[str],
    sizes: Sequence[int],
    batches: Sequence[int],
    threads: Sequence[int],
) -> list[Case]:
    """Every combination, in the order a sweep runs them (fragment size innermost, so a plot line fills in order)."""
    for op in ops:
        if op not in OPS:
            raise ConfigError(f"op must be one of {OPS}, got {op!r}")
    return [
        Case(backend, initiator, target, op, size, batch, count)
        for backend in backends
        for initiator, target in memory
        for op in ops
        for batch in batches
        for count in threads
        for size in sizes
    ]


def sample_windows(
    case: Case, local: Sequence[np.ndarray], remote: Sequence[np.ndarray], samples: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Windows to check after a run: (initiator offsets, target offsets) int64[k] and the window width.

    The k fragments are drawn at random, and the window at a random place inside each (the same place on both
    sides, since fragment i of one side lands on fragment i of the other)."""
    local_all, remote_all = np.concatenate(local), np.concatenate(remote)
    rng = np.random.default_rng(seed)
    width = min(case.fragment, VERIFY_WINDOW)
    chosen = rng.choice(len(local_all), size=min(samples, len(local_all)), replace=False)
    inner = rng.integers(0, case.fragment - width + 1, size=len(chosen))
    return local_all[chosen] + inner, remote_all[chosen] + inner, width


class Pool:
    """One side's memory of one kind: uint8[nbytes] on the host (numpy) or on GPU ``device`` (cupy).

    Filled with seeded random bytes, never zero, so a transfer that moves nothing (or moves zeros) is caught.
    """

    def __init__(self, kind: str, nbytes: int, device: int = 0, seed: int = 0) -> None:
        if kind not in KINDS:
            raise ConfigError(f"memory kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.nbytes, self.device = kind, nbytes, device
        self.array: Array = device_random(nbytes, device, seed) if kind == "cuda" else _host_random(nbytes, seed)

    @property
    def label(self) -> str:
        """ "host" or "cuda:N"."""
        return "host" if self.kind == "host" else f"cuda:{self.device}"

    def _indices(self, offsets: np.ndarray, width: int) -> np.ndarray:
        return (np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(width, dtype=np.int64)[None, :]).ravel()

    def digest(self, offsets: Iterable[int], width: int) -> str:
        """blake2b of the windows ``[offsets[i], offsets[i] + width)`` in order (hex)."""
        index = self._indices(np.asarray(list(offsets), dtype=np.int64), width)
        if self.kind == "cuda":
            from ..devices import cupy_module

            cupy = cupy_module()
            with cupy.cuda.Device(self.device):
                data = cupy.asnumpy(self.array[cupy.asarray(index)])
        else:
            data = self.array[index]
        return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()

    def scramble(self, offsets: np.ndarray, width: int, seed: int) -> None:
        """Overwrite the windows with fresh random bytes (never zero), so a later check sees only new data."""
        index = self._indices(offsets, width)
        fresh = _host_random(len(index), seed)
        if self.kind == "cuda":
            from ..devices import cupy_module

            cupy = cupy_module()
            with cupy.cuda.Device(self.device):
                self.array[cupy.asarray(index)] = cupy.asarray(fresh)
                cupy.cuda.runtime.deviceSynchronize()
        else:
            self.array[index] = fresh


def device_random(nbytes: int, device: int, seed: int) -> Any:
    """uint8[nbytes] of random bytes, never zero, on GPU ``device`` (cupy), made in 64 MiB steps."""
    from ..devices import cupy_module

    cupy = cupy_module()
    with cupy.cuda.Device(device):
        data = cupy.full(nbytes, 0x5A, dtype=cupy.uint8)
        words = data[: nbytes // 4 * 4].view(cupy.uint32)
        state = cupy.random.RandomState(seed)
        step = 16 << 20
        for start in range(0, words.size, step):
            part = words[start : start + step]
            # uniform 32-bit words from float64 samples: random_sample takes a dtype on every cupy version
            part[:] = (state.random_sample(part.size, dtype=cupy.float64) * 4294967296.0).astype(cupy.uint32)
        data[data == 0] = 1
        return data


def use_device(kinds: Iterable[str], device: int) -> None:
    """Make GPU ``device`` current in this thread when a pool of ``kinds`` lives on it (backends post from here)."""
    if "cuda" in kinds:
        from ..devices import cupy_module

        cupy_module().cuda.Device(device).use()


def _host_random(nbytes: int, seed: int) -> np.ndarray:
    data = np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8).copy()
    data[data == 0] = 1
    return data
