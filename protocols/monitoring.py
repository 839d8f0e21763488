"""What a monitor knows about a running market, built only from verified telemetry.

Sans-IO: the monitor shell feeds it envelopes and ``now``; it keeps per-peer status,
a per-iteration history (for the live view and the report's plots) and the settled
outcome once reports arrive. It never sees a private cost parameter: peers publish
residuals, price ranges, their net position and their own current cost only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.evidence import EVIDENCE_TYPE, verify_evidence
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import Envelope

__all__ = ["IterationSummary", "MonitorState", "PeerStatus", "Snapshot"]

STATUS_SUFFIX = ".status"
"""Per-round telemetry of any mechanism is ``<mechanism>.status``."""
REPORT_SUFFIX = ".report"
FAILED_TYPE = "session.failed"
LATE_AFTER_S = 2.0
"""A peer is late when it has not reported the current iteration for this long."""


@dataclass(slots=True)
class PeerStatus:
    iteration: int = 0
    primal: float = math.inf
    dual: float = math.inf
    converged: bool = False
    price_min: float = math.nan
    price_max: float = math.nan
    cost: float = math.nan
    online: bool = False
    finished: bool = False
    failed: str | None = None


@dataclass(frozen=True, slots=True)
class IterationSummary:
    """Community-wide figures of one iteration (from every peer that reported it)."""

    iteration: int
    peers: int
    primal: float  # Σ_i Σ_j |t_ij + t_ji| [kWh] (each link counted from both ends)
    dual: float  # Σ_i Σ_j ρ_ij |Δz_ij| [currency/kWh]
    price_min: float
    price_mean: float
    price_max: float
    converged_share: float
    social_cost: float  # Σ of each peer's cost if the market stopped here


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One frame of the live view."""

    session: str | None
    iteration: int
    expected_peers: int | None
    online: int
    late: int
    dropped: int
    finished: int
    latest: IterationSummary | None
    settled: bool
    settled_line: str | None
    converged_share: float
    liars: tuple[str, ...] = ()  # peers proven to have equivocated (signed proofs checked)


@dataclass(slots=True)
class _Round:
    primal: float = 0.0
    dual: float = 0.0
    price_min: float = math.inf
    price_max: float = -math.inf
    price_sum: float = 0.0
    converged: int = 0
    cost: float = 0.0
    peers: int = 0


