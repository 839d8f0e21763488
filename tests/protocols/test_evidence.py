"""Equivocation proofs: detected from two contradicting round messages, checkable by anyone."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.evidence import EquivocationDetector, verify_evidence
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import Envelope, Verifier, encode

KEYS = {pid: Ed25519PrivateKey.from_private_bytes(bytes([n + 1]) * 32) for n, pid in enumerate(("liar", "h1"))}
ROSTER = Roster({pid: key.public_key() for pid, key in KEYS.items()})


def frame(sender: str, seq: int, body: dict[str, object], *, type: str = "admm.round", session: str = "s1") -> bytes:
    return encode(Envelope(type, sender, "c", session, seq, 0, body), KEYS[sender])


def verified(data: bytes) -> Envelope:
    return Verifier(ROSTER, "c", None).verify(data)


def test_two_bodies_for_one_round_are_a_proof_anyone_can_check() -> None:
    # GIVEN a peer that signs two different trades for round 3
    detector = EquivocationDetector()
    honest = frame("liar", 1, {"k": 3, "t": {"h1": 1.0}})
    lie = frame("liar", 2, {"k": 3, "t": {"h1": 2.0}})
    # WHEN a neighbour sees both
    assert detector.observe(verified(honest), honest) is None
    proof = detector.observe(verified(lie), lie)
    # THEN it holds a proof naming the liar, which a third party verifies from the roster alone
    assert proof is not None and proof.accused == "liar" and detector.accused == {"liar"}
    checked = verify_evidence(proof.to_body(), ROSTER, "c")
    assert checked == proof


def test_an_honest_resend_is_not_a_lie() -> None:
    detector = EquivocationDetector()
    body = {"k": 3, "t": {"h1": 1.0}}
    first, again = frame("liar", 1, body), frame("liar", 2, body)
    assert detector.observe(verified(first), first) is None
    assert detector.observe(verified(again), again) is None
    assert not detector.accused


def test_different_rounds_or_types_are_not_contradictions() -> None:
    detector = EquivocationDetector()
    for seq, (k, kind) in enumerate([(3, "admm.round"), (4, "admm.round"), (3, "admm.status")], start=1):
        data = frame("liar", seq, {"k": k, "x": seq}, type=kind)
        assert detector.observe(verified(data), data) is None
    unnumbered = frame("liar", 9, {"x": 1})
    assert detector.observe(verified(unnumbered), unnumbered) is None


@pytest.mark.parametrize(
    "frames",
    [
        # the same body twice
        [frame("liar", 1, {"k": 3, "t": 1.0}), frame("liar", 2, {"k": 3, "t": 1.0})],
        # different rounds
        [frame("liar", 1, {"k": 3, "t": 1.0}), frame("liar", 2, {"k": 4, "t": 2.0})],
        # different senders: h1 cannot be framed with the liar's message
        [frame("liar", 1, {"k": 3, "t": 1.0}), frame("h1", 2, {"k": 3, "t": 2.0})],
        # different sessions
        [frame("liar", 1, {"k": 3, "t": 1.0}), frame("liar", 2, {"k": 3, "t": 2.0}, session="s2")],
        # a forged second frame (bit flipped: the signature fails)
        [frame("liar", 1, {"k": 3, "t": 1.0}), frame("liar", 2, {"k": 3, "t": 2.0})[:-1] + b"\x00"],
    ],
)
def test_a_proof_that_does_not_hold_is_refused(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        verify_evidence({"accused": "liar", "frames": frames}, ROSTER, "c")


@pytest.mark.parametrize(
    "body", [{}, {"accused": "liar"}, {"accused": "liar", "frames": [b"x"]}, {"accused": 1, "frames": []}]
)
def test_a_malformed_proof_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        verify_evidence(body, ROSTER, "c")


def test_memory_is_bounded_to_a_window_of_rounds() -> None:
    detector = EquivocationDetector(window=4)
    for k in range(1, 101):
        data = frame("liar", k, {"k": k})
        detector.observe(verified(data), data)
    assert len(detector._seen) <= 4


def test_the_monitor_shows_a_liar_only_when_the_proof_holds() -> None:
    from wattmesh.protocols.evidence import EVIDENCE_TYPE
    from wattmesh.protocols.monitoring import MonitorState

    # GIVEN a monitor with the roster, and h1 reporting the liar twice: a forged and a real proof
    state = MonitorState(expected_peers=2, roster=ROSTER, community="c")
    real = [frame("liar", 1, {"k": 3, "t": 1.0}), frame("liar", 2, {"k": 3, "t": 2.0})]
    fake = [real[0], frame("liar", 3, {"k": 3, "t": 1.0})]  # the same body: no contradiction
    for seq, frames in enumerate((fake, real), start=1):
        report = Envelope(EVIDENCE_TYPE, "h1", "c", "s1", seq, 0, {"accused": "liar", "frames": frames})
        state.observe("telemetry", report, 0.0)
        # THEN only the real proof names the liar in the view
        assert state.snapshot(0.0).liars == (() if frames is fake else ("liar",))
