"""The wire envelope, version 1: round trip and every rejection path (docs/wire.md).

Hostile frames are crafted by hand with msgpack, and signed with the right key
wherever the point is that the *structure* is refused, not the signature.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.errors import (
    DecodeError,
    ProtocolError,
    ReplayError,
    SignatureError,
    UnknownSenderError,
    WattmeshError,
    WrongContextError,
)
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import (
    DOMAIN,
    MAX_FRAME_BYTES,
    VERSION,
    Envelope,
    Verifier,
    encode,
    peek_sender,
)

KEY_1 = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEY_2 = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
OUTSIDER = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
ROSTER = Roster({"h001": KEY_1.public_key(), "h002": KEY_2.public_key()})


def envelope(**changes: Any) -> Envelope:
    values: dict[str, Any] = {
        "type": "admm.round",
        "sender": "h001",
        "community": "demo",
        "session": "s1",
        "seq": 5,
        "time_ms": 1_700_000_000_000,
        "body": {"k": 3, "t": {"h002": 0.5}, "v0": 1, "votes": [True, False]},
    }
    values.update(changes)
    return Envelope(**values)


def verifier(session: str | None = "s1") -> Verifier:
    return Verifier(ROSTER, "demo", session)


def fields(**changes: Any) -> dict[str, Any]:
    """A valid payload map in wire order, with some fields replaced or removed."""
    values: dict[str, Any] = {
        "version": 1,
        "type": "admm.round",
        "sender": "h001",
        "community": "demo",
        "session": "s1",
        "seq": 5,
        "time_ms": 0,
        "body": {"k": 1},
    }
    for name, value in changes.items():
        if value is _DROP:
            del values[name]
        else:
            values[name] = value
    return values


_DROP = object()


def packed_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A msgpack map written byte by byte, so it may hold duplicate keys (<= 15 pairs)."""
    assert len(pairs) <= 15
    return bytes([0x80 | len(pairs)]) + b"".join(
        msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs
    )


def raw_payload(**raw_values: bytes) -> bytes:
    """The payload of ``fields()`` with some values given as raw msgpack bytes."""
    items = [
        msgpack.packb(name) + (raw_values[name] if name in raw_values else msgpack.packb(value))
        for name, value in fields().items()
    ]
    return bytes([0x80 | len(items)]) + b"".join(items)


def signed_frame(payload: bytes, key: Ed25519PrivateKey = KEY_1) -> bytes:
    """Wrap arbitrary payload bytes in a correctly signed frame."""
    return msgpack.packb([payload, key.sign(DOMAIN + payload)], use_bin_type=True)


def frame_of(payload_map: dict[str, Any], key: Ed25519PrivateKey = KEY_1) -> bytes:
    return signed_frame(msgpack.packb(payload_map, use_bin_type=True), key)


def split(frame: bytes) -> tuple[bytes, bytes]:
    payload, signature = msgpack.unpackb(frame)
    return payload, signature


# ---------------------------------------------------------------- round trip


def test_round_trip_returns_the_same_envelope_and_records_the_sequence() -> None:
    sent = envelope()
    v = verifier()
    received = v.verify(encode(sent, KEY_1))
    assert received == sent
    assert received.body == {"k": 3, "t": {"h002": 0.5}, "v0": 1, "votes": [True, False]}
    assert v.last_seq == {"h001": 5}


def test_frame_is_an_array_of_payload_and_signature_over_domain_and_payload() -> None:
    frame = encode(envelope(), KEY_1)
    assert frame[0] == 0x92  # fixarray of 2
    payload, signature = split(frame)
    assert len(signature) == 64
    KEY_1.public_key().verify(signature, DOMAIN + payload)  # raises if not
    decoded = msgpack.unpackb(payload)
    assert list(decoded) == [
        "version",
        "type",
        "sender",
        "community",
        "session",
        "seq",
        "time_ms",
        "body",
    ]
    assert decoded["version"] == VERSION == 1


def test_domain_is_twelve_bytes_ending_in_nul() -> None:
    assert DOMAIN == b"wattmesh/v1\x00"
    assert len(DOMAIN) == 12


