"""Acceptance: hostile frames published into a live peer's inbox are dropped and counted.

The attacker is a bare paho-mqtt client, with no wattmesh code on its sending path: it
builds frames from docs/wire.md with msgpack and an Ed25519 key, then edits them. The
peer under attack is a real :class:`PeerConnection` on a real broker (both kinds).

Synchronisation without sleeping: after the hostile frames the attacker's client sends
one genuine frame on the same topic at the same QoS; MQTT delivers one client's
messages on one topic in order, so once the genuine frame is received every frame
before it has been processed.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import pytest
from _helpers import (
    TIMEOUT,
    RawPublisher,
    connect,
    make_keys,
    pack,
    payload_fields,
    sign,
    unique_community,
    with_duplicate_key,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.broker import BrokerHandle
from wattmesh.peer.connection import PeerConnection, Topics
from wattmesh.protocols.wire import MAX_FRAME_BYTES

ACCEPTED = "accepted"
HUGE_SEQ = 2**62  # a refused frame carrying it must not block later genuine frames
OUTSIDER = Ed25519PrivateKey.generate()  # in no roster


@dataclass
class Attacker:
    """Builds frames in the name of roster peer ``a`` (whose key it holds) and others."""

    key: Ed25519PrivateKey
    community: str
    seqs: Iterator[int]

    def genuine(self, **changes: object) -> bytes:
        """A frame of ``a`` signed with a's key, next seq unless ``changes`` say otherwise."""
        fields = payload_fields("a", self.community, next(self.seqs))
        fields.update(changes)
        return sign(self.key, pack(fields))


def _forged(at: Attacker) -> list[tuple[bytes, str]]:
    payload = pack(payload_fields("a", at.community, HUGE_SEQ))
    return [(sign(OUTSIDER, payload), "bad_signature")]


def _tampered_payload(at: Attacker) -> list[tuple[bytes, str]]:
    frame = bytearray(at.genuine())
    # The payload's last byte is the final vote, c2 (false); c3 (true) keeps it valid
    # msgpack, so only the signature can tell. The 64-byte signature + c4 40 follow it.
    index = len(frame) - 64 - 2 - 1
    assert frame[index] == 0xC2
    frame[index] ^= 0x01
    return [(bytes(frame), "bad_signature")]


def _tampered_signature(at: Attacker) -> list[tuple[bytes, str]]:
    frame = bytearray(at.genuine())
    frame[-1] ^= 0x80
    return [(bytes(frame), "bad_signature")]


def _replayed(at: Attacker) -> list[tuple[bytes, str]]:
    frame = at.genuine()
    return [(frame, ACCEPTED), (frame, "replay")]


def _older_after_newer(at: Attacker) -> list[tuple[bytes, str]]:
    older, newer = at.genuine(), at.genuine()
    return [(newer, ACCEPTED), (older, "replay")]


def _wrong_community(at: Attacker) -> list[tuple[bytes, str]]:
    return [(at.genuine(community="elsewhere", seq=HUGE_SEQ), "wrong_context")]


def _wrong_session(at: Attacker) -> list[tuple[bytes, str]]:
    return [(at.genuine(session="s2", seq=HUGE_SEQ), "wrong_context")]


def _unknown_sender(at: Attacker) -> list[tuple[bytes, str]]:
    payload = pack(payload_fields("mallory", at.community, 1))
    return [(sign(OUTSIDER, payload), "unknown_sender")]


def _garbage(at: Attacker) -> list[tuple[bytes, str]]:
    return [(b"\xc1 not msgpack at all", "malformed"), (b"hello world", "malformed")]


def _empty(at: Attacker) -> list[tuple[bytes, str]]:
    return [(b"", "malformed")]


def _oversized(at: Attacker) -> list[tuple[bytes, str]]:
    frame = at.genuine(seq=HUGE_SEQ, body={"blob": b"\x00" * MAX_FRAME_BYTES})
    assert len(frame) > MAX_FRAME_BYTES
    return [(frame, "malformed")]


