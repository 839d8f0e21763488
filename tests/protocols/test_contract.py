"""Two-party contracts (protocols/contract.py, docs/contracts.md): terms bytes, strict
decoding, signatures, domain separation, and an independent check with PyNaCl.

The independent part uses nothing of wattmesh's encoder or verifier: the terms bytes
are built by hand from docs/contracts.md §2-3 and the signatures checked with libsodium
(PyNaCl) rather than pyca/cryptography. The test vector is read out of the document, so
the page cannot drift from the code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattmesh.protocols import wire
from wattmesh.protocols.contract import (
    CONTRACT_DOMAIN,
    CONTRACT_VERSION,
    Contract,
    Terms,
    sign_terms,
    verify_signature,
)
from wattmesh.protocols.errors import DecodeError, ProtocolError, SignatureError, UnknownSenderError
from wattmesh.protocols.identity import PEER_ID_PATTERN, Roster

DOC = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"

SELLER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([11]) * 32)
BUYER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([12]) * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([13]) * 32)
ROSTER = Roster({"h001": SELLER_KEY.public_key(), "h002": BUYER_KEY.public_key(), "h003": OTHER_KEY.public_key()})

FIELDS: dict[str, Any] = {
    "version": 1,
    "community": "demo",
    "session": "run-7",
    "buyer": "h002",
    "seller": "h001",
    "kwh": 1.5,
    "price": 0.12,
    "time_ms": 1_748_779_200_000,
    "expires_ms": 1_748_779_260_000,
}
_DROP = object()


def terms(**changes: Any) -> Terms:
    values = {k: v for k, v in FIELDS.items() if k != "version"}
    values.update(changes)
    return Terms(**values)


def packed(**changes: Any) -> bytes:
    """A terms map packed by msgpack, with some values replaced or (``_DROP``) removed."""
    values = dict(FIELDS)
    for name, value in changes.items():
        if value is _DROP:
            del values[name]
        else:
            values[name] = value
    data: bytes = msgpack.packb(values, use_bin_type=True)
    return data


def signed_contract(t: Terms | None = None) -> Contract:
    data = (t or terms()).encode()
    return Contract(data, sign_terms(data, SELLER_KEY), sign_terms(data, BUYER_KEY))


def at_stack_depth(frames: int, call: Callable[[], Any]) -> Any:
    """Run ``call`` ``frames`` Python frames deeper than here, as it is in a peer
    (event loop, market loop, settlement) or under a test runner."""
    __tracebackhide__ = True  # keep a failure's report short
    if frames == 0:
        return call()
    return at_stack_depth(frames - 1, call)


# ---------------------------------------------------------------- round trip


def test_terms_round_trip_through_their_bytes() -> None:
    # GIVEN terms  WHEN encoded and decoded  THEN the same terms, with the same types
    original = terms()
    data = original.encode()
    decoded = Terms.decode(data)
    assert decoded == original
    assert isinstance(decoded.kwh, float) and isinstance(decoded.time_ms, int)
    assert decoded.encode() == data
    assert msgpack.unpackb(data) == FIELDS
    assert list(msgpack.unpackb(data)) == list(FIELDS)  # the documented key order


def test_payment_is_kwh_times_price() -> None:
    assert terms(kwh=2.5, price=0.2).payment == pytest.approx(0.5)
    assert terms(price=-0.1).payment == pytest.approx(-0.15)  # negative prices are allowed


@pytest.mark.parametrize(
    "changes",
    [
        {"buyer": "h001"},
        {"buyer": "H002"},
        {"community": "de mo"},
        {"seller": "h001\n"},
        {"kwh": 0.0},
        {"kwh": -1.0},
        {"kwh": 2},
        {"kwh": math.inf},
        {"price": math.nan},
        {"price": 1},
        {"session": ""},
        {"session": "s" * 129},
        {"time_ms": -1},
        {"time_ms": True},
        {"expires_ms": 2**63},
        {"expires_ms": FIELDS["time_ms"] - 1},
    ],
    ids=repr,
)
def test_constructing_invalid_terms_is_a_value_error(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        terms(**changes)


# ---------------------------------------------------------------- strict decoding


def _with_pairs(pairs: list[tuple[bytes, bytes]], trailing: bytes = b"") -> bytes:
    """A msgpack map from already-encoded (key, value) items, for duplicates and forms
    that msgpack-python would never write."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs) + trailing


