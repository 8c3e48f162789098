"""What prefill and decode connectors tell each other: frozen dataclasses, sent as versioned msgpack.

How the bytes travel (a router, a queue, a test harness) is the caller's business. ``RankInfo`` introduces one
engine rank (once per peer group); ``KVReady`` says a prompt's K/V waits in the prefill ranks' blocks (pull mode);
``KVWanted`` says where a decode group wants it written (push mode). Decoding treats input as hostile: it checks
types and sizes and raises only :class:`~kvxfer.errors.HandshakeError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack

from ..errors import HandshakeError, KvxferError
from ..pipe.checksum import Checksums
from ..spec import KVCacheSpec
from .request import Request, SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Self

FORMAT_VERSION = 1
MAX_MESSAGE_NBYTES = 64 << 20


def spec_to_wire(spec: KVCacheSpec) -> dict[str, Any]:
    """A KVCacheSpec as a msgpack-friendly dict."""
    wire = dataclasses.asdict(spec)
    wire["layout"] = spec.layout.value
    wire["strides"] = None if spec.strides is None else list(spec.strides)
    return wire


def spec_from_wire(wire: Any) -> KVCacheSpec:
    """The inverse of :func:`spec_to_wire` (validated by KVCacheSpec itself)."""
    if not isinstance(wire, dict):
        raise HandshakeError(f"message: spec must be a map, got {type(wire).__name__}")
    names = {f.name for f in dataclasses.fields(KVCacheSpec)}
    if set(wire) != names:
        raise HandshakeError(f"message: spec fields must be {sorted(names)}, got {sorted(map(str, wire))}")
    values = dict(wire)
    if values["strides"] is not None:
        values["strides"] = tuple(values["strides"])
    try:
        return KVCacheSpec(**values)
    except (KvxferError, TypeError) as error:
        raise HandshakeError(f"message: invalid spec: {error}") from error


def request_to_wire(request: Request) -> list[Any]:
    sampling = dataclasses.asdict(request.sampling)
    sampling["stop_token_ids"] = list(request.sampling.stop_token_ids)
    return [request.request_id, list(request.prompt_token_ids), sampling, request.arrival_time]


def request_from_wire(wire: Any) -> Request:
    if not isinstance(wire, list) or len(wire) != 4 or not isinstance(wire[0], str) or not isinstance(wire[2], dict):
        raise HandshakeError("message: request must be [id, prompt token ids, sampling, arrival time]")
    request_id, prompt, sampling, arrival = wire
    try:
        params = SamplingParams(**{**sampling, "stop_token_ids": tuple(sampling.get("stop_token_ids", ()))})
        return Request(request_id, tuple(prompt), params, float(arrival))
    except (KvxferError, TypeError, ValueError) as error:
        raise HandshakeError(f"message: invalid request {request_id!r}: {error}") from error


class _Message:
    """Shared encode/decode: ``[kind, version, {field: value}]`` with per-field wire conversions."""

    KIND: ClassVar[str] = ""
    _TO_WIRE: ClassVar[dict[str, Any]] = {}
    _FROM_WIRE: ClassVar[dict[str, Any]] = {}
    #: Fields added after version 1: left off the wire while None, and None when a message lacks them (so older
    #: and newer peers of this format understand each other). Every other field is required, unknown ones refused.
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def encode(self) -> bytes:
        """Versioned msgpack bytes."""
        body = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if value is None and field.name in self._OPTIONAL:
                continue
            convert = self._TO_WIRE.get(field.name)
            body[field.name] = convert(value) if convert else list(value) if isinstance(value, tuple) else value
        return msgpack.packb([self.KIND, FORMAT_VERSION, body], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse :meth:`encode`'s bytes (HandshakeError when they are not a valid message of this kind)."""
        size = len(data) if isinstance(data, (bytes, bytearray)) else None
        if size is None or size > MAX_MESSAGE_NBYTES:
            raise HandshakeError(
                f"{cls.KIND}: expected bytes of at most {MAX_MESSAGE_NBYTES}, got {type(data).__name__} of {size} bytes"
            )
        try:
            kind, version, body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as error:
            raise HandshakeError(f"{cls.KIND}: undecodable message: {error}") from error
        if kind != cls.KIND or version != FORMAT_VERSION or not isinstance(body, dict):
            raise HandshakeError(
                f"{cls.KIND}: expected a {cls.KIND!r} message of version {FORMAT_VERSION}, got "
                f"{kind!r} version {version!r}"
            )
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if not set(names) - cls._OPTIONAL <= set(body) <= set(names):
            raise HandshakeError(
                f"{cls.KIND}: fields must be {sorted(names)} (optional: {sorted(cls._OPTIONAL)}), "
                f"got {sorted(map(str, body))}"
            )
        values = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.name not in body:
                continue  # an optional field: its default (None)
            value = body[field.name]
            convert = cls._FROM_WIRE.get(field.name)
            try:
                values[field.name] = convert(value) if convert else tuple(value) if isinstance(value, list) else value
            except (KvxferError, TypeError, ValueError) as error:  # a peer's field that no converter can read
                raise HandshakeError(f"{cls.KIND}: invalid field {field.name!r}: {error}") from error
        try:
            return cls(**values)
        except (KvxferError, TypeError, ValueError) as error:
            raise HandshakeError(f"{cls.KIND}: invalid message: {error}") from error


def _int_tuple(name: str) -> Any:
    def convert(value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise HandshakeError(f"message: {name} must be a list of ints >= 0")
        return tuple(value)

    return convert


def _checksum_tuple(value: Any) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, bytes) for v in value):
        raise HandshakeError("message: checksums must be a non-empty list of bytes (one per prefill rank)")
    for data in value:
        Checksums.decode(data)  # HandshakeError when malformed
    return tuple(value)


