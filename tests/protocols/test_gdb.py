"""Generalized demand bidding (``protocols/gdb.py``) on the in-memory bus and as a bare core.

Market runs pass encoded, signed frames between N cores (``run_in_memory``), once per
case (cached). The paper's properties (Chen et al., IEEE TSG 2020) are checked with
an independent closed form of each peer's cost f_i(x) = min_y C_i(y) + grid(y − x)
and scipy's scalar minimiser, not with the core's own solver: the bids are a Nash
equilibrium, the equilibrium is unique, its price is the average marginal value,
nobody is worse off than with the grid alone, and the captured share of the optimal
sharing gain grows with the number of peers and with |a|.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import deque
from dataclasses import dataclass

import pytest
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from reference import social_optimum
from scipy.optimize import minimize_scalar

from wattmesh.protocols.errors import ProtocolError, ScenarioError, StaleRoundError
from wattmesh.protocols.gdb import (
    REPORT_TYPE,
    ROUND_TYPE,
    STATUS_TYPE,
    GdbPeer,
    GdbSettings,
    PriceSearch,
    clearing_price,
    pool_trades,
    validate_settings,
)
from wattmesh.protocols.mechanism import Outgoing, create_core
from wattmesh.protocols.memory_bus import BusResult, run_in_memory
from wattmesh.protocols.result import aggregate_reports
from wattmesh.protocols.scenario import PeerSpec, Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope, encode

A = GdbSettings().price_sensitivity  # a [kWh per currency/kWh]


def gdb(text: str, settings: str = "") -> str:
    """A scenario text switched to the gdb mechanism, with optional settings."""
    text = text.replace('mechanism = "admm"', 'mechanism = "gdb"')
    return text + (f"[market.gdb]\n{settings}\n" if settings else "")


CASES: dict[str, str] = {
    "n5-grid": gdb(random_community(5, 0)),
    "n8-nogrid": gdb(random_community(8, 6, grid=False)),
    "n10-grid": gdb(random_community(10, 1)),
    # the same community from another starting price, and under damped best responses
    "n10-grid-start-high": gdb(random_community(10, 1), "initial_price = 0.29"),
    "n10-grid-start-low": gdb(random_community(10, 1), "initial_price = 0.081"),
    "n10-grid-best-response": gdb(random_community(10, 1), 'dynamics = "best_response"'),
    "n10-grid-a2": gdb(random_community(10, 1), "price_sensitivity = -2.0"),
    "n10-grid-a50": gdb(random_community(10, 1), "price_sensitivity = -50.0"),
    "n12-grid-roles-fee": gdb(random_community(12, 4, roles=True, fee=0.01)),
    "n50-grid": gdb(random_community(50, 0)),
}
NO_FEES = [c for c in CASES if "fee" not in c]


def keys_for(scenario: Scenario) -> dict[str, Ed25519PrivateKey]:
    return {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    bus: BusResult

    @property
    def price(self) -> float:
        prices = {p for o in self.bus.outcomes.values() for _, p in o.trades.values()}
        assert len(prices) == 1, prices  # one pool price, the same float everywhere
        return prices.pop()

    @property
    def social_cost(self) -> float:
        return sum(o.cost for o in self.bus.outcomes.values())

    @property
    def grid_only_cost(self) -> float:
        return sum(o.grid_only_cost for o in self.bus.outcomes.values() if o.grid_only_cost is not None)

    @property
    def sensitivity(self) -> float:
        return float(self.scenario.public.settings.get("price_sensitivity", A))


@functools.cache
def market(case: str) -> Run:
    """GIVEN the case's community, WHEN its gdb market runs on the bus (once)."""
    scenario = parse_scenario(CASES[case], source=case)
    assert scenario.public.mechanism == "gdb"
    return Run(scenario, run_in_memory(scenario, keys_for(scenario)))


@functools.cache
def optimum(case: str) -> float:
    return social_optimum(market(case).scenario).social_cost


