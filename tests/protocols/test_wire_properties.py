"""Property tests of the wire decoder (hypothesis).

Three properties (docs/wire.md, "Testing"):

1. any bytes -> a verified Envelope or a ProtocolError subclass, never anything else;
2. encode -> verify is the identity on envelopes, for generated nested bodies;
3. flipping any single bit anywhere in a valid frame makes it rejected.

The default number of examples keeps this file well under 20 s. For a long fuzzing
campaign set WATTMESH_FUZZ_EXAMPLES, e.g.::

    WATTMESH_FUZZ_EXAMPLES=200000 pytest tests/protocols/test_wire_properties.py

which runs that many examples per property (deadline off, no example database
shrink limit changes). Any failure hypothesis finds is printed as a minimal input.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattmesh.protocols.errors import ProtocolError, ReplayError
from wattmesh.protocols.identity import PEER_ID_PATTERN, Roster
from wattmesh.protocols.wire import DOMAIN, Envelope, Verifier, encode

_LONG = os.environ.get("WATTMESH_FUZZ_EXAMPLES")


def examples(default: int) -> settings:
    """``default`` examples, or WATTMESH_FUZZ_EXAMPLES of them for a long campaign."""
    return settings(
        max_examples=int(_LONG) if _LONG else default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


KEYS = {
    pid: Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)
    for n, pid in enumerate(["a", "h001", "peer-2", "z9"], start=1)
}
ROSTER = Roster({pid: key.public_key() for pid, key in KEYS.items()})


def fresh_verifier() -> Verifier:
    return Verifier(ROSTER, "demo", None)


# ---------------------------------------------------------------- strategies

ids = st.from_regex(PEER_ID_PATTERN, fullmatch=True)
sessions = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
types = st.from_regex(r"[a-z][a-z0-9_.]{0,31}", fullmatch=True)
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)
bodies = st.dictionaries(st.text(max_size=8), values, max_size=6)
envelopes = st.builds(
    Envelope,
    type=types,
    sender=st.sampled_from(sorted(KEYS)),
    community=st.just("demo"),
    session=sessions,
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    time_ms=st.integers(min_value=-(2**63), max_value=2**64 - 1),
    body=bodies,
)


def _check(frame: bytes) -> None:
    """Property 1: the verifier returns an Envelope or raises a ProtocolError."""
    try:
        result = fresh_verifier().verify(frame)
    except ProtocolError:
        return
    assert isinstance(result, Envelope)


# ---------------------------------------------------------------- property 1


@examples(1000)
@given(st.binary(max_size=600))
def test_any_bytes_give_an_envelope_or_a_protocol_error(data: bytes) -> None:
    _check(data)


msgpack_objects = st.recursive(
    scalars | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | msgpack_ints | st.binary(max_size=4), inner, max_size=4
        )
    ),
    max_leaves=15,
)


@examples(300)
@given(
    st.one_of(
        msgpack_objects,
        st.tuples(st.binary(max_size=200), st.binary(min_size=60, max_size=68)),
        st.tuples(msgpack_objects, st.binary(min_size=64, max_size=64)),
    )
)
def test_structured_junk_gives_a_protocol_error(obj: Any) -> None:
    """Shapes close to a frame reach the deeper checks, which random bytes rarely do."""
    if isinstance(obj, tuple) and not isinstance(obj[0], bytes):
        obj = (msgpack.packb(obj[0], use_bin_type=True), obj[1])
    frame = msgpack.packb(list(obj) if isinstance(obj, tuple) else obj, use_bin_type=True)
    _check(frame)


@examples(200)
@given(
    sender=st.sampled_from(sorted(KEYS)),
    payload=st.dictionaries(
        st.sampled_from(
            ["version", "type", "sender", "community", "session", "seq", "time_ms", "body", "extra"]
        ),
        msgpack_objects,
        max_size=9,
    ),
)
def test_signed_payload_maps_of_any_content_give_an_envelope_or_a_protocol_error(
    sender: str, payload: dict[str, Any]
) -> None:
    """Correctly signed, so every structural check after the signature is exercised too."""
    data = msgpack.packb(payload, use_bin_type=True)
    frame = msgpack.packb([data, KEYS[sender].sign(DOMAIN + data)], use_bin_type=True)
    _check(frame)


@examples(150)
@given(envelopes, st.data())
def test_edited_valid_frames_give_an_envelope_or_a_protocol_error(
    sent: Envelope, data: st.DataObject
) -> None:
    frame = bytearray(encode(sent, KEYS[sent.sender]))
    start = data.draw(st.integers(0, len(frame)))
    stop = data.draw(st.integers(start, min(len(frame), start + 8)))
    frame[start:stop] = data.draw(st.binary(max_size=8))
    _check(bytes(frame))


# ---------------------------------------------------------------- property 2


@examples(150)
@given(envelopes)
def test_encode_then_verify_is_the_identity(sent: Envelope) -> None:
    received = fresh_verifier().verify(encode(sent, KEYS[sent.sender]))
    assert received == sent
    assert _canonical(received.body) == _canonical(sent.body)


def _canonical(value: Any) -> Any:
    """Types and values exactly, so 1 vs 1.0 vs True or -0.0 vs 0.0 would show."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


@examples(30)
@given(st.lists(envelopes, min_size=1, max_size=5))
def test_a_verifier_accepts_exactly_the_increasing_sequences(sent: list[Envelope]) -> None:
    v = fresh_verifier()
    last: dict[str, int] = {}
    for envelope in sent:
        frame = encode(envelope, KEYS[envelope.sender])
        if envelope.seq > last.get(envelope.sender, 0):
            assert v.verify(frame) == envelope
            last[envelope.sender] = envelope.seq
        else:
            try:
                v.verify(frame)
            except ReplayError:
                pass
            else:
                raise AssertionError("a non-increasing seq was accepted")
    assert v.last_seq == last


# ---------------------------------------------------------------- property 3


@examples(200)
@given(envelopes, st.data())
def test_flipping_any_single_bit_is_rejected(sent: Envelope, data: st.DataObject) -> None:
    frame = encode(sent, KEYS[sent.sender])
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    flipped = bytearray(frame)
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        fresh_verifier().verify(bytes(flipped))
    except ProtocolError:
        return
    raise AssertionError(f"frame with bit {bit} flipped was accepted")


def test_flipping_every_bit_of_one_frame_is_rejected() -> None:
    """Exhaustive over one small frame: header, every payload field and the signature."""
    sent = Envelope("admm.round", "h001", "demo", "s1", 7, 12345, {"k": 2, "t": {"a": 0.5}})
    frame = encode(sent, KEYS["h001"])
    assert fresh_verifier().verify(frame) == sent
    accepted = []
    for bit in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            fresh_verifier().verify(bytes(flipped))
        except ProtocolError:
            continue
        accepted.append(bit)
    assert accepted == []
