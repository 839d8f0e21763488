"""Recurring market sessions with no coordinator: who trades in this interval (sans-IO).

Theory of operation
-------------------
Time is cut into intervals of ``interval_s`` seconds aligned to the Unix epoch (UTC):
interval n starts at ``t_n = n · interval_s``. Its session id is derived, never
announced: ``<community>-<YYYYmmddTHHMMSS of t_n in UTC>``, so every peer whose clock
is right to a few seconds names the same session.

1. **Join** (from ``t_n``): each online peer broadcasts ``session.join`` {digest,
   neighbours} once, and again every ``join_resend_s`` until ``t_n + join_window_s``.
   ``digest`` is a SHA-256 over the community's public terms (mechanism, its settings,
   tariff, fees); a join with another digest is not counted: that peer runs another
   configuration and cannot trade with this one.
2. **View** (at ``t_n + join_window_s``, by the peer's own clock): each peer broadcasts
   ``session.view`` {members}: the sorted ids it heard join (itself included).
3. **Decide** (at ``t_n + join_window_s + view_window_s``): the participants are the
   peers whose view arrived and who appear in *every* view that arrived (itself
   included). Every peer that received the same views decides the same set; a peer that
   is late (or whose view some peers missed) is left out of the session, or the session
   fails for the peers that disagree at the market's start barrier and they try again
   next interval. Nobody waits for an absent peer beyond these two windows.

Clock skew of a few seconds only shifts when a peer sends; the windows (defaults 8 s
and 4 s) absorb it. Messages of other sessions fail the session check of the wire.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.mechanism import Outgoing
from wattmesh.protocols.wire import Envelope

__all__ = ["JOIN_TYPE", "VIEW_TYPE", "Membership", "MembershipTiming", "interval_start", "public_digest", "session_id"]

JOIN_TYPE = "session.join"
VIEW_TYPE = "session.view"


def interval_start(now_s: float, interval_s: float) -> float:
    """Start of the interval containing ``now_s`` [s since the epoch]."""
    return (now_s // interval_s) * interval_s


def session_id(community: str, start_s: float) -> str:
    """The session of the interval starting at ``start_s``: ``<community>-YYYYmmddTHHMMSS`` (UTC)."""
    stamp = dt.datetime.fromtimestamp(start_s, tz=dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{community}-{stamp}"


def public_digest(terms: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the community's public terms as canonical JSON."""
    canonical = json.dumps(terms, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class MembershipTiming:
    """Windows of the membership phase [s]."""

    join_window_s: float = 8.0
    view_window_s: float = 4.0
    join_resend_s: float = 2.0

    def __post_init__(self) -> None:
        if not (self.join_window_s > 0 and self.view_window_s > 0 and self.join_resend_s > 0):
            raise ValueError("membership windows must be > 0")


@dataclass(slots=True)
class Membership:
    """One peer's view of who joins one session.

    Drive it like a market core: :meth:`start`, :meth:`receive`, :meth:`on_timer`
    (``now`` in seconds since the epoch). When :attr:`participants` is set the phase is
    over; ``neighbours`` of every participant (``None`` = anyone) come with it.
    """

    peer_id: str
    start_s: float
    digest: str
    neighbours: Sequence[str] | None
    timing: MembershipTiming = field(default_factory=MembershipTiming)
    joined: dict[str, Sequence[str] | None] = field(default_factory=dict)
    views: dict[str, tuple[str, ...]] = field(default_factory=dict)
    participants: tuple[str, ...] | None = None
    foreign: set[str] = field(default_factory=set)  # joined with another digest
    _last_join: float = -1e18
    _view_sent: bool = False

    @property
    def join_deadline(self) -> float:
        return self.start_s + self.timing.join_window_s

    @property
    def decide_deadline(self) -> float:
        return self.join_deadline + self.timing.view_window_s

    @property
    def done(self) -> bool:
        return self.participants is not None

    def start(self, now: float) -> list[Outgoing]:
        self.joined[self.peer_id] = None if self.neighbours is None else list(self.neighbours)
        return self.on_timer(now)

    def next_deadline(self) -> float | None:
        if self.done:
            return None
        if not self._view_sent:
            return min(self.join_deadline, self._last_join + self.timing.join_resend_s)
        return self.decide_deadline

    def on_timer(self, now: float) -> list[Outgoing]:
        if self.done:
            return []
        if now < self.join_deadline:
            if now - self._last_join >= self.timing.join_resend_s:
                self._last_join = now
                body = {"digest": self.digest, "neighbours": self.joined[self.peer_id]}
                return [Outgoing("broadcast", JOIN_TYPE, body)]
            return []
        out: list[Outgoing] = []
        if not self._view_sent:
            self._view_sent = True
            members = tuple(sorted(self.joined))
            self.views[self.peer_id] = members
            out.append(Outgoing("broadcast", VIEW_TYPE, {"members": list(members)}))
        if now >= self.decide_deadline:
            self._decide()
        return out

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """A verified ``session.join`` or ``session.view`` of this session.

        Raises:
            ProtocolError: malformed body or another message type.
        """
        body, sender = envelope.body, envelope.sender
        if envelope.type == JOIN_TYPE:
            digest, neighbours = body.get("digest"), body.get("neighbours")
            if not isinstance(digest, str) or not (
                neighbours is None or (isinstance(neighbours, list) and all(isinstance(n, str) for n in neighbours))
            ):
                raise ProtocolError("malformed session.join", peer_id=sender)
            if digest != self.digest:
                self.foreign.add(sender)
            elif now <= self.join_deadline and not self._view_sent:
                self.joined[sender] = neighbours
            return []
        if envelope.type == VIEW_TYPE:
            members = body.get("members")
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members) or len(members) > 10_000:
                raise ProtocolError("malformed session.view", peer_id=sender)
            if now <= self.decide_deadline and not self.done:
                self.views[sender] = tuple(sorted(set(members)))
            return []
        raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=sender)

    def _decide(self) -> None:
        agreed = set(self.views)
        for members in self.views.values():
            agreed &= set(members)
        self.participants = tuple(sorted(agreed)) if self.peer_id in agreed else ()

    def links(self) -> dict[str, tuple[str, ...]]:
        """Mutual-consent links among the participants (a pair trades only if both allow it)."""
        assert self.participants is not None
        chosen = set(self.participants)

        def allows(a: str, b: str) -> bool:
            listed = self.joined.get(a)
            return listed is None or b in listed

        return {
            p: tuple(sorted(q for q in chosen if q != p and allows(p, q) and allows(q, p))) for p in self.participants
        }