def _duplicate_key(at: Attacker) -> list[tuple[bytes, str]]:
    fields = payload_fields("a", at.community, HUGE_SEQ)
    return [(sign(at.key, with_duplicate_key(fields)), "malformed")]


CASES: dict[str, Callable[[Attacker], list[tuple[bytes, str]]]] = {
    "forged": _forged,
    "tampered-payload": _tampered_payload,
    "tampered-signature": _tampered_signature,
    "replayed": _replayed,
    "older-after-newer": _older_after_newer,
    "wrong-community": _wrong_community,
    "wrong-session": _wrong_session,
    "unknown-sender": _unknown_sender,
    "garbage": _garbage,
    "empty": _empty,
    "oversized": _oversized,
    "duplicate-key": _duplicate_key,
}


async def _attack(
    victim: PeerConnection, raw: RawPublisher, at: Attacker, frames: list[tuple[bytes, str]]
) -> tuple[list[int], list[int]]:
    """Publish ``frames`` then a genuine marker frame into the victim's inbox.

    Returns:
        (seqs of the frames received, seqs the frames' outcomes say should be), both
        ending with the marker's.
    """
    inbox = Topics(at.community).of("inbox", victim.peer_id)
    marker = at.genuine(type="test.marker")
    raw.publish_all(inbox, [frame for frame, _ in frames] + [marker])
    expected = [_seq(frame) for frame, outcome in frames if outcome == ACCEPTED] + [_seq(marker)]
    received: list[int] = []
    while True:
        incoming = await victim.receive(TIMEOUT)
        assert (incoming.channel, incoming.envelope.sender) == ("inbox", "a")
        received.append(incoming.envelope.seq)
        if incoming.envelope.type == "test.marker":
            return received, expected


def _seq(frame: bytes) -> int:
    payload, _signature = msgpack.unpackb(frame)
    seq: int = msgpack.unpackb(payload)["seq"]
    return seq


@pytest.mark.parametrize("case", CASES)
async def test_hostile_frame_is_dropped_under_its_reason(
    any_broker: BrokerHandle, case: str
) -> None:
    community = unique_community()
    keys, roster = make_keys("a", "b")
    attacker = Attacker(keys["a"], community, itertools.count(1))
    frames = CASES[case](attacker)
    async with (
        connect("b", keys, roster, community, any_broker.url) as victim,
        RawPublisher(any_broker.url) as raw,
    ):
        received, expected = await _attack(victim, raw, attacker, frames)
        # the peer keeps working: a later genuine frame is accepted too
        again, expected_again = await _attack(victim, raw, attacker, [])

    assert received == expected
    assert again == expected_again
    assert victim.drops == Counter(outcome for _, outcome in frames if outcome != ACCEPTED)


async def test_peer_survives_every_hostile_frame_in_a_row(any_broker: BrokerHandle) -> None:
    """GIVEN a peer in a community
    WHEN one client throws every kind of hostile frame at its inbox
    THEN each is counted under its reason, and genuine peers still reach it."""
    community = unique_community()
    keys, roster = make_keys("a", "b", "c")
    attacker = Attacker(keys["a"], community, itertools.count(1))
    frames = [item for make in CASES.values() for item in make(attacker)]
    async with (
        connect("b", keys, roster, community, any_broker.url) as victim,
        connect("c", keys, roster, community, any_broker.url) as honest,
        RawPublisher(any_broker.url) as raw,
    ):
        received, expected = await _attack(victim, raw, attacker, frames)
        await honest.publish("inbox", "negotiation.offer", {"kwh": 2.0}, to="b")
        incoming = await victim.receive(TIMEOUT)

    assert received == expected
    assert (incoming.envelope.sender, incoming.envelope.body) == ("c", {"kwh": 2.0})
    assert victim.drops == Counter(
        malformed=5, bad_signature=3, replay=2, wrong_context=2, unknown_sender=1
    )