@dataclass(slots=True)
class MonitorState:
    """Accumulates telemetry, presence and reports of one community.

    Attributes:
        expected_peers: how many peers the session has, when known (the run launcher
            knows; a monitor joining from outside learns it from presence).
    """

    expected_peers: int | None = None
    session: str | None = None
    roster: Roster | None = None  # to check equivocation proofs; without it proofs are not shown
    community: str | None = None
    liars: dict[str, str] = field(default_factory=dict)  # accused -> first peer that proved it
    peers: dict[str, PeerStatus] = field(default_factory=dict)
    reports: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    _rounds: dict[int, _Round] = field(default_factory=dict)
    _last_progress: dict[str, float] = field(default_factory=dict)

    def set_online(self, peer_id: str, online: bool) -> None:
        """Presence as the connection verified it (retained birth, Last Will)."""
        self.peers.setdefault(peer_id, PeerStatus()).online = online

    def observe(self, channel: str, envelope: Envelope, now: float) -> None:
        """Take one verified message from the presence, telemetry or report channel."""
        status = self.peers.setdefault(envelope.sender, PeerStatus())
        body = envelope.body
        if channel == "presence":
            status.online = bool(body.get("online"))
            return
        if self.session is None and channel in ("telemetry", "report"):
            self.session = envelope.session
        if envelope.session != self.session:
            return  # a monitor follows one session at a time: the first it sees
        status.online = True
        if channel == "telemetry" and envelope.type == EVIDENCE_TYPE:
            self._on_evidence(envelope)
        elif channel == "telemetry" and envelope.type.endswith(STATUS_SUFFIX):
            self._on_status(envelope.sender, status, body, now)
        elif channel == "report" and envelope.type.endswith(REPORT_SUFFIX):
            status.finished = True
            self.reports[envelope.sender] = body
        elif channel == "report" and envelope.type == FAILED_TYPE:
            status.failed = str(body.get("reason", "failed"))

    def _on_evidence(self, envelope: Envelope) -> None:
        """A peer reports a lie: shown only if the proof holds under the roster."""
        if self.roster is None or self.community is None:
            return
        try:
            proof = verify_evidence(envelope.body, self.roster, self.community)
        except ProtocolError:
            return
        self.liars.setdefault(proof.accused, envelope.sender)

    def _on_status(self, sender: str, status: PeerStatus, body: Mapping[str, Any], now: float) -> None:
        try:
            k = int(body["k"])
            values = {name: float(body[name]) for name in ("primal", "dual", "price_min", "price_max", "cost")}
        except (KeyError, TypeError, ValueError):
            return  # a malformed status is ignored, not trusted
        if k <= status.iteration:
            return
        status.iteration = k
        status.converged = bool(body.get("converged"))
        status.primal, status.dual = values["primal"], values["dual"]
        status.price_min, status.price_max, status.cost = values["price_min"], values["price_max"], values["cost"]
        self._last_progress[sender] = now
        r = self._rounds.setdefault(k, _Round())
        r.peers += 1
        r.primal += values["primal"]
        r.dual += values["dual"]
        r.price_min = min(r.price_min, values["price_min"])
        r.price_max = max(r.price_max, values["price_max"])
        r.price_sum += 0.5 * (values["price_min"] + values["price_max"])
        r.converged += status.converged
        r.cost += values["cost"]

    @property
    def iteration(self) -> int:
        return max((s.iteration for s in self.peers.values()), default=0)

    def history(self) -> list[IterationSummary]:
        """Per-iteration summaries, oldest first (only iterations every active peer reached)."""
        return [self._summary(k) for k in sorted(self._rounds)]

    def _summary(self, k: int) -> IterationSummary:
        r = self._rounds[k]
        n = max(r.peers, 1)
        return IterationSummary(
            k, r.peers, r.primal, r.dual,
            r.price_min if r.peers else math.nan, r.price_sum / n,
            r.price_max if r.peers else math.nan, r.converged / n, r.cost,
        )  # fmt: skip

    def snapshot(self, now: float) -> Snapshot:
        """The live view's figures at time ``now``."""
        current = self.iteration
        in_market = [p for p, s in self.peers.items() if s.iteration > 0 or s.finished]
        late = sum(
            1
            for p in in_market
            if not self.peers[p].finished
            and self.peers[p].iteration < current
            and now - self._last_progress.get(p, now) > LATE_AFTER_S
        )
        dropped = sum(1 for s in self.peers.values() if s.failed or (not s.online and not s.finished and s.iteration > 0))
        # the latest iteration that every active peer has reported is the honest "now"
        complete = [k for k, r in self._rounds.items() if r.peers >= max(len(in_market) - late - dropped, 1)]
        latest = self._summary(max(complete)) if complete else None
        expected = self.expected_peers or (len(in_market) or None)
        finished = len(self.reports)
        # a peer without a report is done with too when it failed, or when its
        # neighbours' reports say they excluded it (gone for good, or a liar)
        excluded = {j for r in self.reports.values() for j in r.get("excluded", ())}
        left_out = sorted(({p for p, s in self.peers.items() if s.failed} | excluded) - set(self.reports))
        settled = expected is not None and finished > 0 and finished + len(left_out) >= expected
        line = None
        if settled:
            cost = sum(float(r["cost"]) for r in self.reports.values())
            iterations = max(int(r["iterations"]) for r in self.reports.values())
            state = "converged" if all(r.get("converged") for r in self.reports.values()) else "stopped unconverged"
            line = f"market settled: {state} at iteration {iterations}, social cost {cost:.4f}"
            if left_out:
                shown = ", ".join(left_out[:5]) + (" …" if len(left_out) > 5 else "")
                line += f", without {shown}"
        share = latest.converged_share if latest else 0.0
        return Snapshot(
            self.session, current, expected, sum(s.online for s in self.peers.values()), late,
            dropped, finished, latest, settled, line, share, tuple(sorted(self.liars)),
        )  # fmt: skip
