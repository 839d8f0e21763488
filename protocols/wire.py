"""The signed wire envelope, version 1 (specified byte for byte in docs/wire.md).

A frame on the wire is a msgpack array of two ``bin`` items::

    frame     = [payload: bin, signature: bin(64)]
    signature = Ed25519(sender_key, DOMAIN + payload)
    payload   = msgpack map {version, type, sender, community, session, seq, time_ms, body}

The signature covers the exact payload bytes sent; a verifier never re-encodes.
Decoding is strict (exact key set, no duplicate keys, no ext types, no trailing bytes,
size cap) so two verifiers cannot read one frame differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.errors import (
    DecodeError,
    ReplayError,
    SignatureError,
    UnknownSenderError,
    WrongContextError,
)
from wattmesh.protocols.identity import PEER_ID_PATTERN, Roster, check_peer_id

__all__ = [
    "DOMAIN",
    "MAX_FRAME_BYTES",
    "VERSION",
    "Envelope",
    "Verifier",
    "encode",
    "peek_sender",
    "unpack_strict",
]

VERSION = 1
DOMAIN = b"wattmesh/v1\x00"
"""Domain-separation prefix: a wattmesh signature can never be valid in another protocol."""
MAX_FRAME_BYTES = 256 * 1024
_SIGNATURE_BYTES = 64
_FIELDS = ("version", "type", "sender", "community", "session", "seq", "time_ms", "body")
_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_.]{0,31}\Z")  # \Z: "$" would accept a final "\n"
_SESSION_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
_MAX_SEQ = 2**63 - 1
_MAX_BODY_DEPTH = 32  # nested maps/arrays, the body map counting as 1; bounds recursion


@dataclass(frozen=True, slots=True)
class Envelope:
    """One verified message. ``body`` is the mechanism's own map."""

    type: str
    sender: str
    community: str
    session: str
    seq: int
    time_ms: int
    body: Mapping[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise ValueError(f"unsupported version {self.version}")
        if not _TYPE_PATTERN.match(self.type):
            raise ValueError(f"message type {self.type!r} must match {_TYPE_PATTERN.pattern}")
        check_peer_id(self.sender, what="sender")
        check_peer_id(self.community, what="community")
        if not _SESSION_PATTERN.match(self.session):
            raise ValueError(f"session {self.session!r} must match {_SESSION_PATTERN.pattern}")
        if not 1 <= self.seq <= _MAX_SEQ:
            raise ValueError("seq must be in 1 .. 2**63-1")
        if not isinstance(self.body, Mapping):
            raise ValueError("body must be a map")


def encode(envelope: Envelope, key: Ed25519PrivateKey) -> bytes:
    """Serialize and sign ``envelope`` with the sender's private key.

    Raises:
        ValueError: the body holds a value msgpack cannot carry, or the frame is too big.
    """
    payload_map = {name: getattr(envelope, name) for name in _FIELDS}
    payload_map["body"] = dict(envelope.body)
    try:  # refuse to sign what every receiver would drop
        _check_body(payload_map["body"])
    except DecodeError as exc:
        raise ValueError(f"body cannot be encoded: {exc.detail}") from None
    try:
        payload = msgpack.packb(payload_map, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"body cannot be encoded: {exc}") from exc
    signature = key.sign(DOMAIN + payload)
    frame: bytes = msgpack.packb([payload, signature], use_bin_type=True)
    if len(frame) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    return frame


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DecodeError("duplicate map key")
    return result


def unpack_strict(data: bytes, what: str) -> Any:
    """msgpack-decode with the envelope's rules: no duplicate keys, str map keys, no ext types.

    Raises:
        DecodeError: naming ``what`` when the bytes are not such msgpack.
    """
    return _unpack(data, what)


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_unique_keys,
            ext_hook=_no_ext,
            use_list=True,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on hostile input
        raise DecodeError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _split_frame(frame: bytes) -> tuple[bytes, bytes]:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise DecodeError("frame must be bytes")
    if len(frame) > MAX_FRAME_BYTES:
        raise DecodeError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    outer = _unpack(bytes(frame), "frame")
    if (
        not isinstance(outer, list)
        or len(outer) != 2
        or not isinstance(outer[0], bytes)
        or not isinstance(outer[1], bytes)
    ):
        raise DecodeError("frame must be a msgpack array [payload: bin, signature: bin]")
    payload, signature = outer
    if len(signature) != _SIGNATURE_BYTES:
        raise DecodeError("signature must be 64 bytes")
    return payload, signature


def _parse_payload(payload: bytes) -> Envelope:
    fields = _unpack(payload, "payload")
    if not isinstance(fields, dict) or set(fields) != set(_FIELDS):
        raise DecodeError(f"payload must be a map with exactly the keys {', '.join(_FIELDS)}")
    checks = {
        "version": int, "type": str, "sender": str, "community": str,
        "session": str, "seq": int, "time_ms": int, "body": dict,
    }  # fmt: skip
    for name, kind in checks.items():
        value = fields[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DecodeError(f"field {name!r} must be {kind.__name__}")
    if fields["version"] != VERSION:
        raise DecodeError(f"unsupported version {fields['version']}")
    _check_body(fields["body"])
    try:
        return Envelope(**fields)
    except ValueError as exc:
        raise DecodeError(str(exc)) from None


def _check_body(value: Any, depth: int = 1) -> None:
    """Reject body content no mechanism can act on (docs/wire.md §6).

    NaN and infinities; map keys other than str; nesting deeper than _MAX_BODY_DEPTH
    (msgpack itself unpacks ~1000 levels, which used to end in RecursionError here);
    the timestamp ext type, which msgpack decodes without ever calling ``ext_hook``.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError("non-finite number in body")
    elif isinstance(value, msgpack.Timestamp):  # ext type -1 never reaches ext_hook
        raise DecodeError("msgpack ext type -1 (timestamp) is not allowed")
    elif isinstance(value, dict | list | tuple):  # tuples only on the encode side
        if depth > _MAX_BODY_DEPTH:
            raise DecodeError(f"body nested deeper than {_MAX_BODY_DEPTH} levels")
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise DecodeError("map keys in body must be str")
            value = list(value.values())
        for item in value:
            _check_body(item, depth + 1)


def peek_sender(frame: bytes) -> str:
    """The claimed sender of a frame, unverified (for routing and drop counters only)."""
    envelope = _parse_payload(_split_frame(frame)[0])
    return envelope.sender


@dataclass(slots=True)
class Verifier:
    """Checks incoming frames for one (community, session) and remembers sequences.

    Order of checks: structure, known sender, signature, community/session, sequence.
    The sequence table only advances for a fully accepted frame, so a forged or
    misdirected frame can never block a later genuine one.

    Attributes:
        roster: who may speak and with which key.
        community: the community every accepted frame must name.
        session: the session every accepted frame must name; ``None`` accepts any session
            (the monitor and the launcher listen across sessions).
        last_seq: highest accepted sequence per sender.
    """

    roster: Roster
    community: str
    session: str | None
    last_seq: dict[str, int] = field(default_factory=dict)

    def verify(self, frame: bytes) -> Envelope:
        """Return the verified envelope or raise a :class:`ProtocolError` subclass."""
        payload, signature = _split_frame(frame)
        envelope = _parse_payload(payload)
        if not PEER_ID_PATTERN.match(envelope.sender) or envelope.sender not in self.roster:
            raise UnknownSenderError("sender not in roster", peer_id=envelope.sender)
        try:
            self.roster[envelope.sender].verify(signature, DOMAIN + payload)
        except InvalidSignature:
            raise SignatureError("signature does not verify", peer_id=envelope.sender) from None
        if envelope.community != self.community:
            raise WrongContextError(
                f"community {envelope.community!r}, expected {self.community!r}",
                peer_id=envelope.sender,
            )
        if self.session is not None and envelope.session != self.session:
            raise WrongContextError(
                f"session {envelope.session!r}, expected {self.session!r}",
                peer_id=envelope.sender,
            )
        last = self.last_seq.get(envelope.sender, 0)
        if envelope.seq <= last:
            raise ReplayError(f"seq {envelope.seq} <= last {last}", peer_id=envelope.sender)
        self.last_seq[envelope.sender] = envelope.seq
        return envelope
