"""What the UCX backend puts on the wire: its metadata blob and its control messages. Fixed binary layouts
(``struct`` and numpy views), no msgpack, no pickle; every decoder checks sizes before reading.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from ...errors import HandshakeError

INFO_MAGIC = b"KVXU"
INFO_VERSION = 2
# magic, version, error policy, flags, probe address, probe token, export table address, digest
_INFO = struct.Struct("<4sBBHQ16sQ16s")
FLAG_ONE_SIDED = 1  # same-host peers of our uid may write/read our exported regions one-sidedly (exports.py)
MAX_WORKER_ADDRESS = 16 << 10

MESSAGE_MAGIC = b"KX"
MESSAGE_VERSION = 1
_HEADER = struct.Struct("<2sBBQII")  # magic, version, kind, transfer id, chunk index, descriptor count
MAX_TAIL = 1024
_DESC_NBYTES = 20  # addr u64 + nbytes u64 + region i32
MAX_CHUNK_FRAGMENTS = 1 << 16  # descriptors per staged chunk

ERROR_POLICIES = ("auto", "peer", "none")


def keys_digest(address: bytes, keys: list[tuple[int, bytes]]) -> bytes:
    """16-byte digest of a worker address and the (region index, packed rkey) pairs, sorted by index. Bytes that
    reach libucp (ucp_ep_create, ucp_ep_rkey_unpack) must match it: a bit flipped or a key truncated on the way
    is refused before UCX parses it (UCX aborts or crashes on some; it validates none). Forgery is the metadata
    signature's job (kvxfer.signature): this digest is not keyed."""
    hasher = hashlib.blake2b(address, digest_size=16, person=b"kvxfer-ucx-keys")
    for index, packed in sorted(keys):
        hasher.update(struct.pack("<iI", index, len(packed)))
        hasher.update(packed)
    return hasher.digest()


@dataclass(frozen=True)
class WorkerInfo:
    """The backend's public blob: its worker address, error-mode policy, a token peers on this host read
    through cross-memory attach to prove that our pid is theirs to reach (``probe_addr`` holds ``token``), whether
    such peers may move bytes one-sidedly (``one_sided``), where our export table is (exports.py), and the
    digest of the address and our packed rkeys (:func:`keys_digest`)."""

    address: bytes
    error_policy: str
    probe_addr: int
    token: bytes
    one_sided: bool = True
    exports_addr: int = 0
    digest: bytes = bytes(16)

    def encode(self) -> bytes:
        """The bytes for the agent metadata."""
        return (
            _INFO.pack(
                INFO_MAGIC,
                INFO_VERSION,
                ERROR_POLICIES.index(self.error_policy),
                FLAG_ONE_SIDED if self.one_sided else 0,
                self.probe_addr,
                self.token,
                self.exports_addr,
                self.digest,
            )
            + self.address
        )

    @classmethod
    def decode(cls, data: bytes, peer_name: str) -> WorkerInfo:
        """Parse a peer's blob; HandshakeError if it is not one."""
        if len(data) <= _INFO.size or len(data) > _INFO.size + MAX_WORKER_ADDRESS:
            raise HandshakeError(f"peer {peer_name!r}: UCX info of {len(data)} bytes is malformed", peer_name)
        magic, version, policy, flags, probe_addr, token, exports_addr, digest = _INFO.unpack_from(data)
        if magic != INFO_MAGIC or version != INFO_VERSION or policy >= len(ERROR_POLICIES) or flags & ~FLAG_ONE_SIDED:
            raise HandshakeError(
                f"peer {peer_name!r}: UCX info has magic {magic!r} version {version} policy "
                f"{policy} flags {flags:#x}; expected {INFO_MAGIC!r} version {INFO_VERSION}",
                peer_name,
            )
        return cls(
            bytes(data[_INFO.size :]),
            ERROR_POLICIES[policy],
            probe_addr,
            token,
            bool(flags & FLAG_ONE_SIDED),
            exports_addr,
            digest,
        )

    def verify(self, keys: list[tuple[int, bytes]], peer_name: str) -> None:
        """HandshakeError unless our address and the peer's packed rkeys ``keys`` match :attr:`digest`."""
        if keys_digest(self.address, keys) != self.digest:
            raise HandshakeError(
                f"peer {peer_name!r}: its UCX worker address or remote keys do not match the digest "
                "in its UCX info (corrupted or altered metadata): refused before UCX sees them",
                peer_name,
            )