def test_signature_without_domain_prefix_is_refused() -> None:
    payload = msgpack.packb(fields(), use_bin_type=True)
    frame = msgpack.packb([payload, KEY_1.sign(payload)], use_bin_type=True)
    with pytest.raises(SignatureError):
        verifier().verify(frame)


def test_verifier_accepts_bytearray_and_memoryview() -> None:
    frame = encode(envelope(seq=1), KEY_1)
    assert verifier().verify(bytearray(frame)).seq == 1
    assert verifier().verify(memoryview(frame)).seq == 1


def test_non_minimal_msgpack_encodings_are_accepted_since_the_exact_bytes_are_signed() -> None:
    # seq as uint64 (0xcf) instead of a positive fixint; frame items as bin32.
    payload = raw_payload(seq=b"\xcf" + struct.pack(">Q", 5))
    signature = KEY_1.sign(DOMAIN + payload)
    frame = (
        b"\x92"
        + b"\xc6"
        + struct.pack(">I", len(payload))
        + payload
        + b"\xc6"
        + struct.pack(">I", 64)
        + signature
    )
    assert verifier().verify(frame).seq == 5


# ---------------------------------------------------------------- DecodeError


def _big_body_frame() -> bytes:
    return frame_of(fields(body={"x": b"\0" * MAX_FRAME_BYTES}))


DECODE_CASES: dict[str, Any] = {
    "empty": b"",
    "never-used byte 0xc1": b"\xc1",
    "truncated": lambda: encode(envelope(), KEY_1)[:-1],
    "not msgpack text": b"hello, world",
    "a str, not bytes": "\x92",
    "oversized": _big_body_frame,
    "outer is a map": lambda: msgpack.packb({"payload": b"x", "signature": b"y" * 64}),
    "outer has 1 item": lambda: msgpack.packb([msgpack.packb(fields())]),
    "outer has 3 items": lambda: msgpack.packb(
        [*split(encode(envelope(), KEY_1)), b""], use_bin_type=True
    ),
    "payload is str": lambda: msgpack.packb(
        ["abc", KEY_1.sign(DOMAIN + b"abc")], use_bin_type=True
    ),
    "signature is str": lambda: msgpack.packb([b"abc", "s" * 64], use_bin_type=True),
    "signature 63 bytes": lambda: msgpack.packb(
        [split(encode(envelope(), KEY_1))[0], bytes(63)], use_bin_type=True
    ),
    "signature 65 bytes": lambda: msgpack.packb(
        [split(encode(envelope(), KEY_1))[0], bytes(65)], use_bin_type=True
    ),
    "trailing byte after frame": lambda: encode(envelope(), KEY_1) + b"\x00",
    "second frame appended": lambda: encode(envelope(), KEY_1) * 2,
    "trailing byte inside payload": lambda: signed_frame(
        msgpack.packb(fields(), use_bin_type=True) + b"\xc0"
    ),
    "ext type in outer array": lambda: msgpack.packb(
        [msgpack.ExtType(1, b"x"), bytes(64)], use_bin_type=True
    ),
    "payload not a map": lambda: signed_frame(msgpack.packb(list(fields().values()))),
    "duplicate key in payload": lambda: signed_frame(packed_map([*fields().items(), ("seq", 6)])),
    "duplicate key replacing a field": lambda: signed_frame(
        packed_map([*fields(seq=_DROP).items(), ("sender", "h002")])
    ),
    "duplicate key in body": lambda: signed_frame(
        raw_payload(body=packed_map([("k", 1), ("k", 2)]))
    ),
    "ext type in body": lambda: frame_of(fields(body={"x": msgpack.ExtType(5, b"x")})),
    "timestamp ext in body": lambda: frame_of(fields(body={"x": msgpack.Timestamp(1, 0)})),
    "extra field": lambda: frame_of(fields(extra=1)),
    "missing field": lambda: frame_of(fields(time_ms=_DROP)),
    "empty payload map": lambda: frame_of({}),
    "version 2": lambda: frame_of(fields(version=2)),
    "version as float": lambda: frame_of(fields(version=1.0)),
    "version is true": lambda: frame_of(fields(version=True)),
    "seq is true": lambda: frame_of(fields(seq=True)),
    "time_ms is false": lambda: frame_of(fields(time_ms=False)),
    "seq as float": lambda: frame_of(fields(seq=5.0)),
    "seq as str": lambda: frame_of(fields(seq="5")),
    "seq 0": lambda: frame_of(fields(seq=0)),
    "seq negative": lambda: frame_of(fields(seq=-1)),
    "seq 2**63": lambda: frame_of(fields(seq=2**63)),
    "type as bin": lambda: frame_of(fields(type=b"admm.round")),
    "body a list": lambda: frame_of(fields(body=[1, 2])),
    "body nil": lambda: frame_of(fields(body=None)),
    "NaN in body": lambda: frame_of(fields(body={"x": float("nan")})),
    "infinity deep in body": lambda: frame_of(fields(body={"x": [1.0, {"y": float("-inf")}]})),
    "int map key in body": lambda: frame_of(fields(body={"t": {1: 0.5}})),
    "bin map key in body": lambda: frame_of(fields(body={"t": {b"h002": 0.5}})),
    "body 33 levels deep": lambda: frame_of(fields(body=_nested(32))),
    "body 1000 levels deep (was RecursionError)": lambda: signed_frame(
        raw_payload(body=b"\x81\xa1x" + b"\x91" * 1000 + b"\xc0")
    ),
    "invalid utf-8 in str": lambda: signed_frame(raw_payload(sender=b"\xa2\xff\xfe")),
    "sender uppercase": lambda: frame_of(fields(sender="H001")),
    "sender with trailing newline": lambda: frame_of(fields(sender="h001\n")),
    "sender empty": lambda: frame_of(fields(sender="")),
    "sender 65 chars": lambda: frame_of(fields(sender="a" * 65)),
    "community with slash": lambda: frame_of(fields(community="demo/x")),
    "community with plus": lambda: frame_of(fields(community="+")),
    "community with trailing newline": lambda: frame_of(fields(community="demo\n")),
    "session with space": lambda: frame_of(fields(session="s 1")),
    "session empty": lambda: frame_of(fields(session="")),
    "session 129 chars": lambda: frame_of(fields(session="s" * 129)),
    "type uppercase": lambda: frame_of(fields(type="Admm.round")),
    "type starts with digit": lambda: frame_of(fields(type="1x")),
    "type 33 chars": lambda: frame_of(fields(type="a" * 33)),
}


