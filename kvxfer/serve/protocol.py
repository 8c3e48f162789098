"""Router <-> worker control messages: frozen dataclasses, one msgpack map per zmq frame.

Every message is a map ``{"v": 1, "t": <type>, <fields>}``. :func:`decode` treats its input as hostile: it checks
the size (64 MiB for ``decode`` / ``prefilled`` which carry a KVReady, 1 MiB for the rest), the version, the type,
and every field's type and range, and raises only :class:`~kvxfer.errors.HandshakeError`. Unknown fields are
ignored (a newer peer may add some); missing required ones are refused. Importing this module needs msgpack only.

Worker -> router: Register, Load (every 0.25 s, also the heartbeat), Tokens (or TokensBatch: several Tokens in one
frame, one per request that progressed in a scheduling step), Prefilled, Error.
Router -> worker: Peers, Generate, Prefill, Decode, Abort, Shutdown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from ..errors import HandshakeError

VERSION = 1
MAX_MESSAGE_NBYTES = 64 << 20  # messages that carry KVReady bytes (decode, prefilled)
MAX_SMALL_NBYTES = 1 << 20  # everything else
MAX_NAME = 256
MAX_TOKENS_PER_MESSAGE = 1 << 20
MAX_ENTRIES = 4096  # peers, links, batch items
ROLES = ("prefill", "decode", "agg")
FINISH_REASONS = ("stop", "length", "abort", "error")

Check = Callable[[Any, str], Any]


def _fail(name: str, expected: str, value: Any) -> HandshakeError:
    return HandshakeError(
        f"control message: field {name!r} must be {expected}, got {type(value).__name__} {value!r:.60}"
    )


def _int(low: int = 0, high: int = (1 << 63) - 1) -> Check:
    def check(value: Any, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _fail(name, f"an int in [{low}, {high}]", value)
        return value

    return check


def _float(low: float = 0.0, high: float = float("inf")) -> Check:
    def check(value: Any, name: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise _fail(name, f"a number in [{low}, {high}]", value)
        return float(value)

    return check


def _str(max_len: int = MAX_NAME, choices: tuple[str, ...] = ()) -> Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= max_len or (choices and value not in choices):
            raise _fail(name, f"one of {choices}" if choices else f"a string of 1..{max_len} characters", value)
        return value

    return check


def _bytes(max_len: int) -> Check:
    def check(value: Any, name: str) -> bytes:
        if not isinstance(value, bytes) or not 0 < len(value) <= max_len:
            raise _fail(name, f"bytes of 1..{max_len}", value)
        return value

    return check


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value)
    return value


def _optional(inner: Check) -> Check:
    def check(value: Any, name: str) -> Any:
        return None if value is None else inner(value, name)

    return check


def _list(inner: Check, max_len: int, min_len: int = 0) -> Check:
    def check(value: Any, name: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
            raise _fail(name, f"a list of {min_len}..{max_len} items", value)
        return tuple(inner(item, f"{name}[]") for item in value)

    return check


def _map(inner: Check, max_len: int = 32) -> Check:
    def check(value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > max_len:
            raise _fail(name, f"a map of at most {max_len} entries", value)
        return {_str()(key, f"{name} key"): inner(item, f"{name}.{key}") for key, item in value.items()}

    return check


def _pair(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(name, "[bytes_per_s, latency_s]", value)
    return _float()(value[0], name), _float()(value[1], name)


def _nested(cls: type[_Body]) -> Check:
    def check(value: Any, name: str) -> Any:
        if not isinstance(value, dict):
            raise _fail(name, f"a {cls.__name__} map", value)
        return cls.from_wire(value)

    return check


class _Body:
    """Schema-driven conversion between a frozen dataclass and a msgpack map (``_SCHEMA``: field -> check)."""

    _SCHEMA: ClassVar[dict[str, Check]] = {}

    def to_wire(self) -> dict[str, Any]:
        return {name: _to_wire(getattr(self, name)) for name in self._SCHEMA}  # the schema names every field

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Any:
        values: dict[str, Any] = {}
        defaults = {
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        for name, check in cls._SCHEMA.items():
            if name not in wire:
                if name in defaults:
                    continue
                raise HandshakeError(f"control message {cls.__name__}: missing field {name!r}")
            values[name] = check(wire[name], name)
        return cls(**values)


def _to_wire(value: Any) -> Any:
    if isinstance(value, (int, float, str, bytes)) or value is None:
        return value
    if isinstance(value, _Body):
        return value.to_wire()
    if isinstance(value, (list, tuple)):
        if not value or isinstance(value[0], (int, bytes)):  # token ids, rank infos: flat
            return list(value)
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Sampling(_Body):
    """Sampling parameters (the engine's SamplingParams without torch): greedy when ``temperature`` is 0."""

    _SCHEMA: ClassVar[dict[str, Check]] = {
        "max_tokens": _int(1, 1 << 20),
        "temperature": _float(0.0, 100.0),
        "top_p": _float(1e-9, 1.0),
        "seed": _optional(_int(0, (1 << 63) - 1)),
        "stop_token_ids": _list(_int(), 1024),
        "ignore_eos": _bool,
        "min_tokens": _int(0, 1 << 20),
    }

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class PeerInfo(_Body):
    """A worker as the others need it: its name, role and one encoded RankInfo per TP rank."""

    _SCHEMA: ClassVar[dict[str, Check]] = {
        "name": _str(),
        "role": _str(choices=ROLES),
        "rank_info": _list(_bytes(MAX_SMALL_NBYTES), 64),
    }  # agg: none
    name: str
    role: str
    rank_info: tuple[bytes, ...]


class Message(_Body):
    """A control message; ``TYPE`` is its ``"t"``."""

    TYPE: ClassVar[str] = ""
    MAX_NBYTES: ClassVar[int] = MAX_SMALL_NBYTES

    def encode(self) -> bytes:
        """The frame: msgpack ``{"v": 1, "t": TYPE, ...fields}``."""
        return msgpack.packb({"v": VERSION, "t": self.TYPE, **self.to_wire()}, use_bin_type=True)


_RID = _str(MAX_NAME)
_TOKENS = _list(_int(0, (1 << 31) - 1), MAX_TOKENS_PER_MESSAGE)
_PROMPT = _list(_int(0, (1 << 31) - 1), MAX_TOKENS_PER_MESSAGE, 1)
_TIMING = _optional(_map(_float(0.0), 32))
_KV_READY = _bytes(MAX_MESSAGE_NBYTES - 4096)
# Shared by Generate, Prefill and Decode (module-level so the subclasses need not read another class's _SCHEMA).
_GENERATE_SCHEMA: dict[str, Check] = {
    "rid": _RID,
    "prompt_token_ids": _PROMPT,
    "sampling": _nested(Sampling),
    "deadline_s": _float(),
}


@dataclass(frozen=True)
class Register(Message):
    TYPE: ClassVar[str] = "register"
    _SCHEMA: ClassVar[dict[str, Check]] = {
        "name": _str(),
        "role": _str(choices=ROLES),
        "model": _str(),
        "block_size": _int(1, 1 << 20),
        "num_blocks": _int(1, 1 << 40),
        "kv_bytes_per_token": _int(1, 1 << 40),
        "rank_info": _list(_bytes(MAX_SMALL_NBYTES // 2), 64),
        "max_batch": _int(1, 1 << 20),
        "device": _str(),
    }
    name: str
    role: str
    model: str
    block_size: int
    num_blocks: int
    kv_bytes_per_token: int
    rank_info: tuple[bytes, ...]
    max_batch: int
    device: str


@dataclass(frozen=True)
class Load(Message):
    """Heartbeat + load. ``links``: peer worker name -> (bytes_per_s, latency_s) measured by this worker's pulls."""

    TYPE: ClassVar[str] = "load"
    _SCHEMA: ClassVar[dict[str, Check]] = {
        "free_blocks": _int(),
        "active_blocks": _int(),
        "running": _int(),
        "waiting": _int(),
        "queued_prefill_tokens": _int(),
        "prefill_tokens_per_s": _float(),
        "decode_tokens_per_s": _float(),
        "links": _map(_pair, MAX_ENTRIES),
    }
    free_blocks: int
    active_blocks: int
    running: int
    waiting: int
    queued_prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    links: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Tokens(Message):
    """New output tokens of ``rid`` (possibly none, with a finish). ``timing`` rides on the first tokens:
    queue_s, prefill_s, transfer_s, kv_bytes, first_step_s (seconds; kv_bytes a count)."""

    TYPE: ClassVar[str] = "tokens"
    _SCHEMA: ClassVar[dict[str, Check]] = {
        "rid": _RID,
        "token_ids": _TOKENS,
        "finish": _optional(_str(choices=FINISH_REASONS)),
        "timing": _TIMING,
    }
    rid: str
    token_ids: tuple[int, ...]
    finish: str | None = None
    timing: dict[str, float] | None = None


@dataclass(frozen=True)
class TokensBatch(Message):
    """Several Tokens in one frame (what a worker sends per scheduling step); :class:`kvxfer.serve.control.RouterLink`
    hands them to the router one by one."""

    TYPE: ClassVar[str] = "tokens_batch"
    _SCHEMA: ClassVar[dict[str, Check]] = {"items": _list(_nested(Tokens), MAX_ENTRIES, 1)}
    items: tuple[Tokens, ...]


@dataclass(frozen=True)
class Prefilled(Message):
    TYPE: ClassVar[str] = "prefilled"
    MAX_NBYTES: ClassVar[int] = MAX_MESSAGE_NBYTES
    _SCHEMA: ClassVar[dict[str, Check]] = {
        "rid": _RID,
        "kv_ready": _KV_READY,
        "first_token": _int(0, (1 << 31) - 1),
        "timing": _TIMING,
    }
    rid: str
    kv_ready: bytes
    first_token: int
    timing: dict[str, float] | None = None


@dataclass(frozen=True)
class Error(Message):
    """A request failed on this worker (codes: "bad_request", "overloaded", "transfer", "deadline", "internal",
    "unknown_peer", "draining")."""

    TYPE: ClassVar[str] = "error"
    _SCHEMA: ClassVar[dict[str, Check]] = {"rid": _RID, "code": _str(64), "message": _str(4096)}
    rid: str
    code: str
    message: str


@dataclass(frozen=True)
class Peers(Message):
    TYPE: ClassVar[str] = "peers"
    _SCHEMA: ClassVar[dict[str, Check]] = {"peers": _list(_nested(PeerInfo), MAX_ENTRIES)}
    peers: tuple[PeerInfo, ...]


@dataclass(frozen=True)
class Generate(Message):
    TYPE: ClassVar[str] = "generate"
    _SCHEMA: ClassVar[dict[str, Check]] = _GENERATE_SCHEMA
    rid: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    deadline_s: float


@dataclass(frozen=True)
class Prefill(Message):
    TYPE: ClassVar[str] = "prefill"
    _SCHEMA: ClassVar[dict[str, Check]] = {**_GENERATE_SCHEMA, "decode": _str()}
    rid: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    decode: str
    deadline_s: float


@dataclass(frozen=True)
class Decode(Message):
    TYPE: ClassVar[str] = "decode"
    MAX_NBYTES: ClassVar[int] = MAX_MESSAGE_NBYTES
    _SCHEMA: ClassVar[dict[str, Check]] = {
        **_GENERATE_SCHEMA,
        "kv_ready": _KV_READY,
        "first_token": _int(0, (1 << 31) - 1),
    }
    rid: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling
    kv_ready: bytes
    first_token: int
    deadline_s: float


@dataclass(frozen=True)
class Abort(Message):
    TYPE: ClassVar[str] = "abort"
    _SCHEMA: ClassVar[dict[str, Check]] = {"rid": _RID}
    rid: str


@dataclass(frozen=True)
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"
    _SCHEMA: ClassVar[dict[str, Check]] = {"drain_s": _float(0.0, 3600.0)}
    drain_s: float = 10.0


AnyMessage = (
    Register | Load | Tokens | TokensBatch | Prefilled | Error | Peers | Generate | Prefill | Decode | Abort | Shutdown
)
TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Load,
        Tokens,
        TokensBatch,
        Prefilled,
        Error,
        Peers,
        Generate,
        Prefill,
        Decode,
        Abort,
        Shutdown,
    )
}


def decode(frame: bytes) -> AnyMessage:
    """Parse one frame into its message (HandshakeError, never anything else, when it is not a valid one)."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise HandshakeError(f"control message: expected bytes, got {type(frame).__name__}")
    size = len(frame)
    if size > MAX_MESSAGE_NBYTES:
        raise HandshakeError(f"control message: {size} bytes exceed the cap of {MAX_MESSAGE_NBYTES}")
    try:
        body = msgpack.unpackb(
            bytes(frame),
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE_NBYTES,
            max_str_len=MAX_SMALL_NBYTES,
            max_array_len=MAX_TOKENS_PER_MESSAGE,
            max_map_len=MAX_ENTRIES,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises many types (ValueError, ExtraData, StackError, ...): all mean bad
        raise HandshakeError(f"control message: undecodable msgpack: {type(error).__name__}: {error}") from error
    if not isinstance(body, dict) or body.get("v") != VERSION:
        version = body.get("v") if isinstance(body, dict) else None
        raise HandshakeError(
            f"control message: expected a map with v={VERSION}, got {type(body).__name__} v={version!r:.20}"
        )
    kind = body.get("t")
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise HandshakeError(f"control message: unknown type {kind!r:.40}; known: {sorted(TYPES)}")
    if size > cls.MAX_NBYTES:
        raise HandshakeError(f"control message {cls.TYPE!r}: {size} bytes exceed its cap of {cls.MAX_NBYTES}")
    try:
        return cls.from_wire(body)  # type: ignore[no-any-return]
    except (TypeError, ValueError, RecursionError) as error:
        raise HandshakeError(f"control message {cls.TYPE!r}: invalid: {error}") from error