class Kind(IntEnum):
    """Control message kinds (one active-message id carries them all)."""

    NOTIFY = 1  # tail: sender agent name; payload: the notification
    SCATTER = 2  # payload: descriptors + bytes to write at them; answered by ACK or FAIL
    ACK = 3
    GATHER = 4  # payload: descriptors to read; answered by DATA or FAIL
    DATA = 5  # payload: the bytes gathered
    FAIL = 6  # payload: utf-8 reason
    DSCATTER = 7  # payload: descriptors (CUDA) + stage record; the target reserves a slot and answers GRANT
    DGATHER = 8  # payload: descriptors (CUDA) + stage record; the target gathers, puts into the slot; DATA
    GRANT = 9  # payload: the target's stage record: put the chunk there, then send DCOMMIT
    DCOMMIT = 10  # payload: the requester's stage record; the target scatters its granted slot; ACK
    SCATTER_SPAN = 11  # tail: one descriptor; payload: its bytes, received straight into it; ACK or FAIL
    GATHER_SPAN = 12  # tail: one descriptor; answered by DATA (received straight into the requester's span) or FAIL


@dataclass(frozen=True)
class Header:
    """A control message header; ``tail`` carries the sender's name on NOTIFY."""

    kind: Kind
    transfer: int = 0
    chunk: int = 0
    count: int = 0
    tail: bytes = b""

    def encode(self) -> bytes:
        """Header bytes (at most 20 + MAX_TAIL)."""
        return (
            _HEADER.pack(MESSAGE_MAGIC, MESSAGE_VERSION, int(self.kind), self.transfer, self.chunk, self.count)
            + self.tail[:MAX_TAIL]
        )

    @classmethod
    def decode(cls, data: bytes) -> Header | None:
        """The header, or None if ``data`` is not one of ours (dropped by the caller)."""
        if len(data) < _HEADER.size or len(data) > _HEADER.size + MAX_TAIL:
            return None
        magic, version, kind, transfer, chunk, count = _HEADER.unpack_from(data)
        if magic != MESSAGE_MAGIC or version != MESSAGE_VERSION or kind not in Kind._value2member_map_:
            return None
        return cls(Kind(kind), transfer, chunk, count, bytes(data[_HEADER.size :]))


_STAGE = struct.Struct("<QIBH")  # slot address, packed rkey length, peer error mode, worker address length
MAX_RKEY = 64 << 10


@dataclass(frozen=True)
class Stage:
    """Where a device staged chunk's requester slot is, its packed remote key, and how to reach the requester:
    its worker address and the error mode its link uses (both ends of an endpoint pair must agree)."""

    slot: int
    rkey: bytes
    peer_mode: bool
    address: bytes

    def pack(self) -> np.ndarray:
        """The record's bytes (they follow the descriptors in DSCATTER / DGATHER)."""
        head = _STAGE.pack(self.slot, len(self.rkey), int(self.peer_mode), len(self.address))
        return np.frombuffer(head + self.rkey + self.address, dtype=np.uint8)

    @classmethod
    def unpack(cls, rest: np.ndarray) -> Stage:
        """The record from the bytes after the descriptors; ValueError if malformed."""
        if rest.size < _STAGE.size:
            raise ValueError(f"stage record of {rest.size} bytes is too short")
        slot, rkey_length, mode, address_length = _STAGE.unpack(rest[: _STAGE.size].tobytes())
        if (
            not 0 < rkey_length <= MAX_RKEY
            or not 0 < address_length <= MAX_WORKER_ADDRESS
            or mode > 1
            or rest.size != _STAGE.size + rkey_length + address_length
        ):
            raise ValueError(
                f"stage record of {rest.size} bytes says key {rkey_length}, address {address_length} bytes, mode {mode}"
            )
        body = rest[_STAGE.size :].tobytes()
        return cls(slot, body[:rkey_length], bool(mode), body[rkey_length:])


