"""Energy sharing with generalized demand bidding, one sans-IO core per peer.

Theory of operation
-------------------
Chen, Mei, Zhou, Low, Wei & Liu, "An energy sharing game with generalized demand
bidding: model and properties", IEEE Trans. Smart Grid 11(3), 2020 (arXiv:1904.07829).

Every peer i submits a bid b_i [kWh]: the demand function x_i(λ) = a·λ + b_i, with the
price sensitivity a < 0 [kWh per currency/kWh] common to all (a setting). The pool
clears Σ_i x_i = 0 at

    λ = −Σ_i b_i / (I·a)            [currency/kWh],   I = number of peers,

and peer i imports x_i = a·λ + b_i [kWh] from the pool (negative: exports). Every peer
reads every other peer's signed bid and computes λ itself (math.fsum: exactly rounded,
so the same float everywhere). Peer i's cost is f_i(x_i) + λ·x_i with
f_i(x) = min_y C_i(y) + grid(y − x): its own cost of holding pool position x, the grid
taking the rest. Because its own bid moves the price, λ = κ(x_i + B_−i) with
B_−i = Σ_{j≠i} b_j and κ = 1/((I − 1)|a|), its **best response** to the others' bids is

    x_i = argmin_x f_i(x) + κ x² + κ B_−i x,      b_i = (I x_i + B_−i)/(I − 1),

solved exactly by :func:`wattmesh.protocols.admm.solve_local_step` (one trade, price
κ B_−i, penalty 2κ, the role as the trade's sign bound). The Nash equilibrium is the
unique solution of  min Σ_i f_i(x_i) + κ/2 x_i²  s.t. Σ_i x_i = 0  with multiplier λ,
i.e. x_i = X_i(λ) := argmin_x f_i(x) + κ/2 x² + λ x for every i. Properties (the paper's
Theorems, checked in tests/protocols/test_gdb.py): unique equilibrium; λ equals the
average marginal value of energy (1/I)·Σ_i −f_i'(x_i) ("average marginal
disutility"); every peer is at least as well off as with the grid alone (x_i = 0 is
always available); the gap to the social optimum shrinks with I and with |a|
(κ x_i is the distortion).

**Dynamics** (``dynamics`` setting). Plain simultaneous best responses diverge when
I ≳ 10 (measured: the price mode is amplified by ≈ I/2 a round where costs are flat,
e.g. where the grid is the marginal source), so two convergent variants are offered:

- ``"proposal"`` (default): round k's bids are each peer's best response against the
  bid profile that clears at the common proposal μ_k, b_i^k = X_i(μ_k) − a μ_k
  (at the equilibrium both coincide). The cleared price λ_k of those bids reveals the
  aggregate excess E(μ_k) = I|a|(λ_k − μ_k), non-increasing in μ, so every peer runs
  the same safeguarded secant (:class:`PriceSearch`) on g(μ) = λ(μ) − μ over the
  public history; with a grid the root lies in [sell, buy], where g(sell) ≥ 0 ≥ g(buy).
- ``"best_response"``: Krasnosel'skiĭ–Mann averaged best responses (as in Wang, Liu,
  Ma, Chen et al., arXiv:1911.02862, for the same game):
  b_i^{k+1} = b_i^k + θ (BR_i(B_−i^k) − b_i^k), θ = ``damping``, default 4/(I + 4)
  (the price mode's gain is at most I/2). Rounds grow ∝ I.

**Stop rule.** Everyone holds the same bid set each round, so a deterministic rule on
common data stops all peers on the same round with no vote: stop at round k ≥ 2 when

    max_i |b_i^k − b_i^{k−1}| ≤ ε_abs + ε_rel max_i |b_i^k|,   |λ_k − λ_{k−1}| ≤ ε_abs + ε_rel |λ_k|

and, for ``"proposal"``, |λ_k − μ_k| ≤ ε_abs + ε_rel |λ_k| (the bids clear at the price
they were made for). The final bids are those of round k.

**Trades.** From the final x_j = a λ + b_j (same floats at every peer): buyers
(x > 0) buy from sellers (x < 0) in proportion to their sales,
t_uv = x_u·(−x_v)/S with S = max(Σ buyers' x, Σ sellers' −x) (equal up to rounding);
t_vu = −t_uv. Every trade is priced at λ. Roles hold on every link (a buyer's x ≥ 0).
Fees are charged on the trades (each side half) but do not enter the bids.

Late messages, re-sends, backoff and silent peers: as in :mod:`wattmesh.protocols.admm`
(docs/admm.md §5); a round waits for every peer's bid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wattmesh.protocols.admm import best_net_demand, solve_local_step, standalone_cost
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import CoreLifecycle, Outgoing, PeerOutcome, settings_from_mapping
from wattmesh.protocols.rounds import RoundTimer
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.wire import Envelope

__all__ = [
    "DYNAMICS",
    "REPORT_TYPE",
    "ROUND_TYPE",
    "STATUS_TYPE",
    "GdbPeer",
    "GdbSettings",
    "PriceSearch",
    "best_response_bid",
    "clearing_price",
    "create",
    "pool_trades",
    "position_at_price",
    "validate_settings",
]

ROUND_TYPE = "gdb.round"
STATUS_TYPE = "gdb.status"
"""Per-round telemetry: bid and price changes, the clearing price, own position; no cost parameters."""
REPORT_TYPE = "gdb.report"
DYNAMICS = ("proposal", "best_response")


@dataclass(frozen=True, slots=True)
class GdbSettings:
    """``[market.gdb]`` of a scenario."""

    price_sensitivity: float = -10.0  # a < 0 [kWh per currency/kWh]
    dynamics: str = "proposal"
    damping: float | None = None  # θ of "best_response"; default 4/(I + 4)
    initial_price: float | None = None  # μ_1 [currency/kWh]; default: mid grid tariff, else 0
    eps_rel: float = 1e-9
    eps_abs: float = 1e-9  # [kWh] for bids, [currency/kWh] for prices
    max_iterations: int = 1000
    round_timeout_s: float = 10.0
    neighbour_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.price_sensitivity < 0:
            raise ValueError("price_sensitivity must be < 0 (demand falls as the price rises)")
        if self.dynamics not in DYNAMICS:
            raise ValueError(f"dynamics must be one of {', '.join(DYNAMICS)}")
        if self.damping is not None and not 0 < self.damping <= 1:
            raise ValueError("damping must be in (0, 1]")
        for name in ("eps_rel", "round_timeout_s", "neighbour_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.eps_abs < 0 or self.max_iterations < 2:
            raise ValueError("eps_abs >= 0 and max_iterations >= 2 required")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GdbSettings:
        """Build from a TOML table; unknown keys and wrong types raise ``ValueError``."""
        return settings_from_mapping(cls, values)


# ---------------------------------------------------------------------- the game
def clearing_price(bids: Mapping[str, float], price_sensitivity: float) -> float:
    """λ = −Σ_i b_i / (I·a) [currency/kWh]; fsum is exactly rounded, so order-independent."""
    return -math.fsum(bids.values()) / (len(bids) * price_sensitivity)


def _regularised_position(spec: PeerSpec, grid: tuple[float, float] | None, linear: float, quadratic: float) -> float:
    """argmin_x f(x) + quadratic/2·x² + linear·x within the role [kWh], exactly."""
    lower = np.array([0.0 if spec.role == "buyer" else -np.inf])
    upper = np.array([0.0 if spec.role == "seller" else np.inf])
    solution = solve_local_step(
        spec, grid, np.zeros(1), np.array([linear]), np.array([quadratic]), np.zeros(1), lower, upper,
    )  # fmt: skip
    return float(solution.trades[0])


def position_at_price(spec: PeerSpec, grid: tuple[float, float] | None, price: float, kappa: float) -> float:
    """X_i(μ) = argmin_x f_i(x) + κ/2·x² + μ·x [kWh]: the equilibrium position at price μ.

    Args:
        price: μ [currency/kWh].
        kappa: κ = 1/((I − 1)|a|) [currency/kWh²].
    """
    return _regularised_position(spec, grid, price, kappa)


def best_response_bid(
    spec: PeerSpec, grid: tuple[float, float] | None, others: float, peers: int, price_sensitivity: float
) -> float:
    """Peer i's best bid b_i [kWh] given the sum of the others' bids B_−i [kWh].

    x = argmin f(x) + κx² + κB_−i x,  b_i = (I x + B_−i)/(I − 1),  κ = 1/((I − 1)|a|).
    """
    kappa = 1.0 / ((peers - 1) * abs(price_sensitivity))
    x = _regularised_position(spec, grid, kappa * others, 2.0 * kappa)
    return (peers * x + others) / (peers - 1)


def pool_trades(positions: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """Bilateral split of the pool: (buyer, seller) -> kWh the buyer imports from the seller.

    t_uv = x_u·(−x_v)/S, S = max(Σ_{x>0} x, Σ_{x<0} −x): each buyer's purchase is split
    across sellers in proportion to their sales. Deterministic in ``positions``.
    """
    buyers = sorted(p for p, x in positions.items() if x > 0)
    sellers = sorted(p for p, x in positions.items() if x < 0)
    total = max(math.fsum(positions[p] for p in buyers), math.fsum(-positions[p] for p in sellers))
    if total <= 0:
        return {}
    return {(u, v): positions[u] * -positions[v] / total for u in buyers for v in sellers}


@dataclass(slots=True)
class PriceSearch:
    """The common root finder of the ``proposal`` dynamics on g(μ) = λ(μ) − μ (non-increasing).

    Every peer runs one on the same public history, so all propose the same next μ
    (bit for bit: the same float operations on the same floats). Safeguarded secant,
    as in Dekker's and Brent's methods: the secant through the last two evaluations
    when it falls strictly inside the bracket and is shorter than half the step before
    last, bisection otherwise; outside a bracket, steps μ + 2^m·g that double while g
    keeps its sign. g is piecewise linear (the positions X_i are), so the secant is
    exact once two evaluations share a piece. A tariff's prices [sell, buy] bracket
    the root a priori.
    """

    low: float = -math.inf  # the root is >= low
    high: float = math.inf  # the root is <= high
    streak: int = 0  # consecutive evaluations with the same sign of g
    last: tuple[float, float] | None = None  # the previous (μ, g)
    steps: list[float] = field(default_factory=list)  # |μ_{k+1} − μ_k| of each proposal

    def next(self, mu: float, g: float, tolerance: float = 0.0) -> float:
        """Record g(mu) and return the next proposal [currency/kWh].

        Args:
            mu: the proposal just evaluated [currency/kWh].
            g: λ(mu) − mu [currency/kWh].
            tolerance: |g| at or below it counts as a root: the proposal stays, so the
                bids repeat and the stop rule can see them settle. (Without it a rounding
                residue of 1e-17 with the "wrong" sign makes the root a bracket end, and the
                secant, landing on that end, is rejected for bisection.)
        """
        if abs(g) <= tolerance:
            return mu
        previous, self.last = self.last, (mu, g)
        self.streak = self.streak + 1 if previous is not None and (previous[1] > 0) == (g > 0) else 0
        if g > 0:
            self.low = max(self.low, mu)
        else:
            self.high = min(self.high, mu)
        proposal = self._propose(mu, g, previous)
        self.steps.append(abs(proposal - mu))
        return proposal

    def _propose(self, mu: float, g: float, previous: tuple[float, float] | None) -> float:
        bracketed = math.isfinite(self.low) and math.isfinite(self.high)
        if not bracketed:  # no secant here: on a flat stretch of g it extrapolates to ±1e14
            return mu + g * 2.0**self.streak  # toward the root, longer each time
        if previous is not None and previous[1] != g:
            secant = mu - g * (mu - previous[0]) / (g - previous[1])
            # Brent's safeguard: interpolation must at least halve the step before last
            shrinking = len(self.steps) < 2 or abs(secant - mu) < 0.5 * self.steps[-2]
            if self.low < secant < self.high and shrinking:
                return secant
        return 0.5 * (self.low + self.high)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


@dataclass(slots=True)
class _Pending:
    by_round: dict[int, dict[str, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------- the core
class GdbPeer(CoreLifecycle):
    """The generalized-demand-bidding state machine of one peer.

    It listens to every other peer (a pool market). Drive it with :meth:`start`,
    :meth:`receive` and :meth:`on_timer`; ``now`` [s] is always an argument.
    """

    def __init__(self, spec: PeerSpec, public: PublicScenario, horizon: int) -> None:
        """
        Args:
            spec: this peer's private model.
            public: the session's public scenario. Every peer must be linked to every
                other (the pool trades between any two peers).
            horizon: unused (every peer hears every other directly); kept for the
                registry's uniform signature.

        Raises:
            ValueError: the link graph is not complete.
        """
        others = tuple(p for p in public.peer_ids if p != spec.id)
        n = len(public.peer_ids)
        if sum(len(links) for links in public.links.values()) != n * (n - 1):  # links are symmetric
            limited = next(p for p in public.peer_ids if len(public.links[p]) != n - 1)
            raise ValueError(
                f"gdb clears one pool where anyone may trade with anyone, but {limited!r} "
                "cannot trade with every peer; remove the neighbors lists"
            )
        self.peer_id = spec.id
        self.spec = spec
        self.settings = GdbSettings.from_mapping(public.settings)
        self.neighbours: tuple[str, ...] = tuple(sorted(others))
        self.horizon = horizon
        self.peers = len(public.peer_ids)
        grid = public.grid
        self._grid = None if grid is None else (grid.buy_price, grid.sell_price)
        self._half_fee = {j: 0.5 * public.fee(spec.id, j) for j in self.neighbours}
        self._a = self.settings.price_sensitivity
        self._kappa = 1.0 / (max(self.peers - 1, 1) * abs(self._a))  # κ [currency/kWh²]
        initial = self.settings.initial_price
        if initial is None:
            initial = 0.0 if grid is None else 0.5 * (grid.buy_price + grid.sell_price)
        self.proposal = float(initial)  # μ_k [currency/kWh]
        self._search = PriceSearch()
        if self._grid is not None:
            self._search.low, self._search.high = self._grid[1], self._grid[0]
        self.damping = self.settings.damping if self.settings.damping is not None else 4.0 / (self.peers + 4.0)
        self.bid = 0.0  # b_i^k [kWh]
        self.round = 0
        self.price = math.nan  # λ_k of the last complete round [currency/kWh]
        self._previous: dict[str, float] | None = None  # round k−1's bids
        self._previous_price = math.nan
        self.bids: dict[str, float] = {}  # the last complete round's bids
        self._pending = _Pending()
        self._sent: dict[int, Outgoing] = {}
        self._timer = RoundTimer(self.settings.round_timeout_s, self.settings.neighbour_timeout_s)
        self.outcome: PeerOutcome | None = None
        self.failure: str | None = None
        self.bid_change = math.inf  # max_i |b_i^k − b_i^{k−1}| [kWh]
        self.price_change = math.inf  # [currency/kWh]

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """Publish the round-1 bid, the best response against the initial proposal.

        Args:
            now: current time [s].
            start_grace_s: extra patience for round 1 [s] (peers may still be starting).
        """
        if self.round != 0:
            raise RuntimeError("start() called twice")
        self._timer.last_progress = now + start_grace_s
        if not self.neighbours:  # alone: the grid settles it
            self.bids = {self.peer_id: 0.0}
            self.price = self.proposal
            return self._finish(converged=True, positions={self.peer_id: 0.0})
        self.bid = self._proposal_bid(self.proposal)
        return self._advance()

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """Take a verified bid from another peer.

        Raises:
            ProtocolError: not a peer of this session, wrong type, or a malformed body.
            StaleRoundError: a round more than one ahead (an honest peer never does this).
        """
        if envelope.type != ROUND_TYPE:
            raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=envelope.sender)
        sender = envelope.sender
        if sender not in self._half_fee:
            raise ProtocolError("sender is not a peer of this pool", peer_id=sender)
        body = envelope.body
        k, bid = body.get("k"), body.get("b")
        # bool is an int subclass: True must not pass as round 1 or as 1 kWh
        if set(body) != {"k", "b"} or not _is_number(k) or not isinstance(k, int) or k < 1 or not _is_number(bid):
            raise ProtocolError("malformed gdb.round body", peer_id=sender)
        if self.done or k < self.round:
            return self._resend(now)  # the sender is behind, waiting for our bid
        if sender in self._pending.by_round.get(k, {}):
            return []
        if k > self.round + 1:
            raise StaleRoundError(f"round {k} while at {self.round}", peer_id=sender, round=k)
        self._pending.by_round.setdefault(k, {})[sender] = float(bid)
        out: list[Outgoing] = []
        while not self.done and len(self._pending.by_round.get(self.round, {})) == len(self.neighbours):
            self._timer.progress(now)
            out += self._complete_round()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` wants to be called next [s], or None when finished."""
        if self.done:
            return None
        return self._timer.next_deadline()

    def on_timer(self, now: float) -> list[Outgoing]:
        """Re-publish on a late round; fail the session on a silent peer."""
        if self.done:
            return []
        if now >= self._timer.give_up_at:
            silent = sorted(set(self.neighbours) - set(self._pending.by_round.get(self.round, {})))
            self.failure = (
                f"no round-{self.round} bid from {', '.join(silent)} within {self.settings.neighbour_timeout_s:g} s"
            )
            return []
        if self._timer.resend_due(now):
            return self._resend(now)
        return []

    # ------------------------------------------------------------------ internals
    def _resend(self, now: float) -> list[Outgoing]:
        if not self._timer.take_resend(now):
            return []  # at most one burst per half interval, however many nudges arrive
        return [self._sent[k] for k in (self.round - 1, self.round) if k in self._sent]

    def _proposal_bid(self, mu: float) -> float:
        """b_i = X_i(μ) − a μ: the best response against bids that clear at μ [kWh]."""
        return position_at_price(self.spec, self._grid, mu, self._kappa) - self._a * mu

    def _advance(self) -> list[Outgoing]:
        self.round += 1
        message = Outgoing("market", ROUND_TYPE, {"k": self.round, "b": self.bid})
        self._sent[self.round] = message
        self._sent.pop(self.round - 3, None)
        return [message]

    def _tolerance(self, scale: float) -> float:
        return self.settings.eps_abs + self.settings.eps_rel * scale

    def _complete_round(self) -> list[Outgoing]:
        """Every bid of round k is here: clear, test the stop rule, bid again."""
        k = self.round
        bids = dict(self._pending.by_round.pop(k))
        bids[self.peer_id] = self.bid
        price = clearing_price(bids, self._a)
        previous, previous_price = self._previous, self._previous_price
        if previous is not None:
            self.bid_change = max(abs(bids[p] - previous[p]) for p in bids)
            self.price_change = abs(price - previous_price)
        else:  # round 1: changes from no bids and from the initial proposal (finite telemetry)
            self.bid_change = max(abs(b) for b in bids.values())
            self.price_change = abs(price - self.proposal)
        self.bids, self.price = bids, price
        self._previous, self._previous_price = bids, price
        proposal_gap = abs(price - self.proposal)
        converged = (
            previous is not None
            and self.bid_change <= self._tolerance(max(abs(b) for b in bids.values()))
            and self.price_change <= self._tolerance(abs(price))
            and (self.settings.dynamics != "proposal" or proposal_gap <= self._tolerance(abs(price)))
        )
        position = self._a * price + self.bid
        status = Outgoing(
            "telemetry",
            STATUS_TYPE,
            {
                "k": k,
                "primal": self.bid_change,
                "dual": self.price_change,
                "converged": converged,
                "price_min": price,
                "price_max": price,
                "community_import": position,
                "traded": abs(position),
                "cost": self._settle(self._positions())[4],  # its own cost if the pool cleared now
            },
        )
        if converged:
            return [status, *self._finish(converged=True, positions=self._positions())]
        if k >= self.settings.max_iterations:
            return [status, *self._finish(converged=False, positions=self._positions())]
        if self.settings.dynamics == "proposal":
            self.proposal = self._search.next(self.proposal, price - self.proposal, self._tolerance(abs(price)))
            self.bid = self._proposal_bid(self.proposal)
        else:
            others = math.fsum(b for p, b in bids.items() if p != self.peer_id)
            response = best_response_bid(self.spec, self._grid, others, self.peers, self._a)
            self.bid = self.bid + self.damping * (response - self.bid)
        return [status, *self._advance()]

    def _positions(self) -> dict[str, float]:
        """x_j = a λ + b_j for every peer [kWh], the same floats at every peer."""
        return {p: self._a * self.price + b for p, b in self.bids.items()}

    def _my_trades(self, positions: Mapping[str, float]) -> dict[str, float]:
        trades = dict.fromkeys(self.neighbours, 0.0)
        for (buyer, seller), kwh in pool_trades(positions).items():
            if buyer == self.peer_id:
                trades[seller] = kwh
            elif seller == self.peer_id:
                trades[buyer] = -kwh
        return trades

    def _settle(self, positions: Mapping[str, float]) -> tuple[float, float, float, float, float]:
        """(net, community import, grid import, payment, cost) [kWh, kWh, kWh, currency, currency]."""
        trades = self._my_trades(positions)
        community_import = math.fsum(trades.values())
        if self._grid is None:
            net, grid_import = community_import, 0.0
        else:
            net = best_net_demand(self.spec, self._grid, community_import)
            grid_import = net - community_import
        payment = self.price * community_import
        fees = math.fsum(self._half_fee[j] * abs(t) for j, t in trades.items())
        grid_cost = 0.0
        if self._grid is not None:
            buy, sell = self._grid
            grid_cost = buy * max(grid_import, 0.0) - sell * max(-grid_import, 0.0)
        cost = self.spec.cost(net) + grid_cost + payment + fees
        return net, community_import, grid_import, payment, cost

    def _finish(self, *, converged: bool, positions: Mapping[str, float]) -> list[Outgoing]:
        net, community_import, grid_import, payment, cost = self._settle(positions)
        trades = self._my_trades(positions)
        self.outcome = PeerOutcome(
            self.peer_id, converged, self.round, net, community_import, grid_import,
            payment, cost, standalone_cost(self.spec, self._grid),
            {j: (t, self.price) for j, t in trades.items()},
        )  # fmt: skip
        return [Outgoing("report", REPORT_TYPE, self.outcome.to_body())]


def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> GdbPeer:
    """The mechanism registry's entry point (:func:`wattmesh.protocols.mechanism.create_core`)."""
    return GdbPeer(spec, public, horizon)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check ``[market.gdb]``; raises ``ValueError`` naming the bad setting."""
    GdbSettings.from_mapping(settings)