def _nested(depth: int) -> dict[str, Any]:
    """A body map with ``depth`` arrays inside it (body + depth levels in all)."""
    value: Any = None
    for _ in range(depth):
        value = [value]
    return {"x": value}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_malformed_frames_raise_decode_error(case: str) -> None:
    make = DECODE_CASES[case]
    frame = make() if callable(make) else make
    v = verifier()
    with pytest.raises(DecodeError) as caught:
        v.verify(frame)
    assert caught.value.reason == "malformed"
    assert v.last_seq == {}


def test_case_builders_make_what_they_claim() -> None:
    """Guard the hand-made frames: each differs from a valid one only as its name says."""
    assert len(_big_body_frame()) > MAX_FRAME_BYTES
    assert len(DECODE_CASES["signature 63 bytes"]()) > 0
    dup = msgpack.unpackb(split(DECODE_CASES["duplicate key in payload"]())[0])
    assert dup["seq"] == 6  # a lenient parser would silently take the last value
    body_ok = frame_of(fields(body=_nested(31)))  # 32 levels counting the body: allowed
    assert verifier().verify(body_ok).body == _nested(31)
    deep = split(DECODE_CASES["body 1000 levels deep (was RecursionError)"]())[0]
    assert deep.endswith(b"\x91" * 1000 + b"\xc0")
    utf8 = split(DECODE_CASES["invalid utf-8 in str"]())[0]
    assert b"\xa6sender\xa2\xff\xfe" in utf8
    with pytest.raises(UnicodeDecodeError):
        msgpack.unpackb(utf8)


def test_decode_error_is_raised_before_anything_else_is_looked_at() -> None:
    # Unknown sender, but malformed: structure is checked first.
    v = Verifier(Roster({}), "demo", "s1")
    with pytest.raises(DecodeError):
        v.verify(frame_of(fields(sender="nobody", seq=0)))


# ---------------------------------------------------------------- other errors


