"""Deadlines of one peer's synchronous rounds (sans-IO), shared by the round-based cores.

A round waits for every neighbour. With no progress for ``round_timeout_s`` the peer
re-publishes its last round messages; each re-send since the last progress doubles the
wait before the next (a slow round must not be buried under re-sends, docs/admm.md),
and nudges from neighbours are answered at most once per half interval. With no
progress for ``neighbour_timeout_s`` the session gives up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RoundTimer"]


@dataclass(slots=True)
class RoundTimer:
    """Progress and re-send times of one peer [s]; ``now`` is always an argument."""

    round_timeout_s: float
    neighbour_timeout_s: float
    last_progress: float = 0.0
    last_resend: float = -math.inf
    resends: int = 0  # since the last progress

    def progress(self, now: float) -> None:
        """A round completed: the backoff starts over."""
        self.last_progress = now
        self.resends = 0

    @property
    def give_up_at(self) -> float:
        return self.last_progress + self.neighbour_timeout_s

    def interval(self) -> float:
        """round_timeout_s · 2^(re-sends since the last progress) [s]."""
        return self.round_timeout_s * 2.0 ** min(self.resends, 16)

    def next_deadline(self) -> float:
        return min(self.give_up_at, max(self.last_progress, self.last_resend) + self.interval())

    def resend_due(self, now: float) -> bool:
        return now >= max(self.last_progress, self.last_resend) + self.interval()

    def take_resend(self, now: float) -> bool:
        """Whether to re-send now (and count it), at most once per half interval."""
        if now - self.last_resend < self.interval() / 2:
            return False
        self.last_resend = now
        self.resends += 1
        return True
