"""Metadata authentication under a shared token: HMAC-SHA256 over the exact bytes, bound to a nonce and a time.

Two uses. The side channel (sidechannel.py): the client proves it holds the token by a MAC of its fresh nonce, and
the server answers with the metadata and a MAC of (that nonce, the metadata), so an answer cannot be forged or
replayed to another request, and the token never travels. Out of band: ``sign_metadata`` wraps metadata in an
envelope (magic, time, random nonce, MAC, metadata) that ``Agent.connect(meta, token=...)`` opens with
``open_metadata`` before a single byte of the metadata is decoded, refusing envelopes older than
``Limits.metadata_max_age``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time

from .errors import ConfigError, HandshakeError
from .nonces import NonceBook

NONCE_NBYTES = 16
MAC_NBYTES = 32
ENVELOPE_MAGIC = b"KVXS"
_ENVELOPE_HEAD = struct.Struct("!4sQ16s32s")  # magic, unix time in ns, nonce, MAC
_HELLO_DOMAIN = b"kvxfer-sidechannel-hello\0"
_REPLY_DOMAIN = b"kvxfer-sidechannel-metadata\0"
_ENVELOPE_DOMAIN = b"kvxfer-signed-metadata\0"
# A signer's clock may run a little ahead of ours.
_CLOCK_SKEW_NS = 60 * 10**9


def token_key(token: str | None) -> bytes:
    """The HMAC key of ``token`` (b"" for None: anyone can compute it, so it authenticates nothing)."""
    if token is None:
        return b""
    if not isinstance(token, str) or not token:
        raise ConfigError(f"token must be a non-empty string or None, got {type(token).__name__}")
    return token.encode()


def _mac(key: bytes, *parts: bytes) -> bytes:
    digest = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        digest.update(part)
    return digest.digest()


def hello_proof(key: bytes, nonce: bytes) -> bytes:
    """What a side-channel client sends to prove it holds the token, for its fresh ``nonce``."""
    return _mac(key, _HELLO_DOMAIN, nonce)


def reply_mac(key: bytes, nonce: bytes, metadata: bytes) -> bytes:
    """The MAC a side-channel server appends to ``metadata`` answering the client's ``nonce``."""
    return _mac(key, _REPLY_DOMAIN, nonce, struct.pack("!Q", len(metadata)), metadata)


def same(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two MACs."""
    return hmac.compare_digest(a, b)


def sign_metadata(metadata: bytes, token: str) -> bytes:
    """An envelope of ``metadata`` signed under ``token``, now, with a random nonce."""
    key = token_key(token)
    if not key:
        raise ConfigError("sign_metadata needs a token")
    if not isinstance(metadata, (bytes, bytearray)):
        raise ConfigError(f"metadata must be bytes, got {type(metadata).__name__}")
    stamp, nonce = time.time_ns(), os.urandom(NONCE_NBYTES)
    mac = _mac(key, _ENVELOPE_DOMAIN, struct.pack("!Q", stamp), nonce, bytes(metadata))
    return _ENVELOPE_HEAD.pack(ENVELOPE_MAGIC, stamp, nonce, mac) + bytes(metadata)


def is_envelope(data: object) -> bool:
    """True when ``data`` looks like a signed envelope (it still has to be opened)."""
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:4]) == ENVELOPE_MAGIC


def open_metadata(envelope: object, token: str, max_age: float, nonces: NonceBook | None = None) -> bytes:
    """The metadata inside ``envelope`` once its MAC under ``token`` and its age (<= ``max_age`` s) check out
    and, with ``nonces``, its nonce was never accepted before (each envelope connects once); HandshakeError
    otherwise."""
    key = token_key(token)
    if not key:
        raise ConfigError("open_metadata needs a token")
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise HandshakeError(f"signed metadata must be bytes, got {type(envelope).__name__}")
    data = bytes(envelope)
    if len(data) < _ENVELOPE_HEAD.size or data[:4] != ENVELOPE_MAGIC:
        raise HandshakeError(
            "metadata is not signed (a token was given, so only metadata signed under it is "
            "accepted: Agent.metadata(token=...))"
        )
    _, stamp, nonce, mac = _ENVELOPE_HEAD.unpack_from(data)
    metadata = data[_ENVELOPE_HEAD.size :]
    if not same(mac, _mac(key, _ENVELOPE_DOMAIN, struct.pack("!Q", stamp), nonce, metadata)):
        raise HandshakeError("signed metadata does not authenticate under this token")
    age_ns = time.time_ns() - stamp
    if age_ns > max_age * 1e9 or age_ns < -_CLOCK_SKEW_NS:
        raise HandshakeError(f"signed metadata is {age_ns / 1e9:.1f} s old; accepted: up to {max_age} s")
    why = nonces.refusal(nonce, stamp) if nonces is not None else None
    if why is not None:
        raise HandshakeError(f"signed metadata refused: {why}")
    return metadata