def test_unknown_sender_is_refused() -> None:
    frame = encode(envelope(sender="h999"), OUTSIDER)
    with pytest.raises(UnknownSenderError) as caught:
        verifier().verify(frame)
    assert caught.value.reason == "unknown_sender"
    assert caught.value.peer_id == "h999"


def test_tampered_payload_fails_the_signature() -> None:
    payload, signature = split(encode(envelope(), KEY_1))
    tampered = payload.replace(msgpack.packb(0.5), msgpack.packb(5.0))
    assert tampered != payload
    frame = msgpack.packb([tampered, signature], use_bin_type=True)
    with pytest.raises(SignatureError) as caught:
        verifier().verify(frame)
    assert caught.value.reason == "bad_signature"
    assert caught.value.peer_id == "h001"


def test_valid_signature_from_another_roster_key_fails() -> None:
    frame = encode(envelope(sender="h001"), KEY_2)  # h002 signs, claims to be h001
    with pytest.raises(SignatureError):
        verifier().verify(frame)


def test_signature_bytes_altered_fails() -> None:
    payload, signature = split(encode(envelope(), KEY_1))
    for position in (0, 31, 32, 63):
        altered = bytearray(signature)
        altered[position] ^= 0x01
        with pytest.raises(SignatureError):
            verifier().verify(msgpack.packb([payload, bytes(altered)], use_bin_type=True))


def test_other_community_is_wrong_context() -> None:
    with pytest.raises(WrongContextError) as caught:
        verifier().verify(encode(envelope(community="other"), KEY_1))
    assert caught.value.reason == "wrong_context"
    assert "other" in str(caught.value)


def test_other_session_is_wrong_context() -> None:
    with pytest.raises(WrongContextError):
        verifier().verify(encode(envelope(session="s2"), KEY_1))


def test_verifier_without_session_accepts_any_session_but_keeps_one_sequence() -> None:
    v = verifier(session=None)
    assert v.verify(encode(envelope(session="s1", seq=1), KEY_1)).session == "s1"
    assert v.verify(encode(envelope(session="s2", seq=2), KEY_1)).session == "s2"
    with pytest.raises(ReplayError):
        v.verify(encode(envelope(session="s3", seq=2), KEY_1))


@pytest.mark.parametrize("seq", [7, 6, 1])
def test_equal_or_lower_sequence_is_a_replay(seq: int) -> None:
    v = verifier()
    v.verify(encode(envelope(seq=7), KEY_1))
    with pytest.raises(ReplayError) as caught:
        v.verify(encode(envelope(seq=seq), KEY_1))
    assert caught.value.reason == "replay"
    assert caught.value.peer_id == "h001"
    assert v.last_seq == {"h001": 7}


def test_exact_replay_of_an_accepted_frame_is_refused() -> None:
    v = verifier()
    frame = encode(envelope(), KEY_1)
    v.verify(frame)
    with pytest.raises(ReplayError):
        v.verify(frame)


def test_sequences_are_per_sender_and_may_jump() -> None:
    v = verifier()
    v.verify(encode(envelope(sender="h001", seq=10), KEY_1))
    v.verify(encode(envelope(sender="h002", seq=1), KEY_2))
    v.verify(encode(envelope(sender="h001", seq=2**63 - 1), KEY_1))
    assert v.last_seq == {"h001": 2**63 - 1, "h002": 1}


REJECTED_WITH_HIGH_SEQ: dict[str, tuple[type[ProtocolError], Any]] = {
    "bad signature": (
        SignatureError,
        lambda: encode(envelope(seq=100), KEY_2),
    ),
    "other community": (
        WrongContextError,
        lambda: encode(envelope(seq=100, community="other"), KEY_1),
    ),
    "other session": (
        WrongContextError,
        lambda: encode(envelope(seq=100, session="s2"), KEY_1),
    ),
    "malformed body": (
        DecodeError,
        lambda: frame_of(fields(seq=100, body={"x": float("nan")})),
    ),
}


@pytest.mark.parametrize("case", list(REJECTED_WITH_HIGH_SEQ))
def test_rejected_frame_does_not_advance_the_sequence(case: str) -> None:
    error, make = REJECTED_WITH_HIGH_SEQ[case]
    v = verifier()
    v.verify(encode(envelope(seq=4), KEY_1))
    with pytest.raises(error):
        v.verify(make())
    assert v.last_seq == {"h001": 4}
    assert v.verify(encode(envelope(seq=5), KEY_1)).seq == 5