# --------------------------------------------------- an independent model of a peer
def own_cost(spec: PeerSpec, grid: tuple[float, float] | None, x: float) -> float:
    """f(x) = min_y C(y) + grid(y − x) [currency] in closed form (a > 0); inf if infeasible.

    With a grid: y = median(y*(buy), x, y*(sell)), y*(p) = clip((−p − b)/a, min, max):
    below y*(buy) it buys the rest from the grid, above y*(sell) it sells the excess.
    """
    assert spec.cost_quadratic > 0
    if (spec.role == "buyer" and x < 0) or (spec.role == "seller" and x > 0):
        return math.inf
    if grid is None:
        return spec.cost(x) if spec.min_kwh <= x <= spec.max_kwh else math.inf
    buy, sell = grid

    def ideal(p: float) -> float:
        return min(max((-p - spec.cost_linear) / spec.cost_quadratic, spec.min_kwh), spec.max_kwh)

    y = sorted((ideal(buy), x, ideal(sell)))[1]
    g = y - x
    return spec.cost(y) + (buy * g if g > 0 else sell * g)


def tariff(run: Run) -> tuple[float, float] | None:
    grid = run.scenario.public.grid
    return None if grid is None else (grid.buy_price, grid.sell_price)


def positions(run: Run) -> dict[str, float]:
    """x_i = Σ_j t_ij, the pool position each peer reported."""
    return {pid: o.community_import for pid, o in run.bus.outcomes.items()}


# ------------------------------------------------------------------ the paper's properties
@pytest.mark.parametrize("case", ["n5-grid", "n8-nogrid", "n10-grid", "n10-grid-best-response", "n10-grid-a2"])
def test_the_bids_are_a_nash_equilibrium(case: str) -> None:
    run = market(case)
    grid, x = tariff(run), positions(run)
    n = len(x)
    kappa = 1.0 / ((n - 1) * abs(run.sensitivity))
    for pid, mine in x.items():
        spec = run.scenario.peers[pid]
        # the others' bid total, recovered from the public clearing: b_j = x_j − a·λ
        others = sum(x[j] - run.sensitivity * run.price for j in x if j != pid)

        def total(z: float, spec: PeerSpec = spec, others: float = others) -> float:
            return own_cost(spec, grid, z) + kappa * z * z + kappa * others * z  # f(x) + λ(x)·x

        low, high = (-25.0, 25.0) if grid is not None else (spec.min_kwh, spec.max_kwh)
        low, high = (0.0, high) if spec.role == "buyer" else (low, 0.0) if spec.role == "seller" else (low, high)
        best = minimize_scalar(total, bounds=(low, high), method="bounded", options={"xatol": 1e-10})
        # THEN no peer can lower its cost by bidding anything else
        assert total(mine) <= best.fun + 1e-9, (pid, mine, best.x)
        assert mine == pytest.approx(best.x, abs=1e-4)


def test_the_equilibrium_is_unique() -> None:
    # GIVEN one community, started from three prices and run under both dynamics
    runs = [market(c) for c in ("n10-grid", "n10-grid-start-high", "n10-grid-start-low", "n10-grid-best-response")]
    # THEN all end at the same price and the same positions
    assert_allclose([r.price for r in runs], runs[0].price, atol=1e-7)
    for run in runs[1:]:
        mine, theirs = positions(run), positions(runs[0])
        assert_allclose([mine[p] for p in sorted(mine)], [theirs[p] for p in sorted(theirs)], atol=1e-6)
    # AND the starting prices really differ from the outcome
    assert abs(0.29 - runs[0].price) > 0.1 and abs(0.081 - runs[0].price) > 1e-3


@pytest.mark.parametrize("case", ["n5-grid", "n8-nogrid", "n10-grid", "n50-grid"])
def test_the_price_is_the_average_marginal_value(case: str) -> None:
    run = market(case)
    grid, x = tariff(run), positions(run)
    h = 1e-6  # one-sided difference quotients: the marginal value may be an interval at a kink
    low, high = [], []
    for pid, mine in x.items():
        spec = run.scenario.peers[pid]
        low.append(-(own_cost(spec, grid, mine + h) - own_cost(spec, grid, mine)) / h)
        high.append(-(own_cost(spec, grid, mine) - own_cost(spec, grid, mine - h)) / h)
    # THEN λ = (1/I)·Σ_i −f_i'(x_i), the average marginal disutility (interval at kinks)
    assert sum(low) / len(low) - 1e-6 <= run.price <= sum(high) / len(high) + 1e-6
    # AND the intervals are narrow: most peers have one marginal value
    assert sum(hi - lo for lo, hi in zip(low, high, strict=True)) / len(low) < 0.05


