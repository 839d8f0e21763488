"""Bilateral consensus ADMM market, one sans-IO core per peer.

Theory of operation
-------------------
Sorin, Bobo & Pinson, "Consensus-based approach to peer-to-peer electricity markets
with product differentiation", IEEE Trans. Power Systems 34(2), 2019.

Peer i trades t_ij [kWh] with each neighbour j (t_ij > 0: i imports from j); the
reciprocity constraint t_ij + t_ji = 0 carries one multiplier λ_ij per direction,
which is the trade's price [currency/kWh]. Iteration k → k+1 at peer i:

    local step   t_i^{k+1} = argmin C_i(y) + grid_i(g) + Σ_j (w_ij/2)|t_ij|
                              + Σ_j [ λ_ij t_ij + ρ_ij/2 (t_ij − z_ij^k)² ]
                 s.t. y = Σ_j t_ij + g,  y ∈ [min, max],  sign(t_ij) per role,
                 with z_ij^k = (t_ij^k − t_ji^k)/2
    price step   λ_ij ← λ_ij + ρ_ij/2 (t_ij^{k+1} + t_ji^{k+1})

DESIGN.md counts imports as positive, so λ enters the local step with a plus sign and
the price step adds the imbalance (Sorin et al. count injections as positive and write
both with the opposite sign; the iterates are the same). The local step is solved
exactly with no solver: every variable is a monotone piecewise-linear function of the
peer's balance price p (soft-threshold for fees, clipping for roles and limits, steps
for linear costs and the grid tariff), so the root of the balance
Σ_j t_ij(p) + g(p) − y(p) = 0 is found among the breakpoints and interpolated.

Penalty adaptation, per link (residual balancing, Boyd et al. 2011 §3.4.1): with
r = t_ij + t_ji and s = ρ_ij |z_ij^{k+1} − z_ij^k|, ρ_ij doubles when |r| > 10 s and
halves when s > 10 |r|, kept within ρ₀·[10⁻³, 10³]. Both ends see the same two floats (t_ij, t_ji), and IEEE
addition and subtraction are (anti)symmetric, so λ_ij and ρ_ij stay bit-identical at
both ends and budget balance is exact.

Stopping, with no coordinator: peer i is locally converged at round k when
    Σ_j |t_ij + t_ji|           ≤ ε_abs + ε_rel · Σ_j |z_ij|     (its share of imbalance)
    Σ_j ρ_ij |z_ij^k − z_ij^{k−1}| ≤ ε_abs + ε_rel · Σ_j |λ_ij|  (dual residual, price)
Each round message carries a window of AND-votes; after D rounds (D = diameter of the
public link graph) every peer knows whether *all* peers were converged at round k − D.
All peers therefore stop on the same round, or all at ``max_iterations``. Summed over
peers the first condition bounds the community's total imbalance by
ε_rel · (2 × traded energy) + N·ε_abs, a bound on energy, not a sum of squares.

Late messages: a round waits for every neighbour. After ``round_timeout_s`` without
progress a peer re-publishes its last two round messages; a peer that receives an old
round (older than its own) from a neighbour takes it as "still waiting for us" and
re-publishes too. Each re-send since the last progress doubles the wait before the
next one: a round that is merely slow (N·degree signature checks on a busy host) must
not be buried under re-sends, each of which costs every neighbour a verification and
nudges it to re-send in turn.

Gone for good: after ``neighbour_timeout_s`` T without progress a peer looks at the
neighbours whose round message it still lacks. One it has heard *nothing* from for T
(no round message, no re-send) and whose presence says offline (its Last Will, or no
birth at all: :meth:`AdmmPeer.neighbours_offline`, from the shell) is gone: the peer
excludes it (trade fixed at 0 kWh from
this round, no contract) and the round completes without it, provided the public link
graph without the excluded peers still has a diameter within the stop vote's horizon;
every neighbour of the gone peer computes the same condition, so the AND-vote still
reaches every remaining peer and they all stop on the same round. When the graph would
be too wide, the session fails instead, and so does every peer that reads a
neighbour's ``session.failed`` (:meth:`AdmmPeer.neighbour_failed`). A silent neighbour
that has published its report finished without us (it excluded us, e.g. as a liar):
the session fails. A neighbour heard within T, or still online, is alive but stuck
(it waits for someone else, e.g. a neighbour of the gone peer, and re-sends its round
after ``round_timeout_s`` ≤ T/2; or its host is overloaded): the peer waits for it, and
fails after 2T without progress. Both signals are needed: silence alone is what an
overloaded peer sees of neighbours whose messages sit unread in its own queue, and a
peer briefly offline may be restarting. So does a peer whose own broker connection was down (the shell calls
:meth:`AdmmPeer.deaf_until`): silence it could not hear proves nothing. Round 1 waits longer (``start(start_grace_s=…)``: neighbours may still be
starting; the grace postpones giving up only, not the re-sends, or one lost round-1
message would stall the market for the whole grace).

Restart: :meth:`AdmmPeer.snapshot` is the whole state a round depends on (prices, ρ,
centers, trades, votes, round bodies received early, its own recent round messages).
A shell that writes it after each advance and *before* publishing the new round
message (write-ahead) can restore the core after a crash with
:meth:`AdmmPeer.restore` and :meth:`AdmmPeer.resume` re-publishing its last two
rounds. The local step is deterministic, so the restored core goes on exactly as the
lost one would have: same messages, same result, bit for bit. Whatever it had received
after the snapshot is lost with the process and comes back through the neighbours'
re-sends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import CoreLifecycle, Outgoing, PeerOutcome, settings_from_mapping
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope

__all__ = [
    "ROUND_TYPE",
    "SNAPSHOT_FORMAT",
    "STATUS_TYPE",
    "AdmmPeer",
    "AdmmSettings",
    "LocalSolution",
    "Outgoing",
    "PeerOutcome",
    "best_net_demand",
    "create",
    "solve_local_step",
    "standalone_cost",
    "validate_settings",
]

ROUND_TYPE = "admm.round"
SNAPSHOT_FORMAT = "wattmesh.admm.snapshot/1"
"""The ``format`` of :meth:`AdmmPeer.snapshot`; :meth:`AdmmPeer.restore` refuses others."""
STATUS_TYPE = "admm.status"
"""Per-round telemetry: residuals, price range, net position; no cost parameters."""
_Array = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class AdmmSettings:
    """``[market.admm]`` of a scenario. Prices in currency/kWh, ρ in currency/kWh²."""

    rho: float = 0.1
    eps_rel: float = 1e-4
    eps_abs: float = 1e-6
    max_iterations: int = 2000
    adapt_rho: bool = True
    adapt_until: int = 500  # fixed ρ afterwards: the classical convergence proof applies
    initial_price: float | None = None  # default: mid grid tariff, else 0
    round_timeout_s: float = 10.0  # loopback TCP rarely loses; a slow round must not trigger re-sends
    neighbour_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        positive = ("rho", "eps_rel", "round_timeout_s", "neighbour_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.round_timeout_s > self.neighbour_timeout_s / 2:
            # a live neighbour must be heard re-sending before it can be taken for gone
            raise ValueError("round_timeout_s must be at most half of neighbour_timeout_s")
        if self.eps_abs < 0 or self.max_iterations < 1 or self.adapt_until < 0:
            raise ValueError("eps_abs >= 0, max_iterations >= 1, adapt_until >= 0 required")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AdmmSettings:
        """Build from a TOML table; unknown keys and wrong types raise ``ValueError``."""
        return settings_from_mapping(cls, values)


@dataclass(frozen=True, slots=True)
class LocalSolution:
    """Solution of one local step: trades [kWh], grid import [kWh], net demand [kWh]."""

    trades: _Array
    grid_import: float
    net_demand: float
    balance_price: float


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _soft_threshold(u: _Array, kappa: _Array) -> _Array:
    result: _Array = np.sign(u) * np.maximum(np.abs(u) - kappa, 0.0)
    return result


def solve_local_step(
    spec: PeerSpec,
    grid: tuple[float, float] | None,
    center: _Array,
    price: _Array,
    rho: _Array,
    half_fee: _Array,
    lower: _Array,
    upper: _Array,
) -> LocalSolution:
    """Exact local step of bilateral ADMM, no solver.

    Solves  min C(y) + grid(g) + Σ_j [half_fee_j |t_j| + price_j t_j + rho_j/2 (t_j − center_j)²]
    s.t. y = Σ_j t_j + g, y ∈ [min, max], t_j ∈ [lower_j, upper_j].

    With p the balance multiplier (the peer's marginal value of energy):
        t_j(p) = clip(S(center_j + (p − price_j)/rho_j, half_fee_j/rho_j), lower_j, upper_j)
        y(p)   = clip((−p − b)/a, min, max)             (a step at p = −b when a = 0)
        g(p)   = 0 on (sell, buy), any sign-compatible value at a tariff
    F(p) = Σ t_j(p) + g(p) − y(p) is monotone; its root is found among the sorted
    breakpoints and, between two of them, by linear interpolation.

    Args:
        spec: the peer's private model.
        grid: (buy_price, sell_price) or None.
        center, price, rho, half_fee, lower, upper: per-neighbour arrays.
    """
    a, b = spec.cost_quadratic, spec.cost_linear
    ymin, ymax = spec.min_kwh, spec.max_kwh
    kappa = half_fee / rho

    def trades_at(p: _Array) -> _Array:  # p: shape (m,) -> (m, n)
        u = center[None, :] + (p[:, None] - price[None, :]) / rho[None, :]
        clipped: _Array = np.clip(_soft_threshold(u, kappa[None, :]), lower, upper)
        return clipped

    def demand_limits(p: _Array) -> tuple[_Array, _Array]:  # left and right limits of y(p)
        if a > 0:
            y = np.clip((-p - b) / a, ymin, ymax)
            return y, y
        step = -b
        left = np.where(p <= step, ymax, ymin)
        right = np.where(p < step, ymax, ymin)
        return left, right

    points = [price + rho * (kappa - center), price + rho * (-kappa - center)]
    for bound in (lower, upper):  # where a finite limit starts to clip: S(u) = bound
        finite = np.isfinite(bound)
        u = bound[finite] + np.sign(bound[finite]) * kappa[finite]
        points.append(price[finite] + rho[finite] * (u - center[finite]))
    points.append(np.array([-b - a * ymax, -b - a * ymin] if a > 0 else [-b]))
    candidates = np.unique(np.concatenate(points))
    if grid is not None:
        buy, sell = grid
        candidates = np.unique(np.concatenate([candidates[(candidates > sell) & (candidates < buy)], [sell, buy]]))
    sum_t = trades_at(candidates).sum(axis=1)
    y_left, y_right = demand_limits(candidates)
    # F's limits from the left and from the right of each candidate (y enters negatively)
    f_left = sum_t - y_left
    f_right = sum_t - y_right
    if grid is not None:
        f_left = np.where(candidates == sell, -np.inf, f_left)
        f_right = np.where(candidates == buy, np.inf, f_right)

    above = np.nonzero(f_right >= 0.0)[0]
    if above.size and f_left[above[0]] <= 0.0:
        p_star = float(candidates[above[0]])
    elif above.size and above[0] > 0:
        m = above[0]
        p0, p1 = candidates[m - 1], candidates[m]
        f0, f1 = f_right[m - 1], f_left[m]
        p_star = float(p0 + (p1 - p0) * (-f0) / (f1 - f0))
    elif above.size:  # root lies left of every breakpoint: linear there in free trades
        slope = float(np.sum(1.0 / rho[np.isneginf(lower)]))
        p_star = float(candidates[0] - f_left[0] / slope) if slope > 0 else float(candidates[0])
    else:  # root lies right of every breakpoint
        slope = float(np.sum(1.0 / rho[np.isposinf(upper)]))
        p_star = float(candidates[-1] - f_right[-1] / slope) if slope > 0 else float(candidates[-1])

    trades = trades_at(np.array([p_star]))[0]
    traded = float(trades.sum())
    if a > 0:
        net = float(np.clip((-p_star - b) / a, ymin, ymax))
    elif p_star < -b:
        net = ymax
    elif p_star > -b:
        net = ymin
    else:  # linear cost exactly at its marginal value: any y works; prefer no grid
        net = min(max(traded, ymin), ymax)
    if grid is None:
        net = traded  # equal up to rounding; keep the local balance exact
        grid_import = 0.0
    else:
        grid_import = net - traded
    return LocalSolution(trades, grid_import, net, p_star)


def standalone_cost(spec: PeerSpec, grid: tuple[float, float] | None) -> float | None:
    """A peer's cost with no community trades: min C(y) + grid(y); without a grid y = 0.

    The "grid only" baseline each peer reports next to its market cost.
    """
    if grid is None:
        return spec.cost(0.0) if spec.min_kwh <= 0.0 <= spec.max_kwh else None
    empty = np.zeros(0)
    alone = solve_local_step(spec, grid, empty, empty, empty, empty, empty, empty)
    buy, sell = grid
    g = alone.net_demand
    return spec.cost(g) + (buy * g if g > 0 else sell * g)


def best_net_demand(spec: PeerSpec, grid: tuple[float, float], community_import: float) -> float:
    """argmin_y C(y) + grid(y − q) over [min, max], for a fixed community import q [kWh].

    Substituting y = q + g turns it into the grid-only problem of a shifted cost
    a/2·g² + (b + a·q)·g on [min − q, max − q], which the local step solves exactly.
    """
    q = community_import
    shifted = replace(
        spec, cost_linear=spec.cost_linear + spec.cost_quadratic * q,
        min_kwh=spec.min_kwh - q, max_kwh=spec.max_kwh - q,
    )  # fmt: skip
    empty = np.zeros(0)
    return q + solve_local_step(shifted, grid, empty, empty, empty, empty, empty, empty).net_demand


@dataclass(slots=True)
class _Pending:
    """Round messages received ahead of use: round -> neighbour -> body."""

    by_round: dict[int, dict[str, Mapping[str, Any]]] = field(default_factory=dict)


class AdmmPeer(CoreLifecycle):
    """The ADMM state machine of one peer.

    Drive it with :meth:`start`, :meth:`receive` and :meth:`on_timer`; each returns the
    messages to publish. It never reads a clock: ``now`` [s] is always an argument.
    """

    def __init__(self, spec: PeerSpec, public: PublicScenario, horizon: int) -> None:
        """
        Args:
            spec: this peer's private model.
            public: the session's public scenario (links, fees, tariff, settings).
            horizon: rounds a convergence vote needs to reach every peer; the diameter
                of the public link graph (or any larger number).
        """
        self.peer_id = spec.id
        self.spec = spec
        self.settings = AdmmSettings.from_mapping(public.settings)
        self.neighbours: tuple[str, ...] = tuple(public.links[spec.id])
        self.horizon = horizon
        self._links = public.links
        n = len(self.neighbours)
        self._slot = {j: i for i, j in enumerate(self.neighbours)}
        grid = public.grid
        self._grid = None if grid is None else (grid.buy_price, grid.sell_price)
        initial = self.settings.initial_price
        if initial is None:
            initial = 0.0 if grid is None else 0.5 * (grid.buy_price + grid.sell_price)
        self._half_fee = np.array([0.5 * public.fee(spec.id, j) for j in self.neighbours])
        self._lower = np.full(n, -np.inf if spec.role != "buyer" else 0.0)
        self._upper = np.full(n, np.inf if spec.role != "seller" else 0.0)
        self.price = np.full(n, float(initial))
        self.rho = np.full(n, self.settings.rho)
        self.center = np.zeros(n)  # z_ij^k
        self.round = 0  # the round whose own trades have been sent
        self.trades = np.zeros(n)
        self._solution: LocalSolution | None = None
        self._votes: dict[int, bool] = {}
        self._pending = _Pending()
        self._sent: dict[int, Outgoing] = {}
        self._last_progress = 0.0
        self._patient_until = 0.0  # round 1: no failure before (start grace)
        self._last_resend = -math.inf
        self._resends = 0  # since the last progress; each doubles the next interval
        self._heard = dict.fromkeys(self.neighbours, 0.0)  # last round message of any k [s]
        self._hold_until = -math.inf  # a stuck but live neighbour is waited for until then
        self._finished: set[str] = set()  # neighbours that reported (left the market)
        self._offline: set[str] = set()  # neighbours whose presence says offline (shell)
        self.outcome: PeerOutcome | None = None
        self.failure: str | None = None
        self.excluded: set[str] = set()  # neighbours proven to equivocate, or gone for good
        self.primal_residual = math.inf
        self.dual_residual = math.inf

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """First local step from zero trades; returns the round-1 message.

        Args:
            now: current time [s].
            start_grace_s: extra patience for round 1 [s]. A neighbour can still be
                waiting for one of *its* neighbours to start, so round 1 may take as long
                as the slowest start-up in the community, not one round.
        """
        if self.round != 0:
            raise RuntimeError("start() called twice")
        self._last_progress = now
        self._patient_until = now + start_grace_s
        self._heard = dict.fromkeys(self.neighbours, now)
        if not self.neighbours:  # nobody to trade with: the grid alone settles it
            self._solve()
            return self._finish(converged=True)
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
        if sender not in self._slot:
            raise ProtocolError("sender is not my neighbour", peer_id=sender)
        body = envelope.body
        k = body.get("k")
        trade = body.get("t", {}).get(self.peer_id) if isinstance(body.get("t"), dict) else None
        votes = body.get("votes")
        v0 = body.get("v0")
        # bool is an int subclass: True must not pass as round 1 or as 1 kWh
        if (
            not _is_int(k) or k < 1 or not (isinstance(trade, float) or _is_int(trade))
            or not isinstance(votes, list) or not all(isinstance(v, bool) for v in votes)
            or not _is_int(v0)
        ):  # fmt: skip
            raise ProtocolError("malformed admm.round body", peer_id=sender)
        self._heard[sender] = now
        if sender in self.excluded:
            return []  # proven to lie: nothing it says counts any more
        if self.done or k < self.round:
            # an older round again: the neighbour is behind us, waiting for our message
            return self._resend(now)
        if sender in self._received(k):
            # a repeat of a round we hold: it waits for someone, maybe not us; reacting
            # would multiply traffic on a merely slow host, and our own timer re-sends
            return []
        if k > self.round + 1:
            raise StaleRoundError(f"round {k} while at {self.round}", peer_id=sender, round=k)
        self._pending.by_round.setdefault(k, {})[sender] = body
        return self._progress(now)

    def exclude(self, peer_id: str, now: float) -> list[Outgoing]:
        """Stop trading with a neighbour proven to lie (protocols/evidence.py) or gone.

        Its trade is fixed at 0 kWh from the current round on (bounds 0, its messages
        ignored, its votes no longer counted) and it is left out of the outcome: no
        contract with it. Every neighbour of a liar sees the same two signed messages on
        its topic, so they all exclude it in the same round.
        """
        if peer_id not in self._slot or peer_id in self.excluded:
            return []
        self._drop_link(peer_id)
        return self._progress(now)

    def neighbour_failed(self, peer_id: str) -> None:
        """A neighbour published that its session failed: so does ours.

        It will never send again, and it failed either because the market could not go
        on without a gone peer (then every neighbour of that peer fails alike) or for a
        reason we cannot judge. Excluding it instead, on a condition each peer checks
        with a different picture of who is gone, could split the stop vote.
        """
        if peer_id in self._slot and peer_id not in self.excluded and not self.done:
            self.failure = f"neighbour {peer_id} gave up the session"

    def silent_neighbours(self, now: float) -> list[str]:
        """The neighbours this round waits for that have been silent for
        ``neighbour_timeout_s``, once the round is overdue; [] before. The shell looks
        up their presence (:meth:`neighbours_offline`) before calling :meth:`on_timer`."""
        if self.done or now < self._give_up_at():
            return []
        timeout = self.settings.neighbour_timeout_s
        waiting = set(self.neighbours) - self.excluded - set(self._received(self.round))
        return sorted(j for j in waiting if now - self._heard[j] >= timeout)

    def neighbours_offline(self, peers: set[str] | frozenset[str]) -> None:
        """The neighbours whose presence says offline (Last Will, or never announced),
        as far as the shell knows. Without it nobody is gone."""
        self._offline = set(peers) & set(self._slot)

    def deaf_until(self, now: float) -> None:
        """This peer could hear nobody until ``now`` (its own broker connection was
        down): a neighbour's silence before then says nothing about the neighbour."""
        for j, heard in self._heard.items():
            self._heard[j] = max(heard, now)

    def neighbour_finished(self, peer_id: str) -> None:
        """A neighbour published its report: it left the market.

        Every peer stops on the same round, so this is news only if we then wait for it
        in vain: it finished without us (it excluded us, e.g. as a liar), and going on
        without it as if it were gone would report a market it never agreed to.
        """
        if peer_id in self._slot:
            self._finished.add(peer_id)

    def _drop_link(self, peer_id: str) -> None:
        self.excluded.add(peer_id)
        i = self._slot[peer_id]
        self._lower[i] = self._upper[i] = 0.0
        for bodies in self._pending.by_round.values():
            bodies.pop(peer_id, None)

    def _progress(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        active = len(self.neighbours) - len(self.excluded)
        while not self.done and self.round >= 1 and len(self._received(self.round)) >= active:
            self._last_progress = now
            self._resends = 0
            self._hold_until = -math.inf
            out += self._complete_round()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` wants to be called next [s], or None when finished."""
        if self.done:
            return None
        return min(self._give_up_at(), max(self._last_progress, self._last_resend) + self._resend_interval())

    def on_timer(self, now: float) -> list[Outgoing]:
        """Re-publish on a late round; at the neighbour deadline, go on without the
        neighbours gone for good, or fail the session."""
        if self.done:
            return []
        if now >= self._give_up_at():
            return self._on_silence(now)
        if now >= max(self._last_progress, self._last_resend) + self._resend_interval():
            return self._resend(now)
        return []

    def _on_silence(self, now: float) -> list[Outgoing]:
        """No progress for ``neighbour_timeout_s``: exclude the neighbours gone for good
        (see the module docstring), wait a while longer for live ones, or fail."""
        timeout = self.settings.neighbour_timeout_s
        waiting = sorted(set(self.neighbours) - self.excluded - set(self._received(self.round)))
        silent = [j for j in waiting if now - self._heard[j] >= timeout]
        if left := [j for j in silent if j in self._finished]:
            self.failure = f"{', '.join(left)} finished the market without us (no round-{self.round} message)"
            return []
        gone = [j for j in silent if j in self._offline]
        out: list[Outgoing] = []
        if gone:
            remaining = {
                p: tuple(q for q in links if q not in self.excluded and q not in gone)
                for p, links in self._links.items() if p not in self.excluded and p not in gone
            }  # fmt: skip
            if diameter(remaining) > self.horizon:
                self.failure = (
                    f"no round-{self.round} message from {', '.join(gone)} within {timeout:g} s, and the "
                    f"market cannot go on without them (the link graph would be wider than the "
                    f"{self.horizon}-round stop vote)"
                )
                return []
            for j in gone:
                self._drop_link(j)
            out = self._progress(now)
        live = [j for j in waiting if j not in gone]
        if self.done or not live:
            return out
        if now >= self._base_time() + 2 * timeout:
            self.failure = (
                f"no round-{self.round} message from {', '.join(live)} within {2 * timeout:g} s "
                f"(still online or heard lately: waiting for someone else, or overloaded)"
            )
            return out
        # look again when a live one may have fallen silent long enough, or gone offline
        lately = [self._heard[j] + timeout for j in live if now - self._heard[j] < timeout]
        self._hold_until = min([*lately, now + self.settings.round_timeout_s])
        return out

    # ------------------------------------------------------------------ restart
    def snapshot(self) -> dict[str, Any]:
        """The state a restarted peer needs to carry on from this round, JSON-serialisable.

        Take it after the core advanced and before its new round message leaves
        (write-ahead): the restored core then re-publishes exactly that message. Floats
        are kept as Python floats, which ``json`` writes with enough digits to read back
        bit for bit. Clock values are not kept: :meth:`restore` restarts the timers.

        Raises:
            RuntimeError: before :meth:`start` or after the core finished (a finished
                market is resumed from the ledger's outcome, not from here).
        """
        if self.round == 0 or self._solution is None:
            raise RuntimeError("nothing to snapshot before start()")
        if self.done:
            raise RuntimeError("a finished core has nothing to resume")
        solution = self._solution
        return {
            "format": SNAPSHOT_FORMAT,
            "peer": self.peer_id,
            "neighbours": list(self.neighbours),
            "horizon": self.horizon,
            "round": self.round,
            "price": [float(x) for x in self.price],
            "rho": [float(x) for x in self.rho],
            "center": [float(x) for x in self.center],
            "trades": [float(x) for x in self.trades],
            "solution": {
                "trades": [float(x) for x in solution.trades],
                "grid_import": solution.grid_import,
                "net_demand": solution.net_demand,
                "balance_price": solution.balance_price,
            },
            "votes": [[r, vote] for r, vote in sorted(self._votes.items())],
            # only what _complete_round reads from a body (all checked by receive())
            "pending": [
                [k, sender, float(body["t"][self.peer_id]), body["v0"], list(body["votes"])]
                for k, bodies in sorted(self._pending.by_round.items())
                for sender, body in bodies.items()
            ],
            "sent": [dict(message.body) for _, message in sorted(self._sent.items())],
            "excluded": sorted(self.excluded),
            "primal_residual": None if math.isinf(self.primal_residual) else self.primal_residual,
            "dual_residual": None if math.isinf(self.dual_residual) else self.dual_residual,
        }

    @classmethod
    def restore(
        cls, spec: PeerSpec, public: PublicScenario, horizon: int, snapshot: Mapping[str, Any], now: float
    ) -> AdmmPeer:
        """A core carrying on from ``snapshot`` (:meth:`snapshot`), as if it never stopped.

        Call :meth:`resume` next and publish what it returns. Its timers start at
        ``now``: the first re-send after ``round_timeout_s``, failure after
        ``neighbour_timeout_s`` without progress.

        Args:
            spec, public, horizon: as for the constructor; they must be the ones the
                snapshot was taken with.
            snapshot: what :meth:`snapshot` returned (through JSON or not).
            now: current time [s].

        Raises:
            ValueError: a snapshot of another format, peer, neighbourhood or horizon, or
                a malformed one.
        """
        peer = cls(spec, public, horizon)
        if snapshot.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"not an ADMM snapshot (format {snapshot.get('format')!r}, expected {SNAPSHOT_FORMAT!r})")
        if snapshot.get("peer") != spec.id or tuple(snapshot.get("neighbours", ())) != peer.neighbours:
            raise ValueError(f"snapshot of peer {snapshot.get('peer')!r} with other neighbours, not of {spec.id!r}")
        if snapshot.get("horizon") != horizon:
            raise ValueError(f"snapshot taken with horizon {snapshot.get('horizon')!r}, not {horizon}")
        n = len(peer.neighbours)
        try:
            k = snapshot["round"]
            if not _is_int(k) or k < 1:
                raise ValueError("round")

            def vector(values: Any) -> _Array:
                array = np.array(values, dtype=np.float64)
                if array.shape != (n,):
                    raise ValueError("vector length")
                return array

            peer.round = k
            peer.price = vector(snapshot["price"])
            peer.rho = vector(snapshot["rho"])
            peer.center = vector(snapshot["center"])
            peer.trades = vector(snapshot["trades"])
            solution = snapshot["solution"]
            peer._solution = LocalSolution(
                vector(solution["trades"]), float(solution["grid_import"]), float(solution["net_demand"]),
                float(solution["balance_price"]),
            )  # fmt: skip
            peer._votes = {int(r): bool(vote) for r, vote in snapshot["votes"]}
            for round_k, sender, trade, v0, votes in snapshot["pending"]:
                if sender not in peer._slot:
                    raise ValueError(f"pending round from non-neighbour {sender!r}")
                votes = [bool(v) for v in votes]
                body = {"k": int(round_k), "t": {spec.id: float(trade)}, "v0": int(v0), "votes": votes}
                peer._pending.by_round.setdefault(int(round_k), {})[sender] = body
            for body in snapshot["sent"]:
                peer._sent[int(body["k"])] = Outgoing("market", ROUND_TYPE, body)
            if k not in peer._sent:
                raise ValueError(f"its own round-{k} message is missing")
            for j in snapshot.get("excluded", []):
                if j not in peer._slot:
                    raise ValueError(f"excluded non-neighbour {j!r}")
                peer._drop_link(j)
            primal, dual = snapshot["primal_residual"], snapshot["dual_residual"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed ADMM snapshot: {exc}") from None
        peer.primal_residual = math.inf if primal is None else float(primal)
        peer.dual_residual = math.inf if dual is None else float(dual)
        peer._last_progress = peer._patient_until = now
        peer._heard = dict.fromkeys(peer.neighbours, now)
        return peer

    def resume(self, now: float) -> list[Outgoing]:
        """Re-publish the last two round messages at once, and restart the re-send backoff.

        For a core just restored after a restart (its last message may never have left,
        and neighbours waiting for it may have backed off far), or when the shell knows
        neighbours missed messages (a neighbour still at the start barrier).

        Args:
            now: current time [s].
        """
        if self.done:
            return []
        self._last_resend = now
        self._resends = 0
        return [self._sent[k] for k in (self.round - 1, self.round) if k in self._sent]

    # ------------------------------------------------------------------ internals
    def _base_time(self) -> float:
        """Since when the current round waits [s]; round 1 also waits out the start grace."""
        return max(self._last_progress, self._patient_until) if self.round == 1 else self._last_progress

    def _give_up_at(self) -> float:
        """When :meth:`_on_silence` looks at the silent neighbours [s]."""
        timeout = self.settings.neighbour_timeout_s
        base = self._base_time()
        return max(base + timeout, min(self._hold_until, base + 2 * timeout))

    def _received(self, k: int) -> dict[str, Mapping[str, Any]]:
        return self._pending.by_round.get(k, {})

    def _resend_interval(self) -> float:
        """round_timeout_s · 2^(re-sends since the last progress) [s]: exponential backoff."""
        return self.settings.round_timeout_s * 2.0 ** min(self._resends, 16)

    def _resend(self, now: float) -> list[Outgoing]:
        if now - self._last_resend < self._resend_interval() / 2:
            return []  # at most one burst per half interval, however many nudges arrive
        self._last_resend = now
        self._resends += 1
        return [self._sent[k] for k in (self.round - 1, self.round) if k in self._sent]

    def _solve(self) -> None:
        self._solution = solve_local_step(
            self.spec, self._grid, self.center, self.price, self.rho,
            self._half_fee, self._lower, self._upper,
        )  # fmt: skip
        self.trades = self._solution.trades

    def _advance(self) -> list[Outgoing]:
        """Local step for the next round and its message."""
        self._solve()
        self.round += 1
        k = self.round
        first_vote = max(1, k - self.horizon)
        message = Outgoing(
            "market",
            ROUND_TYPE,
            {
                "k": k,
                "t": {j: float(self.trades[i]) for i, j in enumerate(self.neighbours)},
                "v0": first_vote,
                "votes": [self._votes.get(v, False) for v in range(first_vote, k)],
            },
        )
        self._sent[k] = message
        self._sent.pop(k - 3, None)
        return [message]

    def _complete_round(self) -> list[Outgoing]:
        """All neighbours' round-k trades are here: prices, residuals, votes, ρ, next step."""
        k = self.round
        bodies = self._pending.by_round.pop(k, {})
        theirs = np.array([float(bodies[j]["t"][self.peer_id]) if j in bodies else 0.0 for j in self.neighbours])
        mine = self.trades.copy()
        for j in self.excluded:
            mine[self._slot[j]] = 0.0
        imbalance = mine + theirs
        center = (mine - theirs) / 2.0
        change = np.abs(center - self.center)
        self.price = self.price + self.rho / 2.0 * imbalance
        eps_abs, eps_rel = self.settings.eps_abs, self.settings.eps_rel
        self.primal_residual = float(np.abs(imbalance).sum())
        self.dual_residual = float((self.rho * change).sum())
        converged = (
            self.primal_residual <= eps_abs + eps_rel * float(np.abs(center).sum())
            and self.dual_residual <= eps_abs + eps_rel * float(np.abs(self.price).sum())
        )
        self._votes[k] = converged
        for body in bodies.values():
            start = body["v0"]
            for offset, vote in enumerate(body["votes"]):
                r = start + offset
                if r in self._votes:
                    self._votes[r] = self._votes[r] and vote
        for old in [r for r in self._votes if r < k - self.horizon]:
            del self._votes[old]
        if self.settings.adapt_rho and k <= self.settings.adapt_until:
            s = self.rho * change
            r = np.abs(imbalance)
            rho = np.where(r > 10 * s, self.rho * 2.0, np.where(s > 10 * r, self.rho / 2.0, self.rho))
            # bounded: on a link stuck in a fee's dead zone s/r never balances and an
            # unbounded ρ would halve into denormals
            self.rho = np.clip(rho, self.settings.rho * 1e-3, self.settings.rho * 1e3)
        self.center = center
        status = Outgoing(
            "telemetry",
            STATUS_TYPE,
            {
                "k": k,
                "primal": self.primal_residual,
                "dual": self.dual_residual,
                "converged": converged,
                "price_min": float(self.price.min()),
                "price_max": float(self.price.max()),
                "community_import": float(center.sum()),
                "traded": float(np.abs(center).sum()),
                "cost": self._settle()[4],  # its own cost if the market stopped now
            },
        )
        decided = k - self.horizon
        if decided >= 1 and self._votes.get(decided, False):
            return [status, *self._finish(converged=True)]
        if k >= self.settings.max_iterations:
            return [status, *self._finish(converged=False)]
        return [status, *self._advance()]

    def _settle(self) -> tuple[float, float, float, float, float]:
        """Trades fixed at z_ij with prices λ_ij: (net, community import, grid import,
        payment, cost) [kWh, kWh, kWh, currency, currency]."""
        assert self._solution is not None
        fixed = self.center
        community_import = float(fixed.sum())
        if self._grid is None:
            net, grid_import = community_import, 0.0
        else:
            # The last local step balanced y against t_ij, not against the agreed z_ij;
            # keeping that y would push the difference into the grid at full tariff.
            # Best response to the agreed trades instead: min C(y) + grid(y − q).
            net = best_net_demand(self.spec, self._grid, community_import)
            grid_import = net - community_import
        payment = float((self.price * fixed).sum())
        fees = float((self._half_fee * np.abs(fixed)).sum())
        grid_cost = 0.0
        if self._grid is not None:
            buy, sell = self._grid
            grid_cost = buy * max(grid_import, 0.0) - sell * max(-grid_import, 0.0)
        cost = self.spec.cost(net) + grid_cost + payment + fees
        return net, community_import, grid_import, payment, cost

    def _finish(self, *, converged: bool) -> list[Outgoing]:
        """Fix every trade at its consensus value z_ij and price λ_ij; report."""
        net, community_import, grid_import, payment, cost = self._settle()
        self.outcome = PeerOutcome(
            self.peer_id, converged, self.round, net, community_import, grid_import,
            payment, cost, standalone_cost(self.spec, self._grid),
            {
                j: (float(self.center[i]), float(self.price[i]))
                for i, j in enumerate(self.neighbours) if j not in self.excluded
            },
            tuple(sorted(self.excluded)),
        )  # fmt: skip
        return [Outgoing("report", "admm.report", self.outcome.to_body())]


def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> AdmmPeer:
    """The mechanism registry's entry point (:func:`wattmesh.protocols.mechanism.create_core`)."""
    return AdmmPeer(spec, public, horizon)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check ``[market.admm]``; raises ``ValueError`` naming the bad setting."""
    AdmmSettings.from_mapping(settings)
