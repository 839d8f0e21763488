"""Single-price consensus market over the sparse neighbour graph, one sans-IO core per peer.

Theory of operation
-------------------
Without fees the community problem (DESIGN.md §2) is a resource-allocation problem with
one coupling constraint: min Σ_i f_i(q_i) s.t. Σ_i q_i = 0, where
f_i(q) = min_y C_i(y) + grid(y − q) is peer i's cost of holding community position q
[kWh]. Its dual is one scalar, the community price λ [currency/kWh]. Each peer keeps an
estimate λ_i of it and a tracker s_i of the average imbalance (1/N)·Σ_j q_j [kWh], and
talks to its neighbours only (distributed dual ascent with gradient tracking: Nedić,
Olshevsky & Shi, "Achieving geometric convergence for distributed optimization over
time-varying graphs", SIAM J. Optim. 27(4), 2017 (DIGing); applied to economic dispatch
by Yang, Tan & Xu, "Consensus based approach for economic dispatch problem in a smart
grid", IEEE Trans. Power Systems 28(4), 2013). Round k → k+1 at peer i, with
Metropolis weights W_ij = 1 / (1 + max(deg_i, deg_j)) that both ends compute from the
public link lists:

    flow        u_ij^k   = W_ij (s_j^k − s_i^k)                          [kWh]
                F_ij    ← F_ij + u_ij^k                    (cumulative; F_ji = −F_ij)
    mixed       m_i^k    = s_i^k + Σ_j u_ij^k              (= Σ_j W_ij s_j^k, W_ii included)
    price       λ_i^{k+1} = Π( λ_i^k + Σ_j W_ij (λ_j^k − λ_i^k) + α m_i^k )
    position    q_i^{k+1} = clip( q_i^k − β m_i^k,  Q_i[λ_i^k, λ_i^{k+1}] )
    tracker     s_i^{k+1} = m_i^k + q_i^{k+1} − q_i^k

Both steps use the mixed tracker m_i (combine, then adapt): where a peer absorbs
without clipping its tracker becomes (1 − β)·m_i, so the trackers follow (I − βD)W,
which never amplifies for β ≤ 1; a step on the raw s_i with β = 1 diverged on sparse
communities, and the mixed form needed about half the rounds elsewhere (measured).
Π projects onto [sell, buy] with a grid (outside it the dual function is −∞: a peer
would buy unboundedly from the cheaper side) and is the identity without one.
Q_i[p, p'] is the interval of community positions that are a best response of peer i
to *some* price between p and p' (plus its role's sign). For a strictly convex cost it
is [y*(p'), y*(p)], y*(p) = clip((−p − b)/a, min, max); it is a whole segment where
the best response is set-valued: at a linear cost's marginal value −b (any y in
[min, max]) and at a tariff price, where a peer is indifferent between community and
grid for part of its position (at p = buy an importer may take part of its import from
the grid, at p = sell an exporter may sell part of its surplus to the grid; nobody
resells grid energy). The position step lets such indifferent peers absorb the
imbalance, so the tracker converges to 0 also when the price ends at a tariff or a kink.

A linear cost (a = 0) has its kink at its marginal value −b, a price the others' dual
steps would only oscillate around (the best response jumps from max to min there). A
peer whose step crosses its own kink while it can still absorb (its new position lies
strictly inside Q_i) sets λ_i^{k+1} = −b: it is marginal, and its neighbours' estimates
converge to its kink by mixing, as they do to a tariff bound. Limitation: two linear
costs whose kinks are both crossed on the way can both hold on, keeping the prices
apart with a balanced community; the market then ends unconverged at
``max_iterations`` (seen on a three-peer line without a grid starting from λ = 0).
ADMM has no such case.

Invariant (exact up to rounding): Σ_i s_i = Σ_i q_i, and s_i = q_i + Σ_j F_ij.

**Trades.** t_ij = −F_ij: the cumulative flow of the tracker along the link is the
energy routed from j to i. Both ends add the same float u_ij = −u_ji each round, so
t_ij = −t_ji bit for bit, and Σ_j t_ij = q_i − s_i: each peer's routed import equals
its position up to its tracker, which the stop rule bounds. F is a potential flow
(F_ij = W_ij (S_j − S_i) with S = Σ_k s^k), i.e. the electrical flow with
conductances W_ij: the minimum of Σ t_ij²/W_ij among routings of the same net
positions. It routes along the links, and may pass energy *through* a buyer or a seller
(roles bound a peer's position q_i, as DESIGN.md §2 states, not each link's sign).

**Stopping** as in :mod:`wattmesh.protocols.admm`: peer i is locally converged at round
k when its unrouted position and its price disagreement are small,

    |s_i| ≤ ε_abs + ε_rel |q_i|,    max_j |λ_j − λ_i| + |λ_i^{k+1} − λ_i^k| ≤ ε_abs + ε_rel |λ_i|,

and round messages carry windows of AND-votes and of min/max price estimates over the
last D rounds (D = diameter of the link graph). After D rounds every peer knows whether
all were converged at round k − D and the exact extremes of all λ_i^{k−D} of its
connected component. All stop on the same round; the clearing price is the midrange
of those extremes, the same float everywhere, and every trade is priced at it.

Late messages, re-sends, backoff and silent neighbours: exactly as in
:mod:`wattmesh.protocols.admm` (docs/admm.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wattmesh.protocols.admm import best_net_demand, standalone_cost
from wattmesh.protocols.demand import demand_bounds
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import CoreLifecycle, Outgoing, PeerOutcome, settings_from_mapping
from wattmesh.protocols.rounds import RoundTimer
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.wire import Envelope

__all__ = [
    "REPORT_TYPE",
    "ROUND_TYPE",
    "STATUS_TYPE",
    "ConsensusPeer",
    "ConsensusSettings",
    "create",
    "metropolis_weight",
    "position_range",
    "validate_settings",
]

ROUND_TYPE = "consensus.round"
STATUS_TYPE = "consensus.status"
"""Per-round telemetry: tracker, price disagreement, price range, position; no cost parameters."""
REPORT_TYPE = "consensus.report"
_MAX_WINDOW = 100_000  # a vote window longer than any diameter is junk


@dataclass(frozen=True, slots=True)
class ConsensusSettings:
    """``[market.consensus]`` of a scenario."""

    step: float = 0.03  # α [currency/kWh per kWh of tracked imbalance]
    position_step: float = 1.0  # β [-], share of the tracked imbalance an indifferent peer absorbs
    eps_rel: float = 1e-5
    eps_abs: float = 1e-7  # [kWh] for the tracker, [currency/kWh] for the price
    max_iterations: int = 5000
    initial_price: float | None = None  # default: mid grid tariff, else 0
    round_timeout_s: float = 10.0
    neighbour_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("step", "position_step", "eps_rel", "round_timeout_s", "neighbour_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.position_step > 1:
            raise ValueError("position_step must be <= 1")
        if self.eps_abs < 0 or self.max_iterations < 1:
            raise ValueError("eps_abs >= 0 and max_iterations >= 1 required")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ConsensusSettings:
        """Build from a TOML table; unknown keys and wrong types raise ``ValueError``."""
        return settings_from_mapping(cls, values)


def metropolis_weight(degree_i: int, degree_j: int) -> float:
    """W_ij = 1 / (1 + max(deg_i, deg_j)) [-]: symmetric, so both ends get the same float.

    With W_ii = 1 − Σ_j W_ij the matrix is doubly stochastic (Xiao, Boyd & Kim 2007).
    """
    return 1.0 / (1.0 + max(degree_i, degree_j))


def position_range(
    spec: PeerSpec, grid: tuple[float, float] | None, price_low: float, price_high: float
) -> tuple[float, float]:
    """Community positions q [kWh] that are a best response to some price in [price_low, price_high].

    Best response to p [currency/kWh]: argmin_q f(q) + p·q, f(q) = min_y C(y) + grid(y − q),
    within the role's sign. For sell < p < buy the grid is unused and q = y*(p); at
    p = buy an importer may take any part of its import from the grid instead
    (q ∈ [min(y*, 0), y*]); at p = sell an exporter may sell any part of its surplus
    to the grid (q ∈ [y*, max(y*, 0)]). Buying from one side to resell to the other
    also ties at a tariff price but is excluded: it only adds volume.

    Args:
        spec: the peer's private model.
        grid: (buy_price, sell_price) or None.
        price_low, price_high: the price segment [currency/kWh], low <= high.
    """
    low_q = demand_bounds(spec, price_high)[0]
    high_q = demand_bounds(spec, price_low)[1]
    if grid is not None:
        buy, sell = grid
        if price_high >= buy:
            low_q = min(low_q, 0.0)
        if price_low <= sell:
            high_q = max(high_q, 0.0)
    role_low = 0.0 if spec.role == "buyer" else -math.inf
    role_high = 0.0 if spec.role == "seller" else math.inf
    return min(max(low_q, role_low), role_high), min(max(high_q, role_low), role_high)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, float) and math.isfinite(value)) or _is_int(value)


@dataclass(slots=True)
class _Pending:
    """Round messages received ahead of use: round -> neighbour -> body."""

    by_round: dict[int, dict[str, Mapping[str, Any]]] = field(default_factory=dict)


class ConsensusPeer(CoreLifecycle):
    """The consensus state machine of one peer.

    Drive it with :meth:`start`, :meth:`receive` and :meth:`on_timer`; each returns the
    messages to publish. It never reads a clock: ``now`` [s] is always an argument.
    """

    def __init__(self, spec: PeerSpec, public: PublicScenario, horizon: int) -> None:
        """
        Args:
            spec: this peer's private model.
            public: the session's public scenario (links, fees, tariff, settings).
            horizon: rounds a vote needs to reach every peer; the diameter of the public
                link graph (or any larger number, the same at every peer).
        """
        self.peer_id = spec.id
        self.spec = spec
        self.settings = ConsensusSettings.from_mapping(public.settings)
        self.neighbours: tuple[str, ...] = tuple(public.links[spec.id])
        self.horizon = horizon
        grid = public.grid
        self._grid = None if grid is None else (grid.buy_price, grid.sell_price)
        degree = len(self.neighbours)
        self._weight = {j: metropolis_weight(degree, len(public.links[j])) for j in self.neighbours}
        self._half_fee = {j: 0.5 * public.fee(spec.id, j) for j in self.neighbours}
        initial = self.settings.initial_price
        if initial is None:
            initial = 0.0 if grid is None else 0.5 * (grid.buy_price + grid.sell_price)
        self.price = self._project(float(initial))  # λ_i [currency/kWh]
        # a linear cost's marginal value −b, where its best response is all of [min, max]
        self._kink = -spec.cost_linear if spec.cost_quadratic == 0 and spec.min_kwh < spec.max_kwh else None
        low, high = position_range(spec, self._grid, self.price, self.price)
        self.position = min(max(0.0, low), high)  # q_i [kWh], the point nearest 0
        self.tracker = self.position  # s_i [kWh]
        self.flows = dict.fromkeys(self.neighbours, 0.0)  # F_ij [kWh]; trade t_ij = −F_ij
        self.round = 0
        self._link_midpoints: dict[str, float] = {}  # (λ_i + λ_j)/2 of the last exchange
        self._votes: dict[int, bool] = {}
        self._extremes: dict[int, tuple[float, float]] = {}
        self._pending = _Pending()
        self._sent: dict[int, Outgoing] = {}
        self._timer = RoundTimer(self.settings.round_timeout_s, self.settings.neighbour_timeout_s)
        self.outcome: PeerOutcome | None = None
        self.failure: str | None = None
        self.primal_residual = math.inf  # |s_i| [kWh]
        self.dual_residual = math.inf  # price disagreement + change [currency/kWh]

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """Publish the initial price estimate and tracker (round 1).

        Args:
            now: current time [s].
            start_grace_s: extra patience for round 1 [s] (neighbours may still be starting).
        """
        if self.round != 0:
            raise RuntimeError("start() called twice")
        self._timer.last_progress = now + start_grace_s
        if not self.neighbours:  # nobody to trade with: the grid alone settles it
            return self._finish(converged=True, price=self.price)
        return self._advance()

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """Take a verified round message from a neighbour.

        Raises:
            ProtocolError: not a neighbour, wrong type, or a malformed body.
            StaleRoundError: a round more than one ahead (an honest peer never does this).
        """
        if envelope.type != ROUND_TYPE:
            raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=envelope.sender)
        sender = envelope.sender
        if sender not in self._weight:
            raise ProtocolError("sender is not my neighbour", peer_id=sender)
        body = envelope.body
        k = body.get("k")
        self._check_body(body, sender)
        assert isinstance(k, int)
        if self.done or k < self.round:
            return self._resend(now)  # the neighbour is behind us, waiting for our message
        if sender in self._received(k):
            return []  # a repeat; our own timer covers a lost message of ours
        if k > self.round + 1:
            raise StaleRoundError(f"round {k} while at {self.round}", peer_id=sender, round=k)
        self._pending.by_round.setdefault(k, {})[sender] = body
        out: list[Outgoing] = []
        while not self.done and len(self._received(self.round)) == len(self.neighbours):
            self._timer.progress(now)
            out += self._complete_round()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` wants to be called next [s], or None when finished."""
        if self.done:
            return None
        return self._timer.next_deadline()

    def on_timer(self, now: float) -> list[Outgoing]:
        """Re-publish on a late round; fail the session on a silent neighbour."""
        if self.done:
            return []
        if now >= self._timer.give_up_at:
            silent = sorted(set(self.neighbours) - set(self._received(self.round)))
            self.failure = (
                f"no round-{self.round} message from {', '.join(silent)} "
                f"within {self.settings.neighbour_timeout_s:g} s"
            )
            return []
        if self._timer.resend_due(now):
            return self._resend(now)
        return []

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_body(body: Mapping[str, Any], sender: str) -> None:
        k, v0, votes = body.get("k"), body.get("v0"), body.get("votes")
        low, high = body.get("low"), body.get("high")
        # bool is an int subclass: True must not pass as round 1 or as a price
        ok = (
            set(body) == {"k", "lam", "s", "v0", "votes", "low", "high"}
            and isinstance(k, int) and not isinstance(k, bool) and k >= 1
            and isinstance(v0, int) and not isinstance(v0, bool) and 1 <= v0 <= k
            and _is_number(body["lam"]) and _is_number(body["s"])
            and isinstance(votes, list) and isinstance(low, list) and isinstance(high, list)
            and len(votes) == len(low) == len(high) == k - v0 and len(votes) <= _MAX_WINDOW
            and all(isinstance(v, bool) for v in votes)
            and all(_is_number(p) for p in low) and all(_is_number(p) for p in high)
        )  # fmt: skip
        if not ok:
            raise ProtocolError("malformed consensus.round body", peer_id=sender)

    def _project(self, price: float) -> float:
        if self._grid is None:
            return price
        buy, sell = self._grid
        return min(max(price, sell), buy)

    def _received(self, k: int) -> dict[str, Mapping[str, Any]]:
        return self._pending.by_round.get(k, {})

    def _resend(self, now: float) -> list[Outgoing]:
        if not self._timer.take_resend(now):
            return []  # at most one burst per half interval, however many nudges arrive
        return [self._sent[k] for k in (self.round - 1, self.round) if k in self._sent]

    def _advance(self) -> list[Outgoing]:
        """Publish the current state as the next round's message."""
        self.round += 1
        k = self.round
        first = max(1, k - self.horizon)
        window = range(first, k)
        message = Outgoing(
            "market",
            ROUND_TYPE,
            {
                "k": k,
                "lam": self.price,
                "s": self.tracker,
                "v0": first,
                "votes": [self._votes.get(r, False) for r in window],
                "low": [self._extremes[r][0] for r in window],
                "high": [self._extremes[r][1] for r in window],
            },
        )
        self._sent[k] = message
        self._sent.pop(k - 3, None)
        return [message]

    def _complete_round(self) -> list[Outgoing]:
        """All neighbours' round-k states are here: flows, price, position, tracker, votes."""
        k = self.round
        bodies = self._pending.by_round.pop(k)
        settings = self.settings
        lam, s, q = self.price, self.tracker, self.position
        mixing = 0.0
        routed = 0.0
        disagreement = 0.0
        for j in self.neighbours:
            body = bodies[j]
            w = self._weight[j]
            lam_j, s_j = float(body["lam"]), float(body["s"])
            flow = w * (s_j - s)  # the same float, negated, at j
            self.flows[j] += flow
            routed += flow
            mixing += w * (lam_j - lam)
            self._link_midpoints[j] = 0.5 * (lam + lam_j)
            disagreement = max(disagreement, abs(lam_j - lam))
        mixed = s + routed  # (W s)_i
        new_price = self._project(lam + mixing + settings.step * mixed)
        swept = (min(lam, new_price), max(lam, new_price))
        low, high = position_range(self.spec, self._grid, *swept)
        new_position = min(max(q - settings.position_step * mixed, low), high)
        kink = self._kink
        if kink is not None and swept[0] <= kink <= swept[1] and low < new_position < high:
            # marginal: a linear cost's marginal value was crossed and the peer can still
            # absorb; its estimate stays on the kink, where its best response is a segment
            new_price = kink
        self.primal_residual = abs(s)
        self.dual_residual = disagreement + abs(new_price - lam)
        converged = (
            self.primal_residual <= settings.eps_abs + settings.eps_rel * abs(q)
            and self.dual_residual <= settings.eps_abs + settings.eps_rel * abs(lam)
        )
        self.tracker = s + routed + (new_position - q)
        self.price, self.position = new_price, new_position
        self._votes[k] = converged
        self._extremes[k] = (new_price, new_price)
        for body in bodies.values():
            start = body["v0"]
            for offset, (vote, p_low, p_high) in enumerate(zip(body["votes"], body["low"], body["high"], strict=True)):
                r = start + offset
                if r in self._votes:
                    self._votes[r] = self._votes[r] and vote
                    own_low, own_high = self._extremes[r]
                    self._extremes[r] = (min(own_low, float(p_low)), max(own_high, float(p_high)))
        for old in [r for r in self._votes if r < k - self.horizon]:
            del self._votes[old]
            del self._extremes[old]
        prices = [new_price, *(float(bodies[j]["lam"]) for j in self.neighbours)]
        status = Outgoing(
            "telemetry",
            STATUS_TYPE,
            {
                "k": k,
                "primal": self.primal_residual,
                "dual": self.dual_residual,
                "converged": converged,
                "price_min": min(prices),
                "price_max": max(prices),
                "community_import": self._routed_import(),
                "traded": math.fsum(abs(f) for f in self.flows.values()),
                "cost": self._settle(new_price)[4],  # its own cost if the market stopped now
            },
        )
        decided = k - self.horizon
        if decided >= 1 and self._votes.get(decided, False):
            return [status, *self._finish(converged=True, price=self._clearing_price(decided))]
        if k >= settings.max_iterations:
            return [status, *self._finish(converged=False, price=self._clearing_price(decided))]
        return [status, *self._advance()]

    def _clearing_price(self, decided: int) -> float | None:
        """Midrange of every λ_i of round ``decided`` in the component: the same float everywhere."""
        if decided < 1 or decided not in self._extremes:
            return None  # stopped before a vote window closed: each link prices at its own midpoint
        low, high = self._extremes[decided]
        return 0.5 * (low + high)

    def _routed_import(self) -> float:
        """q_i as routed: Σ_j t_ij = −Σ_j F_ij [kWh]."""
        return 0.0 - math.fsum(self.flows.values())  # 0.0 − x: never −0.0

    def _link_prices(self, price: float | None) -> dict[str, float]:
        if price is not None:
            return dict.fromkeys(self.neighbours, price)
        # no common price known: each link's midpoint of the two ends' last exchanged
        # estimates (λ_i + λ_j is the same float at both ends)
        return {j: self._link_midpoints.get(j, self.price) for j in self.neighbours}

    def _settle(self, price: float | None) -> tuple[float, float, float, float, float]:
        """Trades t_ij = −F_ij at ``price``: (net, community import, grid import, payment, cost)
        [kWh, kWh, kWh, currency, currency]."""
        community_import = self._routed_import()
        if self._grid is None:
            net, grid_import = community_import, 0.0
        else:
            # best response to the routed import: min C(y) + grid(y − q), private
            net = best_net_demand(self.spec, self._grid, community_import)
            grid_import = net - community_import
        prices = self._link_prices(price)
        payment = math.fsum(prices[j] * -f for j, f in self.flows.items())
        fees = math.fsum(self._half_fee[j] * abs(f) for j, f in self.flows.items())
        grid_cost = 0.0
        if self._grid is not None:
            buy, sell = self._grid
            grid_cost = buy * max(grid_import, 0.0) - sell * max(-grid_import, 0.0)
        cost = self.spec.cost(net) + grid_cost + payment + fees
        return net, community_import, grid_import, payment, cost

    def _finish(self, *, converged: bool, price: float | None) -> list[Outgoing]:
        """Fix every trade at t_ij = −F_ij, priced at the clearing price; report."""
        net, community_import, grid_import, payment, cost = self._settle(price)
        prices = self._link_prices(price)
        self.outcome = PeerOutcome(
            self.peer_id, converged, self.round, net, community_import, grid_import,
            payment, cost, standalone_cost(self.spec, self._grid),
            {j: (-f if f != 0.0 else 0.0, prices[j]) for j, f in self.flows.items()},
        )  # fmt: skip
        return [Outgoing("report", REPORT_TYPE, self.outcome.to_body())]


def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> ConsensusPeer:
    """The mechanism registry's entry point (:func:`wattmesh.protocols.mechanism.create_core`)."""
    return ConsensusPeer(spec, public, horizon)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check ``[market.consensus]``; raises ``ValueError`` naming the bad setting."""
    ConsensusSettings.from_mapping(settings)
