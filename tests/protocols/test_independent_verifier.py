"""An independent verifier written from docs/wire.md alone, and the doc's test vector.

Nothing here imports wattmesh's decoding code: msgpack is parsed by hand following the
table in docs/wire.md §2, signatures are checked with PyNaCl (libsodium) rather than
pyca/cryptography, and the patterns are copied from the document. wattmesh is used
only to *produce* frames and as the other side of the agreement checks.

The worked test vector is read out of docs/wire.md itself, so the document cannot
drift from the code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import Envelope, Verifier, encode

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire.md"


# ---------------------------------------------------------------- the verifier


class Rejected(Exception):
    """The independent verifier refuses a frame."""


DOMAIN = bytes.fromhex("776174746d6573682f763100")  # docs/wire.md §1, typed from the page
MAX_FRAME = 262_144
MAX_PAYLOAD_DEPTH = 33  # body ≤ 32 levels (§6) inside the payload map
FIELD_TYPES = {
    "version": int,
    "type": str,
    "sender": str,
    "community": str,
    "session": str,
    "seq": int,
    "time_ms": int,
    "body": dict,
}
PATTERNS = {
    "type": r"[a-z][a-z0-9_.]{0,31}",
    "sender": r"[a-z0-9-]{1,64}",
    "community": r"[a-z0-9-]{1,64}",
    "session": r"[A-Za-z0-9_.:-]{1,128}",
}


class _Reader:
    """Hand-written msgpack reader for exactly the subset of docs/wire.md §2."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Rejected("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def item(self, depth: int) -> Any:
        b = self.uint(1)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.str(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        widths = {0: 1, 1: 2, 2: 4, 3: 8}
        if 0xC4 <= b <= 0xC6:
            return self.take(self.uint(widths[b - 0xC4]))
        if b == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if 0xCC <= b <= 0xCF:
            return self.uint(widths[b - 0xCC])
        if 0xD0 <= b <= 0xD3:
            return int.from_bytes(self.take(widths[b - 0xD0]), "big", signed=True)
        if 0xD9 <= b <= 0xDB:
            return self.str(self.uint(widths[b - 0xD9]))
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 if b == 0xDC else 4), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 if b == 0xDE else 4), depth)
        raise Rejected(f"byte {b:#04x} (ext or unused) is not allowed")

    def str(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid UTF-8") from None

    def array(self, n: int, depth: int) -> list[Any]:
        if depth + 1 > MAX_PAYLOAD_DEPTH:
            raise Rejected("too deep")
        return [self.item(depth + 1) for _ in range(n)]

    def map(self, n: int, depth: int) -> dict[str, Any]:
        if depth + 1 > MAX_PAYLOAD_DEPTH:
            raise Rejected("too deep")
        result: dict[str, Any] = {}
        for _ in range(n):
            key = self.item(depth + 1)
            if not isinstance(key, str):
                raise Rejected("map key is not a str")
            if key in result:
                raise Rejected("duplicate key")
            result[key] = self.item(depth + 1)
        return result

    def whole(self) -> Any:
        value = self.item(0)
        if self.pos != len(self.data):
            raise Rejected("trailing bytes")
        return value


def split_frame(frame: bytes) -> tuple[bytes, bytes]:
    """§3, by hand: array of exactly two bin items, nothing after them."""
    if len(frame) > MAX_FRAME:
        raise Rejected("too big")
    reader = _Reader(frame)
    head = reader.uint(1)
    count = head & 0x0F if 0x90 <= head <= 0x9F else None
    if head == 0xDC:
        count = reader.uint(2)
    elif head == 0xDD:
        count = reader.uint(4)
    if count != 2:
        raise Rejected("not an array of 2")
    items = []
    for _ in range(2):
        kind = reader.uint(1)
        if kind not in (0xC4, 0xC5, 0xC6):
            raise Rejected("item is not bin")
        items.append(reader.take(reader.uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[kind])))
    if reader.pos != len(frame):
        raise Rejected("trailing bytes")
    payload, signature = items
    if len(signature) != 64:
        raise Rejected("signature is not 64 bytes")
    return payload, signature


def _body_ok(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_body_ok(v) for v in value.values())
    if isinstance(value, list):
        return all(_body_ok(v) for v in value)
    return True


def independent_verify(
    frame: bytes,
    roster: dict[str, bytes],
    community: str,
    session: str | None,
    last_seq: dict[str, int],
) -> dict[str, Any]:
    """docs/wire.md §7, steps 1-15. Returns the payload fields or raises Rejected."""
    payload, signature = split_frame(frame)
    fields = _Reader(payload).whole()
    if not isinstance(fields, dict) or set(fields) != set(FIELD_TYPES):
        raise Rejected("not the 8 keys")
    for name, kind in FIELD_TYPES.items():
        if type(fields[name]) is not kind:  # bool is not int, float is not int
            raise Rejected(f"{name} has the wrong type")
    if fields["version"] != 1 or not _body_ok(fields["body"]):
        raise Rejected("version or body")
    for name, pattern in PATTERNS.items():
        if not re.fullmatch(pattern, fields[name]):
            raise Rejected(f"{name} pattern")
    if not 1 <= fields["seq"] <= 2**63 - 1:
        raise Rejected("seq range")
    if fields["sender"] not in roster:
        raise Rejected("unknown sender")
    try:
        nacl.signing.VerifyKey(roster[fields["sender"]]).verify(DOMAIN + payload, signature)
    except nacl.exceptions.BadSignatureError:
        raise Rejected("bad signature") from None
    if fields["community"] != community or (session is not None and fields["session"] != session):
        raise Rejected("wrong context")
    if fields["seq"] <= last_seq.get(fields["sender"], 0):
        raise Rejected("replay")
    last_seq[fields["sender"]] = fields["seq"]
    return fields


