"""Leader–follower (Stackelberg) pricing game, one sans-IO core per peer.

Theory of operation
-------------------
The one-leader, many-follower energy-sharing game of Tushar et al., "Prioritizing
consumers in smart grid: a game theoretic approach", IEEE Trans. Smart Grid 5(3), 2014,
and Liu et al., "Energy sharing management for microgrids with PV prosumers: a
Stackelberg game approach", IEEE Trans. Industrial Informatics 13(3), 2017: the leader
(a community battery or aggregator, ``role = "leader"``) posts prices, the followers
answer with quantities, and the leader learns from the answers alone.

Prices at round k (both in the tariff band, p_sell ≤ p_buy):

    p_buy   what a follower pays the leader per kWh it buys from it
    p_sell  what the leader pays a follower per kWh it sells to it

Follower f, with half fee h_f = w_Lf/2 on its link to the leader, best-responds with
its own private cost and the grid as outside option (ties go to the leader):

    eb = p_buy + h_f   if p_buy + h_f ≤ buy   (else the grid's buy,  no purchase from L)
    es = p_sell − h_f  if p_sell − h_f ≥ sell (else the grid's sell, no sale to L)
    y_f = argmin C_f(y) + eb·max(y, 0) − es·max(−y, 0)
    q_f = y_f if it trades with the leader on that side, else 0     (import from L)

With C_f convex and es ≤ eb, y_f > 0 depends on eb only and y_f < 0 on es only, so the
leader observes two separate curves, D(p_buy) = Σ max(q_f, 0) and S(p_sell) =
Σ max(−q_f, 0), and can price any pair it has sampled each coordinate of. Its cost at
(b, s), with its own private C_L and its grid access, is

    J_L(b, s) = min_y C_L(y) + grid(y − q_L) + s·S(s) − b·D(b) + Σ_f h_f |q_f|,
    q_L = S(s) − D(b).

Price update (a zooming grid search on observed quantities only): round k probes one
(b, s) pair. The first ``scan_points`` rounds probe b = s = x over evenly spaced x from
buy down to sell (spacing Δ). Then, repeatedly, the best sampled pair (b*, s*) =
argmin J_L over all sampled b × sampled s with s ≤ b is bracketed by ±Δ and
``zoom_points`` evenly spaced offsets o_m = −Δ + m·δ, δ = 2Δ/(zoom_points + 1), are
probed as pairs (b* + o_m, s* + o_m) (clipped to the band; the common offset keeps
s ≤ b); Δ ← δ. When Δ < ``price_tolerance`` (the prices stop changing by more than
that) or at ``max_iterations``, the leader posts (b*, s*) with ``final = true``; every
follower answers and stops on that round, the leader when all answers are in. Trades
are bilateral leader ↔ follower at p_buy (follower buys) or p_sell (follower sells).

Guarantees. Followers: the grid stays available and eb ≤ buy, es ≥ sell, so no
follower is worse off than grid only. Leader: (buy, sell) is always sampled (x = buy and
x = sell), and there J_L ≤ grid-only: with w = 0 the leader can pass every kWh on to
the grid at the same price (grid(y + D − S) ≤ grid(y) + buy·D − sell·S), with w > 0
nobody trades. The leader stops at the best sampled pair, so its final cost is at most
its grid-only cost when followers answer consistently.

Late messages: the leader re-posts the current prices after ``round_timeout_s``
without all answers (doubling the wait each time); a follower re-sends its last answer
when it is re-asked or times out. After ``neighbour_timeout_s`` without progress the
session fails, naming the silent peers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from wattmesh.protocols.admm import standalone_cost
from wattmesh.protocols.demand import best_net_demand_at_tariff
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import CoreLifecycle, Outgoing, PeerOutcome, settings_from_mapping
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.wire import Envelope

__all__ = [
    "PRICES_TYPE",
    "QUANTITY_TYPE",
    "REPORT_TYPE",
    "STATUS_TYPE",
    "StackelbergFollower",
    "StackelbergLeader",
    "StackelbergSettings",
    "create",
    "follower_response",
    "validate_settings",
]

PRICES_TYPE = "stackelberg.prices"
QUANTITY_TYPE = "stackelberg.quantity"
STATUS_TYPE = "stackelberg.status"
"""Per-round telemetry: posted prices, own position and cost; no cost parameters."""
REPORT_TYPE = "stackelberg.report"
LEADER_KEY = "leader"
"""Key in the public ``[market.stackelberg]`` settings naming the leader; the scenario
loader sets it from the peer with ``role = "leader"``, users never write it."""
_MAX_KWH = 1e9


@dataclass(frozen=True, slots=True)
class StackelbergSettings:
    """``[market.stackelberg]`` of a scenario. Prices in currency/kWh."""

    scan_points: int = 9  # first, coarse probes across the band (both ends included)
    zoom_points: int = 4  # probes per zoom stage around the best pair
    price_tolerance: float = 1e-4  # stop when the probe spacing is below this
    max_iterations: int = 200
    round_timeout_s: float = 10.0
    neighbour_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.scan_points < 2 or self.zoom_points < 2:
            raise ValueError("scan_points and zoom_points must be >= 2")
        if self.max_iterations < 2:
            raise ValueError("max_iterations must be >= 2")
        for name in ("price_tolerance", "round_timeout_s", "neighbour_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> StackelbergSettings:
        """Build from a TOML table; unknown keys and wrong types raise ``ValueError``."""
        if LEADER_KEY in values:
            raise ValueError("'leader' is not a setting: give the leader peer role = \"leader\"")
        return settings_from_mapping(cls, values)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _grid_cost(buy: float, sell: float, grid_import: float) -> float:
    return buy * max(grid_import, 0.0) - sell * max(-grid_import, 0.0)


def follower_response(spec: PeerSpec, buy: float, sell: float, half_fee: float, p_buy: float, p_sell: float) -> float:
    """A follower's best response: its import from the leader [kWh] (< 0: sells to it).

    Args:
        spec: the follower's private model.
        buy, sell: grid tariff [currency/kWh].
        half_fee: its share of the fee on the link to the leader [currency/kWh].
        p_buy, p_sell: the leader's prices, sell ≤ p_sell ≤ p_buy ≤ buy.
    """
    can_buy = spec.role != "seller" and p_buy + half_fee <= buy
    can_sell = spec.role != "buyer" and p_sell - half_fee >= sell
    effective_buy = p_buy + half_fee if can_buy else buy
    effective_sell = p_sell - half_fee if can_sell else sell
    y = best_net_demand_at_tariff(spec, effective_buy, effective_sell, 0.0)
    if (y > 0 and can_buy) or (y < 0 and can_sell):
        return y
    return 0.0


@dataclass(frozen=True, slots=True)
class _Sample:
    """The followers' answers on one side at one price: energy [kWh], leader's fee share [currency]."""

    kwh: float
    fees: float


class _Base(CoreLifecycle):
    """Lifecycle and timers shared by the leader and follower cores."""

    def __init__(self, spec: PeerSpec, public: PublicScenario, settings: StackelbergSettings) -> None:
        assert public.grid is not None
        self.peer_id = spec.id
        self.spec = spec
        self.settings = settings
        self._public = public
        self._buy, self._sell = public.grid.buy_price, public.grid.sell_price
        self._grid_only = standalone_cost(spec, (self._buy, self._sell))
        self.round = 0
        self._started = False
        self._last_progress = 0.0
        self._last_resend = -math.inf
        self._resends = 0
        self.outcome: PeerOutcome | None = None
        self.failure: str | None = None
        self._last_prices = (math.nan, math.nan)
        self._last_position = 0.0

    def _resend_interval(self) -> float:
        """round_timeout_s · 2^(re-sends since the last progress) [s]: exponential backoff."""
        return self.settings.round_timeout_s * 2.0 ** min(self._resends, 16)

    def _progressed(self, now: float) -> None:
        self._last_progress = now
        self._resends = 0

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` wants to be called next [s], or None when finished."""
        if self.done or not self._started:
            return None
        return min(
            self._last_progress + self.settings.neighbour_timeout_s,
            max(self._last_progress, self._last_resend) + self._resend_interval(),
        )

    def _settle(self, trades: Mapping[str, tuple[float, float]]) -> tuple[float, float, float, float, float]:
        """(net, community import, grid import, payment, cost) for fixed trades."""
        community_import = sum(kwh for kwh, _ in trades.values())
        net = best_net_demand_at_tariff(self.spec, self._buy, self._sell, community_import)
        grid_import = net - community_import
        payment = sum(kwh * price for kwh, price in trades.values())
        fees = sum(0.5 * self._public.fee(self.peer_id, j) * abs(kwh) for j, (kwh, _) in trades.items())
        cost = self.spec.cost(net) + _grid_cost(self._buy, self._sell, grid_import) + payment + fees
        return net, community_import, grid_import, payment, cost

    def _finish(self, trades: Mapping[str, tuple[float, float]], *, converged: bool) -> list[Outgoing]:
        net, community_import, grid_import, payment, cost = self._settle(trades)
        self.outcome = PeerOutcome(
            self.peer_id, converged, self.round, net, community_import, grid_import,
            payment, cost, self._grid_only, dict(sorted(trades.items())),
        )  # fmt: skip
        return [Outgoing("report", REPORT_TYPE, self.outcome.to_body())]

    def _status(
        self, p_buy: float, p_sell: float, position: float, traded: float, cost: float, final: bool
    ) -> Outgoing:
        """Per-round telemetry (meanings in docs/mechanisms/stackelberg.md)."""
        last_b, last_s = self._last_prices
        moved = 0.0 if math.isnan(last_b) else max(abs(p_buy - last_b), abs(p_sell - last_s))
        body = {
            "k": self.round,
            "primal": abs(position - self._last_position),
            "dual": moved,
            "price_min": p_sell,
            "price_max": p_buy,
            "cost": cost,
            "converged": final,
            "community_import": position,
            "traded": traded,
        }
        self._last_prices = (p_buy, p_sell)
        self._last_position = position
        return Outgoing("telemetry", STATUS_TYPE, body)