def _pairs(**changes: Any) -> list[tuple[bytes, bytes]]:
    values = dict(FIELDS, **changes)
    return [(msgpack.packb(k), msgpack.packb(v, use_bin_type=True)) for k, v in values.items()]


DEEP = 919  # fills the 1024-byte cap with nested one-element arrays


def _deep_in(field: str) -> bytes:
    """Terms whose ``field`` is an array nested as deep as 1024 bytes allow."""
    rest = [(k, v) for k, v in _pairs() if k != msgpack.packb(field)]
    prefix = _with_pairs(rest)[1:]
    head = bytes([0x89]) + prefix + msgpack.packb(field)
    depth = 1024 - len(head) - 1
    return head + b"\x91" * depth + b"\x01"


MALFORMED: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "not a map": lambda: msgpack.packb(list(FIELDS.values())),
    "integer": lambda: msgpack.packb(1),
    "extra key": lambda: packed(note="x"),
    **{f"missing {k}": (lambda k=k: packed(**{k: _DROP})) for k in FIELDS},
    "version 2": lambda: packed(version=2),
    "version 0": lambda: packed(version=0),
    "version as str": lambda: packed(version="1"),
    "version as bool": lambda: packed(version=True),
    "version as float": lambda: packed(version=1.0),  # BUG: accepted (1.0 == 1 in Python)
    "community as int": lambda: packed(community=5),
    "session as bin": lambda: packed(session=b"run-7"),
    "buyer as bin": lambda: packed(buyer=b"h002"),
    "buyer uppercase": lambda: packed(buyer="H002"),
    "buyer with newline": lambda: packed(buyer="h002\n"),
    "seller nil": lambda: packed(seller=None),
    "empty session": lambda: packed(session=""),
    "session of 129 characters": lambda: packed(session="s" * 129),
    "kwh as int": lambda: packed(kwh=2),
    "kwh as bool": lambda: packed(kwh=True),
    "kwh as str": lambda: packed(kwh="1.5"),
    "kwh NaN": lambda: packed(kwh=math.nan),
    "kwh inf": lambda: packed(kwh=math.inf),
    "kwh zero": lambda: packed(kwh=0.0),
    "kwh negative": lambda: packed(kwh=-1.5),
    "price NaN": lambda: packed(price=math.nan),
    "price -inf": lambda: packed(price=-math.inf),
    "price as int": lambda: packed(price=0),
    "price as array": lambda: packed(price=[0.12]),
    "time_ms as float": lambda: packed(time_ms=1.0),
    "time_ms as bool": lambda: packed(time_ms=True),
    "time_ms negative": lambda: packed(time_ms=-1),
    "expires_ms 2**63": lambda: packed(expires_ms=2**63),
    "expires before time": lambda: packed(expires_ms=FIELDS["time_ms"] - 1),
    "time_ms as msgpack timestamp": lambda: packed(time_ms=msgpack.Timestamp(1, 0)),
    "ext type value": lambda: packed(kwh=msgpack.ExtType(5, b"x")),
    "buyer == seller": lambda: packed(buyer="h001"),
    "oversize": lambda: packed(note="x" * 1100),
    "duplicate key, other value": lambda: _with_pairs([*_pairs(), (msgpack.packb("kwh"), msgpack.packb(9.0))]),
    "duplicate key, same value": lambda: _with_pairs([*_pairs(), (msgpack.packb("kwh"), msgpack.packb(1.5))]),
    "integer map key": lambda: _with_pairs([*_pairs()[:8], (msgpack.packb(9), msgpack.packb(1))]),
    "invalid UTF-8": lambda: _with_pairs([*_pairs()[:2], (msgpack.packb("session"), b"\xa2\xff\xfe"), *_pairs()[3:]]),
    "trailing garbage": lambda: packed() + b"\x00",
    "two maps": lambda: packed() + packed(),
    "truncated": lambda: packed()[:-1],
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_terms_are_a_decode_error(name: str) -> None:
    # GIVEN bytes that are not exactly a version-1 terms map  WHEN decoded  THEN DecodeError
    data = MALFORMED[name]()
    with pytest.raises(DecodeError):
        Terms.decode(data)


def test_the_size_cap_is_checked_before_parsing() -> None:
    with pytest.raises(DecodeError, match="at most 1 KiB"):
        Terms.decode(packed() + b"\x00" * 1024)


@pytest.mark.parametrize("value", [bytearray(packed()), memoryview(packed()), packed().hex(), None])
def test_terms_must_be_bytes(value: Any) -> None:
    with pytest.raises(DecodeError):
        Terms.decode(value)