@pytest.mark.parametrize("case", NO_FEES)
def test_nobody_is_worse_off_than_with_the_grid_alone(case: str) -> None:
    run = market(case)
    checked = 0
    for pid, o in run.bus.outcomes.items():
        if o.grid_only_cost is None:  # no grid and 0 kWh outside its limits: no way to stay out
            assert run.scenario.public.grid is None
            continue
        # THEN its equilibrium cost is at most its cost of not sharing (x_i = 0 was a bid)
        assert o.cost <= o.grid_only_cost + 1e-9, pid
        checked += 1
    assert checked >= len(run.bus.outcomes) // 2


def test_the_captured_gain_grows_with_the_number_of_peers() -> None:
    # GIVEN communities of 5 and of 50 households drawn the same way
    shares = {}
    for case in ("n5-grid", "n50-grid"):
        run = market(case)
        shares[case] = (run.grid_only_cost - run.social_cost) / (run.grid_only_cost - optimum(case))
    # THEN the equilibrium captures more of the optimal sharing gain with 50 peers
    assert 0.0 < shares["n5-grid"] < shares["n50-grid"] <= 1.0 + 1e-9, shares
    assert shares["n50-grid"] > 0.99, shares


def test_the_community_does_better_with_a_larger_price_sensitivity() -> None:
    # GIVEN one community under a = −2, −10, −50 (κ = 1/((I − 1)|a|) is the distortion)
    costs = [market(c).social_cost for c in ("n10-grid-a2", "n10-grid", "n10-grid-a50")]
    # THEN its total cost falls as |a| grows, toward the optimum
    assert costs[0] > costs[1] > costs[2] >= optimum("n10-grid") - 1e-9, costs


# ------------------------------------------------------------------ the mechanism's invariants
@pytest.mark.parametrize("case", list(CASES))
def test_everyone_stops_on_the_same_round_with_one_bid_per_round(case: str) -> None:
    run = market(case)
    outcomes = run.bus.outcomes.values()
    rounds = {o.iterations for o in outcomes}
    assert all(o.converged for o in outcomes)
    assert len(rounds) == 1 and rounds.pop() < GdbSettings().max_iterations
    assert run.bus.messages == sum(o.iterations for o in outcomes)


@pytest.mark.parametrize("case", list(CASES))
def test_pool_trades_are_reciprocal_and_respect_roles(case: str) -> None:
    run = market(case)
    outcomes = run.bus.outcomes
    for pid, o in outcomes.items():
        assert set(o.trades) == set(run.scenario.public.peer_ids) - {pid}
        for other, (kwh, price) in o.trades.items():
            # THEN both ends report exactly opposite energy at the one pool price
            assert kwh == -outcomes[other].trades[pid][0] and price == run.price
            # AND a buyer only imports, a seller only exports, on every link
            role = run.scenario.peers[pid].role
            assert not (role == "buyer" and kwh < 0) and not (role == "seller" and kwh > 0), (pid, other)
        # AND y = q + g with q = Σ_j t_ij and the payment λ·q
        assert o.community_import == pytest.approx(sum(k for k, _ in o.trades.values()), abs=1e-12)
        assert o.net_demand == pytest.approx(o.community_import + o.grid_import, abs=1e-12)
        assert o.payment == pytest.approx(run.price * o.community_import, abs=1e-12)
    assert abs(sum(o.payment for o in outcomes.values())) <= 1e-9
    assert any(abs(k) > 0.1 for o in outcomes.values() for k, _ in o.trades.values())


def test_fees_are_charged_on_the_pool_trades() -> None:
    run = market("n12-grid-roles-fee")
    grid = run.scenario.public.grid
    assert grid is not None
    for pid, o in run.bus.outcomes.items():
        spec = run.scenario.peers[pid]
        fees = sum(0.5 * run.scenario.public.fee(pid, j) * abs(k) for j, (k, _) in o.trades.items())
        assert fees > 0 or o.community_import == 0
        expected = spec.cost(o.net_demand) + grid.cost(o.grid_import) + o.payment + fees
        assert o.cost == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_result_document_aggregates_the_reports(case: str) -> None:
    run = market(case)
    reports = {p: o.to_body() for p, o in run.bus.outcomes.items()}
    result = aggregate_reports(run.scenario.public, reports, wall_seconds=1.0)
    assert result["disputes"] == [] and result["missing_peers"] == [] and result["converged"] is True
    assert result["mechanism"] == "gdb" and result["social_cost"] == pytest.approx(run.social_cost, abs=1e-12)