def _str_tuple(name: str) -> Any:
    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise HandshakeError(f"message: {name} must be a non-empty list of non-empty strings")
        return tuple(value)

    return convert


@dataclass(frozen=True)
class RankInfo(_Message):
    """One engine rank as the other side needs it: ``role`` ("prefill" or "decode"), its agent's name and
    :meth:`~kvxfer.Agent.metadata`, and its KV cache spec (which carries its TP rank and size)."""

    KIND: ClassVar[str] = "kvxfer-rank"
    _TO_WIRE: ClassVar[dict[str, Any]] = {"spec": spec_to_wire}
    _FROM_WIRE: ClassVar[dict[str, Any]] = {"spec": spec_from_wire}

    role: str
    agent_name: str
    metadata: bytes
    spec: KVCacheSpec

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode") or not isinstance(self.metadata, bytes):
            raise HandshakeError(
                f"RankInfo: role must be 'prefill' or 'decode' and metadata bytes, got "
                f"{self.role!r} and {type(self.metadata).__name__}"
            )


@dataclass(frozen=True)
class KVReady(_Message):
    """Prefill -> decode (pull mode): ``request``'s prompt K/V is in prefill blocks ``block_ids`` (token order,
    the same ids on every prefill rank), held under leases until the decode ranks release them or ``lease_ttl``
    seconds pass without a renewal. Decode rank ``r`` pulls with lease key ``lease_key + b"@<r>"``.
    ``prefill_agents`` are the prefill ranks' agent names in rank order. ``first_token`` was sampled by the
    prefill at ``first_token_time`` (``time.time()``); ``num_cached_tokens`` prompt tokens came from its prefix
    cache, ``num_computed_tokens`` were computed. ``checksums`` (verify mode, else None): per prefill rank, in rank
    order, the encoded :class:`~kvxfer.pipe.checksum.Checksums` of its heads of every prompt token in
    ``block_ids`` (one unit per prefill block); a decode rank verifies what it pulled against them."""

    KIND: ClassVar[str] = "kvxfer-kv-ready"
    _TO_WIRE: ClassVar[dict[str, Any]] = {"request": request_to_wire}
    _FROM_WIRE: ClassVar[dict[str, Any]] = {
        "request": request_from_wire,
        "block_ids": _int_tuple("block_ids"),
        "prefill_agents": _str_tuple("prefill_agents"),
        "checksums": _checksum_tuple,
    }
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"checksums"})

    request: Request
    first_token: int
    first_token_time: float
    block_ids: tuple[int, ...]
    prefill_agents: tuple[str, ...]
    lease_key: bytes
    lease_ttl: float
    num_cached_tokens: int = 0
    num_computed_tokens: int = 0
    checksums: tuple[bytes, ...] | None = None

    def __post_init__(self) -> None:
        if self.checksums is not None and (
            not isinstance(self.checksums, tuple)
            or len(self.checksums) != len(self.prefill_agents)
            or not all(isinstance(c, bytes) for c in self.checksums)
        ):
            raise HandshakeError(
                f"KVReady: checksums must be None or a tuple of bytes per prefill rank "
                f"({len(self.prefill_agents)}), got {self.checksums!r:.80}"
            )
        if not isinstance(self.lease_key, bytes) or not self.lease_key or not self.lease_ttl > 0:
            raise HandshakeError(
                f"KVReady: lease_key must be non-empty bytes and lease_ttl > 0, got "
                f"{self.lease_key!r}, {self.lease_ttl!r}"
            )
        prompt = len(self.request.prompt_token_ids)
        if not self.block_ids or len(self.block_ids) > prompt:
            raise HandshakeError(f"KVReady: {len(self.block_ids)} block ids for a prompt of {prompt} tokens")

    def lease_for(self, decode_rank: int) -> bytes:
        """The lease key decode rank ``decode_rank`` pulls under."""
        return lease_key_for(self.lease_key, decode_rank)


@dataclass(frozen=True)
class KVWanted(_Message):
    """Decode -> prefill (push mode): write prompt tokens ``start_token`` onwards of ``request`` into decode blocks
    ``block_ids`` (token order, same ids on every decode rank; the first ones may be scratch blocks that only
    align the range). ``decode_agents`` are the decode ranks' agent names in rank order."""

    KIND: ClassVar[str] = "kvxfer-kv-wanted"
    _TO_WIRE: ClassVar[dict[str, Any]] = {"request": request_to_wire}
    _FROM_WIRE: ClassVar[dict[str, Any]] = {
        "request": request_from_wire,
        "block_ids": _int_tuple("block_ids"),
        "decode_agents": _str_tuple("decode_agents"),
    }

    request: Request
    block_ids: tuple[int, ...]
    start_token: int
    decode_agents: tuple[str, ...]

    def __post_init__(self) -> None:
        prompt = len(self.request.prompt_token_ids)
        if not isinstance(self.start_token, int) or not 0 <= self.start_token < prompt or not self.block_ids:
            raise HandshakeError(
                f"KVWanted: start_token must lie in [0, {prompt}) with blocks to fill, got "
                f"{self.start_token!r} and {len(self.block_ids)} blocks"
            )


def lease_key_for(base: bytes, decode_rank: int) -> bytes:
    """Each decode rank holds its own lease on the prefill blocks, so one rank's release frees nothing early."""
    return base + b"@%d" % decode_rank