@pytest.mark.parametrize("field", ["version", "community", "buyer", "seller", "session", "kwh", "time_ms"])
@pytest.mark.parametrize("frames", [0, 150])
def test_deeply_nested_values_are_a_decode_error_at_any_stack_depth(field: str, frames: int) -> None:
    """BUG: 919 nested one-element arrays fit in 1 KiB; the error messages for version
    and the ids take repr() of the value, which recurses once per level and raises
    RecursionError when the caller is some 100 frames deep (docs/contracts.md §3:
    anything else is a DecodeError). A hostile peer puts such terms in a proposal; the
    wire envelope's depth limit does not apply inside the ``terms`` bin."""
    data = _deep_in(field)
    assert len(data) == 1024
    with pytest.raises(DecodeError):
        at_stack_depth(frames, lambda: Terms.decode(data))


def test_a_float32_kwh_and_any_key_order_decode_but_sign_differently() -> None:
    # GIVEN the same terms written with float32 kwh and price, keys in reverse order
    reordered = _with_pairs(list(reversed(_pairs(kwh=0.5, price=0.25))))
    float32 = reordered.replace(msgpack.packb(0.5), b"\xca" + struct.pack(">f", 0.5))
    # WHEN decoded  THEN the same terms (docs/contracts.md §3: any order, any width)
    assert Terms.decode(float32) == Terms.decode(reordered) == terms(kwh=0.5, price=0.25)
    # BUT a signature is over bytes: the canonical bytes' signature does not carry over
    canonical = terms(kwh=0.5, price=0.25).encode()
    assert canonical not in (float32, reordered)
    with pytest.raises(SignatureError):
        verify_signature(float32, sign_terms(canonical, SELLER_KEY), "h001", ROSTER)


# ---------------------------------------------------------------- hypothesis

ids = st.from_regex(PEER_ID_PATTERN, fullmatch=True)


@st.composite
def valid_terms(draw: st.DrawFn) -> Terms:
    buyer, seller = draw(st.tuples(ids, ids).filter(lambda pair: pair[0] != pair[1]))
    time_ms = draw(st.integers(0, 2**63 - 1))
    return Terms(
        community=draw(ids),
        session=draw(st.text(min_size=1, max_size=128)),
        buyer=buyer,
        seller=seller,
        kwh=draw(st.floats(min_value=0.0, exclude_min=True, allow_infinity=False)),
        price=draw(st.floats(allow_nan=False, allow_infinity=False)),
        time_ms=time_ms,
        expires_ms=draw(st.integers(time_ms, 2**63 - 1)),
    )


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=1100))
def test_any_bytes_decode_to_terms_or_a_decode_error(data: bytes) -> None:
    # (an exception of any other type fails the test: docs/contracts.md §3)
    try:
        result = Terms.decode(data)
    except DecodeError:
        return
    assert isinstance(result, Terms)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replaced=st.dictionaries(st.sampled_from([*FIELDS, "note"]), values, max_size=3),
    dropped=st.sets(st.sampled_from(list(FIELDS)), max_size=1),
    edit=st.tuples(st.integers(0, 2000), st.integers(0, 2), st.binary(max_size=2)),
)
def test_any_near_miss_terms_map_decodes_to_terms_or_a_decode_error(
    replaced: dict[str, Any], dropped: set[str], edit: tuple[int, int, bytes]
) -> None:
    # maps with the right keys and odd values, then one byte-level edit
    changes: dict[str, Any] = {**replaced, **dict.fromkeys(dropped, _DROP)}
    try:
        data = packed(**changes)
    except (TypeError, ValueError, OverflowError):
        return  # msgpack-python cannot write it; nobody can send it
    start, length, replacement = edit
    start %= len(data) + 1
    for candidate in (data, data[:start] + replacement + data[start + length :]):
        try:
            result = Terms.decode(candidate)
        except DecodeError:
            continue
        assert isinstance(result, Terms) and Terms.decode(result.encode()) == result


@settings(max_examples=50, deadline=None)
@given(t=valid_terms())
def test_valid_terms_round_trip_and_match_the_hand_encoding(t: Terms) -> None:
    data = t.encode()
    assert Terms.decode(data) == t
    assert data == hand_encode(
        {"version": 1, **{k: getattr(t, k) for k in DOC_KEY_ORDER[1:]}}
    )  # docs/contracts.md §3 describes every byte wattmesh writes


