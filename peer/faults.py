"""Faults a peer injects into itself on purpose: for tests, benchmarks and drills.

TCP turns network loss into delay, so loss and crashes are injected in the peer, at
named points of its own code, never by the network. A plan travels in the peer's job
(:class:`~wattmesh.peer.market.PeerJob`, as :meth:`FaultPlan.to_dict`).

- **Crashes**: :meth:`FaultPlan.reached` SIGKILLs the process at a named point.
- **Drops and delays**: the peer's transport adapter
  (:class:`~wattmesh.peer.connection.PeerConnection`) drops each verified incoming
  market or inbox message with probability ``drop_rate`` (counted as
  ``drops["injected"]``) and holds each one it keeps for a uniform random
  ``0..delay_s`` seconds, so messages may also overtake each other. Presence, reports
  and telemetry are never touched. The draws come from :meth:`FaultPlan.random`, a
  generator of the plan's own (seed, peer id): runs repeat, and peers sharing a plan
  still lose different messages.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CRASH_POINTS", "FAULT_CHANNELS", "NO_FAULTS", "FaultPlan"]

CRASH_POINTS = ("market.round", "market.cleared", "contract.recorded")
"""``market.round``: round ``crash_round``'s core snapshot is on disk, its round
message not yet sent (mid-market; a restart resumes from the snapshot).
``market.cleared``: the outcome is in the ledger, no contract signed yet.
``contract.recorded``: a contract became final on disk, its message not yet sent."""

FAULT_CHANNELS = ("market", "inbox")
"""Channels whose incoming messages drops and delays apply to: what mechanisms and the
settlement exchange. Presence (state, not messages) and reports are exempt."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What goes wrong, deliberately. The default plan injects nothing.

    Attributes:
        crash_at: SIGKILL this process at that point (see :data:`CRASH_POINTS`).
        crash_round: for ``crash_at = "market.round"``: the round [1, …] to die at.
        equivocate_round: a drill for lying peers: after this peer's real market message
            of that round it signs and publishes a second one offering other trades.
        drop_rate: probability in [0, 1) that a verified incoming market or inbox
            message is dropped.
        delay_s: each incoming market or inbox message is held for a uniform random
            time in [0, delay_s] before delivery [s].
        seed: seed of the drop and delay draws.
    """

    crash_at: str | None = None
    crash_round: int | None = None
    drop_rate: float = 0.0
    delay_s: float = 0.0
    seed: int = 0
    equivocate_round: int | None = None  # a lying peer: publishes a second, different round message

    def __post_init__(self) -> None:
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ValueError(f"crash_at must be one of {', '.join(CRASH_POINTS)}")
        if (self.crash_at == "market.round") != (self.crash_round is not None):
            raise ValueError('crash_round is required with crash_at = "market.round", and only then')
        if self.crash_round is not None and (isinstance(self.crash_round, bool) or self.crash_round < 1):
            raise ValueError("crash_round must be >= 1")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError("drop_rate must be in [0, 1)")
        if not 0.0 <= self.delay_s < float("inf"):
            raise ValueError("delay_s must be a finite number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError("seed must be an integer")

    @property
    def disturbs_messages(self) -> bool:
        """Whether the plan drops or delays messages at all."""
        return self.drop_rate > 0.0 or self.delay_s > 0.0

    def random(self, peer_id: str) -> random.Random:
        """The generator of this plan's draws at ``peer_id`` (never the global one)."""
        return random.Random(f"wattmesh-faults/{self.seed}/{peer_id}")

    def reached(self, point: str, *, round: int | None = None) -> None:
        """Called by the peer at each crash point; dies there if the plan says so.

        Args:
            point: one of :data:`CRASH_POINTS`.
            round: the market round, at ``market.round``.
        """
        if point == self.crash_at and (point != "market.round" or round == self.crash_round):
            os.kill(os.getpid(), signal.SIGKILL)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FaultPlan:
        return cls(**d)


NO_FAULTS = FaultPlan()