def test_replay_error_does_not_move_the_sequence_back() -> None:
    v = verifier()
    v.verify(encode(envelope(seq=9), KEY_1))
    with pytest.raises(ReplayError):
        v.verify(encode(envelope(seq=3), KEY_1))
    with pytest.raises(ReplayError):
        v.verify(encode(envelope(seq=8), KEY_1))
    assert v.verify(encode(envelope(seq=10), KEY_1)).seq == 10


def test_order_unknown_sender_before_signature() -> None:
    forged = encode(envelope(sender="h999"), KEY_1)
    with pytest.raises(UnknownSenderError):
        verifier().verify(forged)


def test_order_signature_before_context_and_sequence() -> None:
    # A forger cannot learn anything about community/session/sequence checks.
    v = verifier()
    v.verify(encode(envelope(seq=50), KEY_1))
    with pytest.raises(SignatureError):
        v.verify(encode(envelope(seq=1, community="other"), KEY_2))


def test_order_context_before_sequence() -> None:
    v = verifier()
    v.verify(encode(envelope(seq=50), KEY_1))
    with pytest.raises(WrongContextError):
        v.verify(encode(envelope(seq=1, session="s2"), KEY_1))


# ---------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DecodeError, "malformed"),
        (UnknownSenderError, "unknown_sender"),
        (SignatureError, "bad_signature"),
        (WrongContextError, "wrong_context"),
        (ReplayError, "replay"),
    ],
)
def test_every_wire_error_is_a_protocol_error_with_a_reason_tag(
    error: type[ProtocolError], reason: str
) -> None:
    assert issubclass(error, ProtocolError)
    assert issubclass(error, WattmeshError)
    instance = error("detail", peer_id="h001")
    assert instance.reason == reason
    assert instance.peer_id == "h001"
    assert str(instance).startswith(f"{reason}: detail")


# ---------------------------------------------------------------- encode side


@pytest.mark.parametrize(
    "body",
    [
        {"x": float("nan")},
        {"x": [float("inf")]},
        {"t": {1: 0.5}},
        {"x": object()},
        {"x": 2**64},
        {"x": b"\0" * MAX_FRAME_BYTES},
        _nested(32),
        {"x": msgpack.Timestamp(1, 0)},
    ],
    ids=["nan", "inf", "int key", "object", "int too big", "too big", "too deep", "timestamp"],
)
def test_encode_refuses_what_every_receiver_would_drop(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode(envelope(body=body), KEY_1)


def test_encode_accepts_tuples_as_arrays() -> None:
    frame = encode(envelope(body={"x": (1, 2.5, "a")}), KEY_1)
    assert verifier().verify(frame).body == {"x": [1, 2.5, "a"]}


@pytest.mark.parametrize(
    "changes",
    [
        {"type": "Bad"},
        {"sender": "H1"},
        {"sender": "h1\n"},
        {"community": ""},
        {"session": "a b"},
        {"seq": 0},
        {"seq": 2**63},
        {"version": 2},
        {"body": [1]},
    ],
)
def test_envelope_validates_its_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        envelope(**changes)


def test_peek_sender_reads_the_claim_without_verifying() -> None:
    assert peek_sender(encode(envelope(sender="h999"), OUTSIDER)) == "h999"
    with pytest.raises(DecodeError):
        peek_sender(b"\xc1")


def _frame_of_length(length: int) -> bytes:
    """A correctly signed frame of exactly ``length`` bytes (padding in the body)."""
    guess = frame_of(fields(body={"x": b"\0" * (length - 200)}))
    frame = frame_of(fields(body={"x": b"\0" * (length - 200 + length - len(guess))}))
    assert len(frame) == length
    return frame


def test_frame_of_exactly_max_frame_bytes_is_accepted_one_more_is_not() -> None:
    assert MAX_FRAME_BYTES == 262_144
    assert verifier().verify(_frame_of_length(MAX_FRAME_BYTES)).seq == 5
    with pytest.raises(DecodeError, match="exceeds"):
        verifier().verify(_frame_of_length(MAX_FRAME_BYTES + 1))