# ---------------------------------------------------------------- the core by hand
def trio(settings: str = "") -> Scenario:
    return parse_scenario(gdb(random_community(3, 2), settings))


TRIO = trio()


def envelope(sender: str, body: dict[str, object], *, kind: str = ROUND_TYPE) -> Envelope:
    return Envelope(kind, sender, "test", "s", 1, 0, body)


@pytest.mark.parametrize(
    "body",
    [{}, {"k": 1}, {"k": True, "b": 0.5}, {"k": 0, "b": 0.5}, {"k": 1.0, "b": 0.5}, {"k": 1, "b": "x"},
     {"k": 1, "b": False}, {"k": 1, "b": math.inf}, {"k": 1, "b": 0.5, "x": 1}],
)  # fmt: skip
def test_malformed_bids_are_refused_and_change_nothing(body: dict[str, object]) -> None:
    scenario = trio()
    core = GdbPeer(scenario.peers["h000"], scenario.public, 1)
    core.start(0.0)
    before = (core.round, core.bid, dict(core._pending.by_round))
    with pytest.raises(ProtocolError):
        core.receive(envelope("h001", body), 0.0)
    assert (core.round, core.bid, dict(core._pending.by_round)) == before


_JUNK = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=4)


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["k", "b", "x"]), _JUNK | st.lists(_JUNK, max_size=3), max_size=3))
def test_any_body_is_taken_or_refused_with_a_protocol_error(body: dict[str, object]) -> None:
    scenario = TRIO
    core = GdbPeer(scenario.peers["h000"], scenario.public, 1)
    core.start(0.0)
    try:
        out = core.receive(envelope("h001", body), 0.0)
    except ProtocolError:
        return
    assert isinstance(out, list)


def test_strangers_other_types_and_rounds_far_ahead_are_refused() -> None:
    scenario = trio()
    core = GdbPeer(scenario.peers["h000"], scenario.public, 1)
    core.start(0.0)
    with pytest.raises(ProtocolError):
        core.receive(envelope("h009", {"k": 1, "b": 0.1}), 0.0)
    with pytest.raises(ProtocolError):
        core.receive(envelope("h001", {"k": 1, "b": 0.1}, kind="admm.round"), 0.0)
    with pytest.raises(StaleRoundError):
        core.receive(envelope("h001", {"k": 3, "b": 0.1}), 0.0)


def test_a_late_round_is_re_sent_and_a_silent_peer_fails_the_session() -> None:
    scenario = trio("round_timeout_s = 2.0\nneighbour_timeout_s = 9.0")
    core = GdbPeer(scenario.peers["h000"], scenario.public, 1)
    first = core.start(0.0)
    assert [o.type for o in first] == [ROUND_TYPE]
    assert core.receive(envelope("h001", {"k": 1, "b": 0.3}), 0.5) == []
    assert core.next_deadline() == pytest.approx(2.0)
    assert core.on_timer(2.0) == first  # WHEN the round is late THEN its bid goes out again
    assert core.on_timer(9.0) == [] and core.failure is not None
    assert "h002" in core.failure and "h001" not in core.failure  # only the silent peer is named


def test_one_round_by_hand_clears_and_bids_again() -> None:
    scenario = trio()
    cores = {p: GdbPeer(scenario.peers[p], scenario.public, 1) for p in scenario.public.peer_ids}
    first = {p: c.start(0.0)[0] for p, c in cores.items()}
    out = []
    for other in ("h001", "h002"):
        out += cores["h000"].receive(envelope(other, dict(first[other].body)), 0.0)
    bids = {p: float(m.body["b"]) for p, m in first.items()}
    assert cores["h000"].price == clearing_price(bids, A) == -math.fsum(bids.values()) / (3 * A)
    status = [o for o in out if o.type == STATUS_TYPE]
    assert len(status) == 1 and status[0].body["price_min"] == status[0].body["price_max"] == cores["h000"].price
    assert set(status[0].body) == {"k", "primal", "dual", "price_min", "price_max", "cost", "converged",
                                   "community_import", "traded"}  # fmt: skip
    assert [o.body["k"] for o in out if o.type == ROUND_TYPE] == [2]