class StackelbergLeader(_Base):
    """The leader's state machine: posts prices, learns from answers, stops the game.

    Attributes:
        best: (leader cost, p_buy, p_sell) of the best pair sampled so far.
        probes: every posted (p_buy, p_sell), in round order.
    """

    def __init__(self, spec: PeerSpec, public: PublicScenario, settings: StackelbergSettings) -> None:
        super().__init__(spec, public, settings)
        self.neighbours: tuple[str, ...] = tuple(public.links[spec.id])
        self._half_fee = {f: 0.5 * public.fee(spec.id, f) for f in self.neighbours}
        self._demand: dict[float, _Sample] = {}  # p_buy -> what followers bought
        self._supply: dict[float, _Sample] = {}  # p_sell -> what followers sold
        self.best: tuple[float, float, float] | None = None
        self.probes: list[tuple[float, float]] = []
        self._plan: list[tuple[float, float]] = []
        band = self._buy - self._sell
        n = settings.scan_points
        self._plan = [(self._buy - band * j / (n - 1), self._buy - band * j / (n - 1)) for j in range(n)]
        self._plan[-1] = (self._sell, self._sell)  # exactly the floor, whatever the rounding
        self._spacing = band / (n - 1)
        self._answers: dict[str, float] = {}
        self._final = False
        self._posted: Outgoing | None = None

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """Post the first prices (or finish at once with no follower linked)."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        self._last_progress = now + start_grace_s
        if not self.neighbours:
            return self._finish({}, converged=True)
        return self._post(*self._next_probe())

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """Take a follower's answer.

        Raises:
            ProtocolError: not a linked follower, wrong type, malformed body, or two
                different answers for one round.
            StaleRoundError: an answer for a round not yet posted.
        """
        sender = envelope.sender
        if sender not in self._half_fee:
            raise ProtocolError("sender is not a follower linked to the leader", peer_id=sender)
        if envelope.type != QUANTITY_TYPE:
            raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=sender)
        body = envelope.body
        k, to, answer = body.get("k"), body.get("to"), body.get("q")
        if not (
            set(body) == {"k", "to", "q"} and _is_int(k) and k >= 1 and to == self.peer_id
            and _is_number(answer) and abs(answer) <= _MAX_KWH
        ):  # fmt: skip
            raise ProtocolError("malformed stackelberg.quantity body", peer_id=sender)
        if self.done or k < self.round:
            return self._resend(now)  # it is behind: it may not have our prices
        if k > self.round:
            raise StaleRoundError(f"answer for round {k} while at {self.round}", peer_id=sender, round=k)
        q = float(answer)
        if sender in self._answers:
            if self._answers[sender] != q:
                raise ProtocolError(f"two different answers for round {k}", peer_id=sender)
            return []
        self._answers[sender] = q
        if len(self._answers) < len(self.neighbours):
            return []
        self._progressed(now)
        return self._complete_round()

    def on_timer(self, now: float) -> list[Outgoing]:
        """Re-post late prices; fail the session on silent followers."""
        if self.done or not self._started:
            return []
        if now >= self._last_progress + self.settings.neighbour_timeout_s:
            silent = sorted(set(self.neighbours) - set(self._answers))
            self.failure = (
                f"no round-{self.round} stackelberg.quantity from {', '.join(silent)} "
                f"within {self.settings.neighbour_timeout_s:g} s"
            )
            return []
        if now >= max(self._last_progress, self._last_resend) + self._resend_interval():
            return self._resend(now)
        return []

    # ------------------------------------------------------------------ internals
    def _resend(self, now: float) -> list[Outgoing]:
        if self._posted is None or now - self._last_resend < self._resend_interval() / 2:
            return []
        self._last_resend = now
        self._resends += 1
        return [self._posted]

    def _post(self, p_buy: float, p_sell: float, final: bool = False) -> list[Outgoing]:
        self.round += 1
        self._final = final
        self._answers = {}
        self.probes.append((p_buy, p_sell))
        self._posted = Outgoing(
            "market", PRICES_TYPE, {"k": self.round, "p_buy": p_buy, "p_sell": p_sell, "final": final}
        )
        return [self._posted]

    def _cost(self, p_buy: float, p_sell: float) -> float:
        """J_L(b, s) from the sampled answers (module docstring)."""
        bought, sold = self._demand[p_buy], self._supply[p_sell]
        q = sold.kwh - bought.kwh
        y = best_net_demand_at_tariff(self.spec, self._buy, self._sell, q)
        return (
            self.spec.cost(y) + _grid_cost(self._buy, self._sell, y - q)
            + p_sell * sold.kwh - p_buy * bought.kwh + bought.fees + sold.fees
        )  # fmt: skip

    def _consider(self, p_buy: float, p_sell: float) -> None:
        if p_sell > p_buy:
            return
        candidate = (self._cost(p_buy, p_sell), p_buy, p_sell)
        # ties: the pair better for followers (lower p_buy, higher p_sell)
        if self.best is None or (candidate[0], candidate[1], -candidate[2]) < (
            self.best[0],
            self.best[1],
            -self.best[2],
        ):
            self.best = candidate

    def _next_probe(self) -> tuple[float, float, bool]:
        """The next (p_buy, p_sell, final) to post (module docstring: price update)."""
        while True:
            if self.best is not None and (
                self.round + 1 >= self.settings.max_iterations
                or (not self._plan and self._spacing < self.settings.price_tolerance)
            ):
                return self.best[1], self.best[2], True
            if not self._plan:
                assert self.best is not None  # the scan plan is never empty before a first answer
                _, b_star, s_star = self.best
                step = 2.0 * self._spacing / (self.settings.zoom_points + 1)
                self._plan = [
                    (self._clip(b_star - self._spacing + m * step), self._clip(s_star - self._spacing + m * step))
                    for m in range(1, self.settings.zoom_points + 1)
                ]
                self._spacing = step
            p_buy, p_sell = self._plan.pop(0)
            if p_buy in self._demand and p_sell in self._supply:
                continue  # nothing new to learn there
            return p_buy, p_sell, False

    def _clip(self, price: float) -> float:
        return min(max(price, self._sell), self._buy)

    def _complete_round(self) -> list[Outgoing]:
        p_buy, p_sell = self.probes[-1]
        answers = {f: self._answers[f] for f in self.neighbours}
        trades = {f: (-q, p_buy if q > 0 else p_sell) for f, q in answers.items() if q != 0.0}
        position = sum(kwh for kwh, _ in trades.values())
        traded = sum(abs(q) for q in answers.values())
        if self._final:
            cost = self._settle(trades)[4]
            return [self._status(p_buy, p_sell, position, traded, cost, True), *self._finish(trades, converged=True)]
        self._demand[p_buy] = _Sample(
            sum(max(q, 0.0) for q in answers.values()),
            sum(self._half_fee[f] * max(q, 0.0) for f, q in answers.items()),
        )
        self._supply[p_sell] = _Sample(
            sum(max(-q, 0.0) for q in answers.values()),
            sum(self._half_fee[f] * max(-q, 0.0) for f, q in answers.items()),
        )
        for b in self._demand:
            self._consider(b, p_sell)
        for s in self._supply:
            self._consider(p_buy, s)
        assert self.best is not None
        status = self._status(p_buy, p_sell, position, traded, self.best[0], False)
        return [status, *self._post(*self._next_probe())]


class StackelbergFollower(_Base):
    """A follower's state machine: answers each posted price pair with its best response."""

    def __init__(self, spec: PeerSpec, public: PublicScenario, settings: StackelbergSettings, leader: str) -> None:
        super().__init__(spec, public, settings)
        self.leader = leader
        linked = leader in public.links[spec.id]
        self.neighbours: tuple[str, ...] = (leader,) if linked else ()
        self._half_fee = 0.5 * public.fee(spec.id, leader) if linked else 0.0
        self._answered: tuple[float, float] | None = None  # the prices of the last answer
        self._reply: Outgoing | None = None

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """Wait for the leader's prices (or finish at once, grid only, when not linked to it)."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        self._last_progress = now + start_grace_s
        if not self.neighbours:
            return self._finish({}, converged=True)
        return []

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """Take the leader's prices and answer them.

        Raises:
            ProtocolError: not the leader, wrong type, malformed body, or other prices
                for a round already answered.
            StaleRoundError: a round more than one ahead.
        """
        if envelope.sender != self.leader or not self.neighbours:
            raise ProtocolError("only the leader posts prices", peer_id=envelope.sender)
        if envelope.type != PRICES_TYPE:
            raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=envelope.sender)
        body = envelope.body
        k, p_buy, p_sell, final = body.get("k"), body.get("p_buy"), body.get("p_sell"), body.get("final")
        if not (
            set(body) == {"k", "p_buy", "p_sell", "final"} and _is_int(k) and k >= 1
            and _is_number(p_buy) and _is_number(p_sell) and isinstance(final, bool)
            and self._sell <= p_sell <= p_buy <= self._buy
        ):  # fmt: skip
            raise ProtocolError("malformed stackelberg.prices body", peer_id=envelope.sender)
        prices = (float(p_buy), float(p_sell))
        if k == self.round and self._reply is not None:
            if prices != self._answered:
                raise ProtocolError(f"other prices for round {k}", peer_id=envelope.sender)
            return [self._reply]  # the leader is missing our answer
        if self.done or k < self.round:
            return []
        if k > self.round + 1:
            raise StaleRoundError(f"round {k} while at {self.round}", peer_id=envelope.sender, round=k)
        self.round = k
        self._progressed(now)
        q = follower_response(self.spec, self._buy, self._sell, self._half_fee, *prices)
        self._answered = prices
        self._reply = Outgoing("inbox", QUANTITY_TYPE, {"k": k, "to": self.leader, "q": q}, to=self.leader)
        trades = {} if q == 0.0 else {self.leader: (q, prices[0] if q > 0 else prices[1])}
        status = self._status(prices[0], prices[1], q, abs(q), self._settle(trades)[4], final)
        out = [self._reply, status]
        if final:
            out += self._finish(trades, converged=True)
        return out

    def on_timer(self, now: float) -> list[Outgoing]:
        """Re-send the last answer when the next prices are late; fail when the leader is silent."""
        if self.done or not self._started:
            return []
        if now >= self._last_progress + self.settings.neighbour_timeout_s:
            self.failure = (
                f"no round-{self.round + 1} stackelberg.prices from {self.leader} "
                f"within {self.settings.neighbour_timeout_s:g} s"
            )
            return []
        if now >= max(self._last_progress, self._last_resend) + self._resend_interval():
            self._last_resend = now
            self._resends += 1
            return [self._reply] if self._reply is not None else []
        return []


def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> StackelbergLeader | StackelbergFollower:
    """The mechanism registry's entry point (:func:`wattmesh.protocols.mechanism.create_core`).

    Raises:
        ValueError: no grid, or the public settings name no valid leader.
    """
    if public.grid is None:
        raise ValueError("mechanism 'stackelberg' needs a [grid]: its tariff bounds the leader's prices")
    leader = public.settings.get(LEADER_KEY)
    if not isinstance(leader, str) or leader not in public.peer_ids:
        raise ValueError("mechanism 'stackelberg' needs the leader's id in the public settings (role = \"leader\")")
    settings = StackelbergSettings.from_mapping({k: v for k, v in public.settings.items() if k != LEADER_KEY})
    if spec.id == leader:
        return StackelbergLeader(spec, public, settings)
    return StackelbergFollower(spec, public, settings, leader)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check ``[market.stackelberg]`` as a user wrote it; raises ``ValueError`` naming the bad setting."""
    StackelbergSettings.from_mapping(settings)
