"""Agent metadata: what a peer needs to reach this agent's regions. Versioned msgpack, decoded strictly.

The decoder treats its input as hostile: it caps the total size and every string, list and map, checks every
type, and raises nothing but :class:`~kvxfer.errors.HandshakeError`. No pickle, no code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import HandshakeError
from .memory import MemoryKind

MAGIC = "kvxfer"
FORMAT_VERSION = 1
MAX_METADATA_NBYTES = 4 << 20
MAX_REGIONS = 65536
MAX_NAME_CHARS = 256
MAX_KEY_NBYTES = 64 << 10


@dataclass(frozen=True)
class RegionMeta:
    """One registered region as peers see it; ``keys`` maps backend wire name to its public key."""

    name: str
    index: int
    addr: int
    nbytes: int
    kind: MemoryKind
    device: int
    keys: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentMetadata:
    """Everything :meth:`Agent.metadata` publishes. ``backends`` maps wire name to agent-level public info."""

    name: str
    uid: str
    host_id: str
    pid: int
    compat: str
    backends: dict[str, bytes]
    regions: tuple[RegionMeta, ...]
    listen: str | None = None
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        """The versioned msgpack bytes of this metadata."""
        regions = [[r.name, r.index, r.addr, r.nbytes, r.kind.value, r.device, r.keys] for r in self.regions]
        body = {
            "name": self.name,
            "uid": self.uid,
            "host": self.host_id,
            "pid": self.pid,
            "compat": self.compat,
            "backends": self.backends,
            "regions": regions,
            "listen": self.listen,
        }
        data = msgpack.packb([MAGIC, self.version, body], use_bin_type=True)
        if len(data) > MAX_METADATA_NBYTES:
            raise HandshakeError(f"metadata of {len(data)} bytes exceeds the {MAX_METADATA_NBYTES}-byte cap")
        return data

    @classmethod
    def decode(cls, data: Any, max_nbytes: int = MAX_METADATA_NBYTES) -> AgentMetadata:
        """Parse and check ``data``; raises HandshakeError for anything but well-formed current metadata."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise HandshakeError(f"metadata must be bytes, got {type(data).__name__}")
        if len(data) > max_nbytes:
            raise HandshakeError(f"metadata of {len(data)} bytes exceeds the {max_nbytes}-byte cap")
        try:
            document = msgpack.unpackb(
                bytes(data),
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=MAX_KEY_NBYTES,
                max_bin_len=MAX_KEY_NBYTES,
                max_array_len=MAX_REGIONS,
                max_map_len=1024,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.exceptions.UnpackException) as error:
            # msgpack signals malformed input with ValueError (FormatError, StackError, ExtraData, bad UTF-8, a
            # limit exceeded), UnpackException (OutOfData, BufferFull) or TypeError
            raise HandshakeError(f"metadata is not valid msgpack: {type(error).__name__}: {error}") from None
        try:
            return _parse(document)
        except HandshakeError:
            raise
        except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as error:
            # defensive: a shape the checks below did not foresee (e.g. sorting mixed str/bytes keys) is bad input
            raise HandshakeError(f"metadata is malformed: {type(error).__name__}: {error}") from None


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HandshakeError(f"metadata field {what} has type {type(value).__name__}")
    return value


def _name(value: Any, what: str) -> str:
    _expect(value, str, what)
    if len(value) > MAX_NAME_CHARS:
        raise HandshakeError(f"metadata field {what} is longer than {MAX_NAME_CHARS} characters")
    return value


def _uint(value: Any, what: str, upper: int = 2**64) -> int:
    _expect(value, int, what)
    if not 0 <= value < upper:
        raise HandshakeError(f"metadata field {what} = {value} is out of range")
    return value


def _keys(value: Any, what: str) -> dict[str, bytes]:
    _expect(value, dict, what)
    for key, blob in value.items():
        _name(key, f"{what} key")
        _expect(blob, bytes, f"{what}[{key!r}]")
    return value


def _parse(document: Any) -> AgentMetadata:
    _expect(document, list, "top level")
    if len(document) != 3 or document[0] != MAGIC:
        raise HandshakeError("metadata does not start with the kvxfer magic")
    version = _expect(document[1], int, "version")
    if version != FORMAT_VERSION:
        raise HandshakeError(
            f"metadata format version {version} is not supported (this kvxfer speaks {FORMAT_VERSION})"
        )
    body = _expect(document[2], dict, "body")
    expected = {"name", "uid", "host", "pid", "compat", "backends", "regions", "listen"}
    if set(body) != expected:
        raise HandshakeError(f"metadata body has fields {sorted(body)}, expected {sorted(expected)}")
    regions = []
    for i, entry in enumerate(_expect(body["regions"], list, "regions")):
        _expect(entry, list, f"regions[{i}]")
        if len(entry) != 7:
            raise HandshakeError(f"metadata regions[{i}] has {len(entry)} fields, expected 7")
        name, index, addr, nbytes, kind, device, keys = entry
        try:
            memory_kind = MemoryKind(_expect(kind, str, f"regions[{i}].kind"))
        except ValueError:
            raise HandshakeError(f"metadata regions[{i}].kind {kind!r} is unknown") from None
        _expect(device, int, f"regions[{i}].device")
        if not -1 <= device < 1 << 16:
            raise HandshakeError(f"metadata regions[{i}].device = {device} is out of range")
        addr, nbytes = _uint(addr, f"regions[{i}].addr"), _uint(nbytes, f"regions[{i}].nbytes")
        if nbytes == 0 or addr + nbytes > 2**64:
            raise HandshakeError(f"metadata regions[{i}] span [{addr}, +{nbytes}) is invalid")
        _uint(index, f"regions[{i}].index", 2**31)
        regions.append(
            RegionMeta(
                _name(name, f"regions[{i}].name"),
                index,
                addr,
                nbytes,
                memory_kind,
                device,
                _keys(keys, f"regions[{i}].keys"),
            )
        )
    names, indices = [r.name for r in regions], [r.index for r in regions]
    if len(names) != len(set(names)) or len(indices) != len(set(indices)):
        raise HandshakeError("metadata lists one region name or index twice")
    listen = body["listen"]
    if listen is not None:
        _name(listen, "listen")
    return AgentMetadata(
        name=_name(body["name"], "name"),
        uid=_name(body["uid"], "uid"),
        host_id=_name(body["host"], "host"),
        pid=_uint(body["pid"], "pid", 2**32),
        compat=_name(body["compat"], "compat"),
        backends=_keys(body["backends"], "backends"),
        regions=tuple(regions),
        listen=listen,
        version=version,
    )
