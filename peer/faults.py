"""Faults a peer injects into itself on purpose: for tests, benchmarks and drills.

TCP turns network loss into delay, so loss and crashes are injected in the peer, at
named points of its own code, never by the network. A plan travels in the peer's job.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CRASH_POINTS", "NO_FAULTS", "FaultPlan"]

CRASH_POINTS = ("market.cleared", "contract.recorded")
"""``market.cleared``: the outcome is in the ledger, no contract signed yet.
``contract.recorded``: a contract became final on disk, its message not yet sent."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What goes wrong, deliberately. The default plan injects nothing."""

    crash_at: str | None = None  # SIGKILL this process at that point (once per process)

    def __post_init__(self) -> None:
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ValueError(f"crash_at must be one of {', '.join(CRASH_POINTS)}")

    def reached(self, point: str) -> None:
        """Called by the peer at each crash point; dies there if the plan says so."""
        if point == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FaultPlan:
        return cls(**d)


NO_FAULTS = FaultPlan()