_SPAN = struct.Struct("<QQi")


def pack_span(addr: int, nbytes: int, region: int) -> bytes:
    """One descriptor for a header tail (SCATTER_SPAN / GATHER_SPAN)."""
    return _SPAN.pack(addr, nbytes, region)


def unpack_span(tail: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(addr uint64[1], nbytes uint64[1], region int32[1]) from a header tail; ValueError if it is not one."""
    if len(tail) != _SPAN.size:
        raise ValueError(f"a span descriptor of {len(tail)} bytes (expected {_SPAN.size})")
    addr, nbytes, region = _SPAN.unpack(tail)
    return (np.array([addr], dtype=np.uint64), np.array([nbytes], dtype=np.uint64), np.array([region], dtype=np.int32))


def descs_nbytes(count: int) -> int:
    """Bytes that :func:`pack_descs` writes for ``count`` descriptors (padded to 8 so data after it is aligned)."""
    return (count * _DESC_NBYTES + 7) & ~7


def pack_descs(out: np.ndarray, addr: np.ndarray, nbytes: np.ndarray, region: np.ndarray) -> int:
    """Write descriptors (uint64[n], uint64[n], int32[n]) at the start of ``out`` (uint8, host); returns bytes
    used."""
    n = len(addr)
    out[: n * 8].view(np.uint64)[:] = addr
    out[n * 8 : n * 16].view(np.uint64)[:] = nbytes
    out[n * 16 : n * 20].view(np.int32)[:] = region
    return descs_nbytes(n)


def unpack_descs(payload: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(addr uint64[n], nbytes uint64[n], region int32[n], rest uint8[...]) read from ``payload`` (uint8, host).

    Raises ValueError if the payload is too short for ``count`` descriptors.
    """
    used = descs_nbytes(count)
    if count < 0 or payload.size < used:
        raise ValueError(f"payload of {payload.size} bytes is too short for {count} descriptors")
    head = payload[: count * 20]
    addr = np.frombuffer(head[: count * 8].tobytes(), dtype=np.uint64)
    nbytes = np.frombuffer(head[count * 8 : count * 16].tobytes(), dtype=np.uint64)
    region = np.frombuffer(head[count * 16 : count * 20].tobytes(), dtype=np.int32)
    return addr, nbytes, region, payload[used:]


_NAME = struct.Struct("<H")
_NAME_MAX = 1024
#: Bytes a NOTIFY payload may carry besides the notification itself (the sender's name and its length).
NOTIFY_OVERHEAD = _NAME.size + _NAME_MAX


def pack_notification(sender: str, payload: bytes) -> bytes:
    """NOTIFY payload: u16 name length, the sender's agent name (utf-8, at most 1024 bytes), the notification."""
    name = sender.encode()[:_NAME_MAX]
    return _NAME.pack(len(name)) + name + payload


def unpack_notification(data: Any) -> tuple[str, bytes]:
    """(sender name, payload) from a NOTIFY payload; ValueError if malformed."""
    raw = bytes(data)
    if len(raw) < _NAME.size:
        raise ValueError("notification shorter than its name length")
    (length,) = _NAME.unpack_from(raw)
    if _NAME.size + length > len(raw):
        raise ValueError("notification name runs past its end")
    return raw[_NAME.size : _NAME.size + length].decode(errors="replace"), raw[_NAME.size + length :]