# ---------------------------------------------------------------- the document


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def doc_block(marker: str) -> str:
    """The fenced code block right after ``<!-- marker -->`` in docs/wire.md."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```\w*\n(.*?)```", doc_text(), re.S)
    assert match, f"docs/wire.md lacks the block marked {marker}"
    return match.group(1)


def doc_vector() -> dict[str, bytes]:
    """name -> bytes from the hex block; continuation lines start with spaces."""
    values: dict[str, str] = {}
    name = ""
    for line in doc_block("vector-1:hex").splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            values[name] += line.strip()
        else:
            name, hex_text = line.split()
            values[name] = hex_text
    return {k: bytes.fromhex(v) for k, v in values.items()}


def doc_envelope() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(doc_block("vector-1:envelope"))
    return value


def test_vector_public_key_is_derived_from_the_seed() -> None:
    vector = doc_vector()
    assert set(vector) == {"seed", "public", "domain", "payload", "signature", "frame"}
    key = nacl.signing.SigningKey(vector["seed"])
    assert bytes(key.verify_key) == vector["public"]
    # and it is RFC 8032 §7.1 TEST 1, as the page says
    assert vector["public"].hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )


def test_vector_domain_is_the_one_wattmesh_signs_with() -> None:
    from wattmesh.protocols.wire import DOMAIN as WATTMESH_DOMAIN

    assert doc_vector()["domain"] == DOMAIN == WATTMESH_DOMAIN


def test_vector_signature_is_what_libsodium_computes() -> None:
    vector = doc_vector()
    signed = nacl.signing.SigningKey(vector["seed"]).sign(vector["domain"] + vector["payload"])
    assert signed.signature == vector["signature"]


def test_vector_frame_is_payload_and_signature_wrapped_as_documented() -> None:
    vector = doc_vector()
    assert len(vector["frame"]) == 211
    assert vector["frame"] == (
        b"\x92"
        + b"\xc4"
        + bytes([len(vector["payload"])])
        + vector["payload"]
        + b"\xc4\x40"
        + vector["signature"]
    )
    assert split_frame(vector["frame"]) == (vector["payload"], vector["signature"])


def test_vector_frame_is_what_wattmesh_encodes_byte_for_byte() -> None:
    vector = doc_vector()
    fields = doc_envelope()
    key = Ed25519PrivateKey.from_private_bytes(vector["seed"])
    assert encode(Envelope(**fields), key) == vector["frame"]


def test_vector_is_accepted_by_both_verifiers_with_the_documented_content() -> None:
    vector = doc_vector()
    fields = doc_envelope()
    roster = {"h001": vector["public"]}
    assert independent_verify(vector["frame"], roster, "demo", "run-7", {}) == fields
    wattmesh_roster = Roster.from_toml(f'[peers]\nh001 = "{vector["public"].hex()}"\n')
    envelope = Verifier(wattmesh_roster, "demo", "run-7").verify(vector["frame"])
    assert envelope == Envelope(**fields)
    assert isinstance(envelope.body["k"], int) and isinstance(envelope.body["t"]["h002"], float)


def test_roster_example_in_the_doc_parses_and_matches_the_vector_key() -> None:
    match = re.search(r"```toml\n(.*?)```", doc_text(), re.S)
    assert match
    roster = Roster.from_toml(match.group(1))
    assert sorted(roster) == ["h001", "h002"]
    raw = nacl.signing.SigningKey(doc_vector()["seed"]).verify_key
    assert roster.to_toml().count(bytes(raw).hex()) == 1


def test_doc_states_the_constants_of_the_code() -> None:
    from wattmesh.protocols.wire import MAX_FRAME_BYTES

    text = doc_text()
    assert MAX_FRAME_BYTES == MAX_FRAME
    assert "262 144" in text
    assert "at most **32**" in text
    for name, pattern in PATTERNS.items():
        assert f"`{pattern}`" in text, name
    assert "WATTMESH_FUZZ_EXAMPLES" in text
    properties = (Path(__file__).parent / "test_wire_properties.py").read_text()
    assert 'os.environ.get("WATTMESH_FUZZ_EXAMPLES")' in properties


def test_doc_topics_section_has_the_decided_layout() -> None:
    text = doc_text()
    for topic in (
        "presence/<peer>",
        "inbox/<peer>",
        "market/<peer>",
        "broadcast",
        "telemetry/<peer>",
        "report/<peer>",
    ):
        assert f"`wattmesh/v1/<community>/{topic}`" in text


# ---------------------------------------------------------------- agreement

SEEDS = {"h001": bytes([7]) * 32, "h002": bytes([8]) * 32}
KEYS = {pid: Ed25519PrivateKey.from_private_bytes(seed) for pid, seed in SEEDS.items()}
RAW_ROSTER = {pid: bytes(nacl.signing.SigningKey(s).verify_key) for pid, s in SEEDS.items()}
ROSTER = Roster({pid: key.public_key() for pid, key in KEYS.items()})


def both(frame: bytes, session: str | None = "s1") -> tuple[Any, Any]:
    """(independent result or 'rejected', wattmesh result or 'rejected') on fresh state."""
    try:
        mine: Any = independent_verify(frame, RAW_ROSTER, "demo", session, {})
    except Rejected:
        mine = "rejected"
    try:
        envelope = Verifier(ROSTER, "demo", session).verify(frame)
        theirs: Any = {name: getattr(envelope, name) for name in FIELD_TYPES}
    except ProtocolError:
        theirs = "rejected"
    return mine, theirs


def make(sender: str = "h001", seq: int = 1, body: Any = None, **kw: Any) -> bytes:
    values: dict[str, Any] = {
        "type": "admm.round",
        "community": "demo",
        "session": "s1",
        "time_ms": 0,
        **kw,
    }
    return encode(Envelope(sender=sender, seq=seq, body=body or {"k": 1}, **values), KEYS[sender])


def test_wattmesh_frames_verify_with_pynacl() -> None:
    for n, body in enumerate(
        [
            {},
            {"k": 1},
            {"t": {"h002": -0.5}, "votes": [True]},
            {"nested": [[1, 2.5], {"a": None, "b": b"\x00"}]},
        ],
        start=1,
    ):
        frame = make(seq=n, body=body)
        mine, theirs = both(frame)
        assert mine != "rejected"
        assert mine == theirs


HOSTILE = {
    "forged by h002": lambda: (
        make(sender="h001", body={"k": 1}, seq=1)[:-64] + KEYS["h002"].sign(b"x")[:64]
    ),
    "other community": lambda: make(community="other"),
    "other session": lambda: make(session="s2"),
    "trailing": lambda: make() + b"\x00",
    "bin32 items": lambda: _rewrap_bin32(make()),
    "array16 outer": lambda: b"\xdc\x00\x02" + make()[1:],
    "unknown sender": lambda: encode(Envelope("x", "h999", "demo", "s1", 1, 0, {}), KEYS["h001"]),
}


def _rewrap_bin32(frame: bytes) -> bytes:
    payload, signature = split_frame(frame)
    return b"\x92" + b"".join(
        b"\xc6" + struct.pack(">I", len(item)) + item for item in (payload, signature)
    )


def test_both_verifiers_agree_on_hand_made_cases() -> None:
    expected_accept = {"bin32 items", "array16 outer"}
    for name, build in HOSTILE.items():
        mine, theirs = both(build())
        assert mine == theirs, name
        assert (mine != "rejected") == (name in expected_accept), name


def test_the_sequence_rule_agrees() -> None:
    frames = [make(seq=s) for s in (3, 3, 2, 4, 10, 9)]
    mine_state: dict[str, int] = {}
    verifier = Verifier(ROSTER, "demo", "s1")
    for frame in frames:
        try:
            independent_verify(frame, RAW_ROSTER, "demo", "s1", mine_state)
            mine = True
        except Rejected:
            mine = False
        try:
            verifier.verify(frame)
            theirs = True
        except ProtocolError:
            theirs = False
        assert mine == theirs
    assert mine_state == verifier.last_seq == {"h001": 10}


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
bodies = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(
    body=bodies, edit=st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.binary(max_size=3))
)
def test_both_verifiers_agree_on_generated_and_edited_frames(
    body: dict[str, Any], edit: tuple[int, int, bytes]
) -> None:
    frame = make(body=body)
    mine, theirs = both(frame)
    assert mine == theirs != "rejected"
    start, length, replacement = edit
    start %= len(frame) + 1
    edited = frame[:start] + replacement + frame[start + length :]
    mine, theirs = both(edited)
    assert mine == theirs
    if mine != "rejected":  # only a re-wrapping of the same signed bytes may pass
        assert split_frame(edited) == split_frame(frame)


def test_a_malleated_signature_with_s_plus_l_is_refused_by_both() -> None:
    """docs/wire.md §4: S must be below the group order L (RFC 8032 §5.1.7)."""
    group_order = 2**252 + 27742317777372353535851937790883648493
    payload, signature = split_frame(make())
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + group_order).to_bytes(32, "little")
    frame = b"\x92\xc4" + bytes([len(payload)]) + payload + b"\xc4\x40" + malleated
    assert both(frame) == ("rejected", "rejected")
    # the unmodified signature, re-wrapped the same way, is accepted by both
    original = b"\x92\xc4" + bytes([len(payload)]) + payload + b"\xc4\x40" + signature
    assert "rejected" not in both(original)