def test_a_lone_peer_settles_with_the_grid() -> None:
    scenario = parse_scenario(gdb(random_community(1, 3)))
    core = GdbPeer(scenario.peers["h000"], scenario.public, 0)
    assert [o.type for o in core.start(0.0)] == [REPORT_TYPE]
    assert core.outcome is not None and core.outcome.trades == {}
    assert core.outcome.cost == pytest.approx(core.outcome.grid_only_cost)


def test_neighbour_lists_are_refused_when_the_scenario_loads() -> None:
    # GIVEN a community where peers limit whom they trade with
    text = gdb(random_community(8, 1, degree=4))
    # THEN the gdb pool cannot run it, and says why
    with pytest.raises(ScenarioError, match="neighbors"):
        parse_scenario(text)


def test_pool_split_is_proportional_to_sales() -> None:
    trades = pool_trades({"a": 2.0, "b": 1.0, "c": -2.25, "d": -0.75, "e": 0.0})
    assert trades == {("a", "c"): 1.5, ("a", "d"): 0.5, ("b", "c"): 0.75, ("b", "d"): 0.25}


def test_price_search_finds_the_root_of_a_piecewise_linear_excess() -> None:
    def g(mu: float) -> float:  # continuous, decreasing, kinked at 0.1 and 0.2, root at 0.15
        if mu < 0.1:
            return 0.05 + 3.0 * (0.1 - mu)
        if mu < 0.2:
            return 0.05 - (mu - 0.1)
        return -0.05 - 0.2 * (mu - 0.2)

    for start, bracket in ((-5.0, None), (3.0, None), (0.29, (0.08, 0.30))):
        search = PriceSearch() if bracket is None else PriceSearch(low=bracket[0], high=bracket[1])
        mu, steps = start, 0
        while abs(g(mu)) > 1e-12 and steps < 60:
            mu, steps = search.next(mu, g(mu), 1e-12), steps + 1
        assert mu == pytest.approx(0.15, abs=1e-10) and steps < 25, (start, steps)


@pytest.mark.parametrize(
    "settings",
    [
        {"price_sensitivity": 0.0},
        {"price_sensitivity": 1.0},
        {"dynamics": "gossip"},
        {"damping": 0.0},
        {"damping": 1.5},
        {"max_iterations": 1},
        {"eps_rel": 0.0},
        {"price_sensitivity": True},
        {"rho": 0.1},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        validate_settings(settings)


SMALL = parse_scenario(gdb(random_community(4, 3)))

def run_by_hand(scenario: Scenario, horizon: int) -> list[tuple[str, Outgoing]]:
    """Every message the cores emit, in a FIFO market driven without the wire."""
    cores = {p: create_core(scenario.peers[p], scenario.public, horizon) for p in scenario.public.peer_ids}
    emitted: list[tuple[str, Outgoing]] = []
    queue: deque[tuple[str, Outgoing]] = deque()

    def publish(sender: str, items: list[Outgoing]) -> None:
        emitted.extend((sender, item) for item in items)
        queue.extend((sender, item) for item in items if item.channel == "market")

    for pid, core in cores.items():
        publish(pid, core.start(0.0))
    while queue:
        sender, item = queue.popleft()
        for pid, core in cores.items():
            if sender in core.neighbours:
                publish(pid, core.receive(Envelope(item.type, sender, scenario.name, "s", 1, 0, item.body), 0.0))
    assert all(core.outcome is not None for core in cores.values())
    return emitted


def test_every_message_a_core_emits_can_be_signed() -> None:
    # GIVEN a small market run to the end, telemetry and reports included
    scenario = SMALL
    emitted = run_by_hand(scenario, diameter(scenario.public.links))
    assert {item.channel for _, item in emitted} == {"market", "telemetry", "report"}
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    # THEN the wire accepts every body (finite numbers, str keys): nothing would fail to publish
    for sender, item in emitted:
        encode(Envelope(item.type, sender, scenario.name, "s", 1, 0, item.body), key)