# ---------------------------------------------------------------- signatures


def test_both_parties_signatures_verify() -> None:
    data = terms().encode()
    verify_signature(data, sign_terms(data, SELLER_KEY), "h001", ROSTER)
    verify_signature(data, sign_terms(data, BUYER_KEY), "h002", ROSTER)
    assert sign_terms(data, SELLER_KEY) == sign_terms(data, SELLER_KEY)  # deterministic


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_any_changed_terms_byte_breaks_the_signature() -> None:
    # GIVEN a valid seller signature  WHEN any single bit of the terms changes  THEN refused
    data = terms().encode()
    signature = sign_terms(data, SELLER_KEY)
    for index in range(len(data)):
        with pytest.raises(SignatureError):
            verify_signature(_flip(data, index), signature, "h001", ROSTER)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: _flip(s, 0),
        lambda s: _flip(s, 63),
        lambda s: s[:63],
        lambda s: s + b"\x00",
        lambda s: bytes(64),
        lambda s: s.hex(),
        lambda s: None,
    ],
    ids=["first bit", "last byte", "63 bytes", "65 bytes", "zeros", "hex str", "None"],
)
def test_a_tampered_signature_is_a_signature_error(tamper: Callable[[bytes], Any]) -> None:
    data = terms().encode()
    with pytest.raises(SignatureError) as caught:
        verify_signature(data, tamper(sign_terms(data, SELLER_KEY)), "h001", ROSTER)
    assert caught.value.peer_id == "h001"


def test_a_signature_checked_under_the_other_party_is_refused() -> None:
    data = terms().encode()
    with pytest.raises(SignatureError):
        verify_signature(data, sign_terms(data, SELLER_KEY), "h002", ROSTER)


def test_an_unknown_party_is_an_unknown_sender_error() -> None:
    data = terms(seller="h009").encode()
    with pytest.raises(UnknownSenderError) as caught:
        verify_signature(data, sign_terms(data, SELLER_KEY), "h009", ROSTER)
    assert caught.value.peer_id == "h009"
    assert caught.value.reason == "unknown_sender"


def test_a_wire_signature_over_the_same_bytes_is_not_a_contract_signature() -> None:
    # GIVEN the terms signed as a wire payload would be (wire DOMAIN) or with no prefix
    data = terms().encode()
    for prefix in (wire.DOMAIN, b""):
        # WHEN checked as a contract signature  THEN refused (domain separation)
        with pytest.raises(SignatureError):
            verify_signature(data, SELLER_KEY.sign(prefix + data), "h001", ROSTER)
    assert CONTRACT_DOMAIN != wire.DOMAIN and not CONTRACT_DOMAIN.startswith(wire.DOMAIN[:-1] + b"\x00")


def test_a_contract_signature_does_not_pass_as_a_wire_signature() -> None:
    # GIVEN a genuine frame, re-signed with the contract domain over the same payload
    envelope = wire.Envelope("contract.propose", "h001", "demo", "run-7", 1, 0, {"to": "h002"})
    frame = wire.encode(envelope, SELLER_KEY)
    payload, _ = msgpack.unpackb(frame)
    forged = msgpack.packb([payload, sign_terms(payload, SELLER_KEY)], use_bin_type=True)
    # WHEN verified as a wire frame  THEN refused, while the genuine frame passes
    with pytest.raises(SignatureError):
        wire.Verifier(ROSTER, "demo", "run-7").verify(forged)
    assert wire.Verifier(ROSTER, "demo", "run-7").verify(frame) == envelope


# ---------------------------------------------------------------- Contract


def test_contract_verify_returns_its_terms() -> None:
    contract = signed_contract()
    assert contract.verify(ROSTER) == terms() == contract.terms


_PRICE_END = terms().encode().index(msgpack.packb(0.12)) + 8  # last byte of the price float


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda c: Contract(c.terms_bytes, c.buyer_signature, c.seller_signature), SignatureError),
        (lambda c: Contract(c.terms_bytes, c.seller_signature, c.seller_signature), SignatureError),
        (lambda c: Contract(c.terms_bytes, c.seller_signature, sign_terms(c.terms_bytes, OTHER_KEY)), SignatureError),
        (lambda c: Contract(_flip(c.terms_bytes, _PRICE_END), c.seller_signature, c.buyer_signature), SignatureError),
        (lambda c: Contract(c.terms_bytes + b"\x00", c.seller_signature, c.buyer_signature), DecodeError),
        (lambda c: Contract(c.terms_bytes, c.seller_signature, c.buyer_signature[:32]), SignatureError),
    ],
    ids=["swapped", "seller twice", "third party countersigned", "terms bit", "trailing byte", "short sig"],
)
def test_contract_verify_refuses_a_mangled_contract(
    mangle: Callable[[Contract], Contract], error: type[ProtocolError]
) -> None:
    with pytest.raises(error):
        mangle(signed_contract()).verify(ROSTER)


