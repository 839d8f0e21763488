"""Equivocation: one peer signing two different messages for the same round (sans-IO).

A round message is a peer's commitment for that round; an honest peer may re-send it
(same body, new sequence number) but never change it. Two verified frames from the same
sender, of the same type, session and round ``k``, with different bodies, are a
*transferable proof* of lying: anyone holding the roster can check both signatures and
see the contradiction, without trusting the peer that reports it.

:class:`EquivocationDetector` keeps the first body per (sender, type, k) and returns an
:class:`Equivocation` when a contradicting one arrives; :func:`verify_evidence` is what a
third party (another peer, the monitor, an auditor) runs on a reported proof.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import Envelope, Verifier

__all__ = ["EVIDENCE_TYPE", "Equivocation", "EquivocationDetector", "verify_evidence"]

EVIDENCE_TYPE = "fault.equivocation"
"""Telemetry type carrying a proof: {accused, frames: [bin, bin]}."""


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Two signed frames of ``accused`` that contradict each other."""

    accused: str
    first: bytes
    second: bytes

    def to_body(self) -> dict[str, Any]:
        return {"accused": self.accused, "frames": [self.first, self.second]}


@dataclass(slots=True)
class EquivocationDetector:
    """Remembers each sender's first body per (type, round).

    Only messages with an integer ``k`` in the body are commitments (round messages);
    others are ignored. Memory is bounded by keeping ``window`` rounds per sender.
    """

    window: int = 8
    _seen: dict[tuple[str, str, int], tuple[Mapping[str, Any], bytes]] = field(default_factory=dict)
    _latest: dict[str, int] = field(default_factory=dict)
    accused: set[str] = field(default_factory=set)

    def observe(self, envelope: Envelope, frame: bytes) -> Equivocation | None:
        """Check one verified message; a proof when it contradicts an earlier one."""
        k = envelope.body.get("k")
        if type(k) is not int:
            return None
        key = (envelope.sender, envelope.type, k)
        earlier = self._seen.get(key)
        if earlier is None:
            self._seen[key] = (envelope.body, frame)
            latest = max(self._latest.get(envelope.sender, k), k)
            self._latest[envelope.sender] = latest
            for old in [key for key in self._seen if key[0] == envelope.sender and key[2] <= latest - self.window]:
                del self._seen[old]
            return None
        body, first = earlier
        if _same(body, envelope.body):
            return None  # an honest re-send
        self.accused.add(envelope.sender)
        return Equivocation(envelope.sender, first, frame)


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return dict(a) == dict(b)


def verify_evidence(body: Mapping[str, Any], roster: Roster, community: str) -> Equivocation:
    """Check a reported proof with the public keys alone.

    Raises:
        ProtocolError: the proof does not hold (bad signature, different sender,
            session, type or round, or identical bodies).
    """
    accused, frames = body.get("accused"), body.get("frames")
    if not isinstance(accused, str) or not isinstance(frames, list) or len(frames) != 2:
        raise ProtocolError("malformed equivocation proof")
    if not all(isinstance(f, bytes) for f in frames):
        raise ProtocolError("malformed equivocation proof")
    # fresh verifiers: a proof is about signatures, not about sequence order
    a = Verifier(roster, community, None).verify(frames[0])
    b = Verifier(roster, community, None).verify(frames[1])
    if not (a.sender == b.sender == accused and a.type == b.type and a.session == b.session):
        raise ProtocolError("the two frames are not the same sender's same message", peer_id=accused)
    if type(a.body.get("k")) is not int or a.body.get("k") != b.body.get("k"):
        raise ProtocolError("the two frames are about different rounds", peer_id=accused)
    if _same(a.body, b.body):
        raise ProtocolError("the two frames say the same thing", peer_id=accused)
    return Equivocation(accused, frames[0], frames[1])