def test_contract_verify_needs_both_parties_in_the_roster() -> None:
    contract = signed_contract()
    for missing in ("h001", "h002"):
        partial = Roster({pid: key for pid, key in ROSTER.public_keys.items() if pid != missing})
        with pytest.raises(UnknownSenderError) as caught:
            contract.verify(partial)
        assert caught.value.peer_id == missing


def test_contract_dict_round_trip_through_json() -> None:
    contract = signed_contract()
    exported = json.loads(json.dumps(contract.to_dict()))
    assert Contract.from_dict(exported) == contract
    assert Contract.from_dict(exported).verify(ROSTER) == terms()
    assert {k: exported[k] for k in ("buyer", "seller", "kwh", "price", "session", "community")} == {
        "buyer": "h002", "seller": "h001", "kwh": 1.5, "price": 0.12, "session": "run-7", "community": "demo",
    }  # fmt: skip
    assert exported["terms"] == contract.terms_bytes.hex()


# ---------------------------------------------------------------- independent check (docs/contracts.md)

# Typed from docs/contracts.md §1-3, not imported from wattmesh.
DOC_DOMAIN = b"wattmesh/contract/v1\x00"
DOC_KEY_ORDER = ("version", "community", "session", "buyer", "seller", "kwh", "price", "time_ms", "expires_ms")
DOC_FLOATS = {"kwh", "price"}


def _hand_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < 32:
        return bytes([0xA0 | len(raw)]) + raw
    if len(raw) < 256:
        return b"\xd9" + bytes([len(raw)]) + raw
    return b"\xda" + len(raw).to_bytes(2, "big") + raw


def _hand_uint(value: int) -> bytes:
    if value < 128:
        return bytes([value])
    for head, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if value < 2 ** (8 * width):
            return bytes([head]) + value.to_bytes(width, "big")
    raise AssertionError(value)


def hand_encode(values: dict[str, Any]) -> bytes:
    """The terms bytes as docs/contracts.md §3 says wattmesh writes them."""
    out = bytearray([0x89])
    for key in DOC_KEY_ORDER:
        value = values[key]
        out += _hand_str(key)
        if key in DOC_FLOATS:
            out += b"\xcb" + struct.pack(">d", value)
        elif isinstance(value, int):
            out += _hand_uint(value)
        else:
            out += _hand_str(value)
    return bytes(out)


def doc_block(marker: str) -> str:
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```\w*\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert match, f"docs/contracts.md lacks the block marked {marker}"
    return match.group(1)


def doc_vector() -> dict[str, bytes]:
    values: dict[str, str] = {}
    name = ""
    for line in doc_block("contract-vector:hex").splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            values[name] += line.strip()
        else:
            name, text = line.split()
            values[name] = text
    return {k: bytes.fromhex(v) for k, v in values.items()}


def doc_terms() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(doc_block("contract-vector:terms"))
    return value


def test_vector_keys_are_rfc8032_test_1_and_2() -> None:
    vector = doc_vector()
    assert set(vector) == {
        "seller_seed", "seller_public", "buyer_seed", "buyer_public", "domain", "terms",
        "seller_signature", "buyer_signature",
    }  # fmt: skip
    for party in ("seller", "buyer"):
        assert bytes(nacl.signing.SigningKey(vector[f"{party}_seed"]).verify_key) == vector[f"{party}_public"]
    assert vector["seller_public"].hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert vector["buyer_public"].hex() == "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"


def test_vector_domain_is_the_documented_and_the_signed_one() -> None:
    assert doc_vector()["domain"] == DOC_DOMAIN == CONTRACT_DOMAIN
    assert len(DOC_DOMAIN) == 21


def test_vector_terms_built_by_hand_from_the_doc() -> None:
    # GIVEN the documented terms  WHEN encoded by hand following §3  THEN the vector bytes
    vector = doc_vector()
    fields = doc_terms()
    assert list(fields) == list(DOC_KEY_ORDER)
    assert hand_encode(fields) == vector["terms"]
    assert len(vector["terms"]) == 127
    # ... which are also what wattmesh writes and reads
    assert fields.pop("version") == CONTRACT_VERSION
    assert Terms(**fields).encode() == vector["terms"]
    assert Terms.decode(vector["terms"]) == Terms(**fields)


def test_vector_signatures_verify_with_pynacl() -> None:
    vector = doc_vector()
    message = vector["domain"] + vector["terms"]
    assert len(message) == 148
    for party in ("seller", "buyer"):
        key = nacl.signing.VerifyKey(vector[f"{party}_public"])
        assert key.verify(message, vector[f"{party}_signature"]) == message
        with pytest.raises(nacl.exceptions.BadSignatureError):
            key.verify(wire.DOMAIN + vector["terms"], vector[f"{party}_signature"])
    with pytest.raises(nacl.exceptions.BadSignatureError):  # each signature binds its own party
        nacl.signing.VerifyKey(vector["buyer_public"]).verify(message, vector["seller_signature"])


def test_vector_signatures_are_reproduced_by_libsodium_and_by_wattmesh() -> None:
    vector = doc_vector()
    message = vector["domain"] + vector["terms"]
    for party in ("seller", "buyer"):
        assert nacl.signing.SigningKey(vector[f"{party}_seed"]).sign(message).signature == vector[f"{party}_signature"]
        key = Ed25519PrivateKey.from_private_bytes(vector[f"{party}_seed"])
        assert sign_terms(vector["terms"], key) == vector[f"{party}_signature"]


def test_vector_is_a_final_contract_for_wattmesh() -> None:
    vector = doc_vector()
    roster = Roster.from_toml(
        f'[peers]\nh001 = "{vector["seller_public"].hex()}"\nh002 = "{vector["buyer_public"].hex()}"\n'
    )
    contract = Contract(vector["terms"], vector["seller_signature"], vector["buyer_signature"])
    assert contract.verify(roster).payment == pytest.approx(1.5 * 0.12)
    exported = contract.to_dict()
    assert exported["terms"].startswith("89a7") and exported["seller_signature"].startswith("0da2")
    assert exported["buyer_signature"].startswith("091f")  # as abbreviated in §5


def test_vector_breakdown_lists_the_terms_bytes_in_order() -> None:
    """The item-by-item table of §9, hex columns concatenated, is the terms."""
    table = re.search(r"```text\n(89 +map, 9 entries\n.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert table
    hex_text = ""
    for line in table.group(1).splitlines():
        columns = re.split(r"\s{2,}", line.strip())  # hex, "key", hex, meaning
        hex_text += columns[0] + (columns[2] if len(columns) > 2 else "")
    assert bytes.fromhex(hex_text) == doc_vector()["terms"]


KEY_SEEDS = st.binary(min_size=32, max_size=32)


@settings(max_examples=30, deadline=None)
@given(t=valid_terms(), seller_seed=KEY_SEEDS, buyer_seed=KEY_SEEDS)
def test_wattmesh_contracts_verify_with_pynacl_over_hand_built_terms(
    t: Terms, seller_seed: bytes, buyer_seed: bytes
) -> None:
    # GIVEN a contract signed by wattmesh
    data = t.encode()
    seller_sig = sign_terms(data, Ed25519PrivateKey.from_private_bytes(seller_seed))
    buyer_sig = sign_terms(data, Ed25519PrivateKey.from_private_bytes(buyer_seed))
    # WHEN an outsider rebuilds the terms from their values and checks with libsodium
    rebuilt = hand_encode({"version": 1, **{k: getattr(t, k) for k in DOC_KEY_ORDER[1:]}})
    # THEN the bytes agree and both signatures verify
    assert rebuilt == data
    nacl.signing.VerifyKey(bytes(nacl.signing.SigningKey(seller_seed).verify_key)).verify(
        DOC_DOMAIN + rebuilt, seller_sig
    )
    nacl.signing.VerifyKey(bytes(nacl.signing.SigningKey(buyer_seed).verify_key)).verify(
        DOC_DOMAIN + rebuilt, buyer_sig
    )


def test_doc_states_the_limits_of_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert "at most **1024 bytes**" in text
    Terms.decode(packed(session="é" * 128, community="c" * 64, buyer="b" * 64, seller="s" * 64))
    with pytest.raises(DecodeError, match="1 KiB"):
        Terms.decode(b"\x00" * 1025)
    assert "776174746d6573682f636f6e74726163742f763100" in text
