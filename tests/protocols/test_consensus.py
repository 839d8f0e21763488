"""The consensus market (``protocols/consensus.py``) on the in-memory bus and as a bare core.

Market runs pass encoded, signed frames between N cores (``run_in_memory``), once per
case (cached); the tests check the peers' reports against ``social_optimum``
(cvxpy/Clarabel) and the mechanism's own invariants: one stopping round, one price,
reciprocal trades bit for bit, routed imports that match each peer's position.
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
from reference import Optimum, social_optimum

from wattmesh.protocols.consensus import (
    REPORT_TYPE,
    ROUND_TYPE,
    STATUS_TYPE,
    ConsensusPeer,
    ConsensusSettings,
    position_range,
    validate_settings,
)
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import Outgoing, create_core
from wattmesh.protocols.memory_bus import BusResult, run_in_memory
from wattmesh.protocols.result import aggregate_reports
from wattmesh.protocols.scenario import PeerSpec, Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope, encode

COST_TOLERANCE = 1e-5  # relative social-cost gap, scale max(|optimum|, 1), at the default stop
PRICE_TOLERANCE = 1e-4  # [currency/kWh]


def consensus(text: str, settings: str = "") -> str:
    """A scenario text switched to the consensus mechanism, with optional settings."""
    text = text.replace('mechanism = "admm"', 'mechanism = "consensus"')
    return text + (f"[market.consensus]\n{settings}\n" if settings else "")


def homes(demands: dict[str, float], links: dict[str, list[str]], *, grid: bool = True, extra: str = "") -> str:
    """Households with flex 1 kWh and flex cost 0.1–0.3, on the given neighbour lists."""
    lines = ['[community]\nname = "hand"', '[market]\nmechanism = "consensus"']
    if grid:
        lines.append("[grid]\nbuy_price = 0.30\nsell_price = 0.08")
    for index, (pid, demand) in enumerate(demands.items()):
        lines.append(f'[[peers]]\nid = "{pid}"\ndemand = {demand}\nflex = 1.0\nflex_cost = {0.1 + 0.05 * index}')
        lines.append("neighbors = [" + ", ".join(f'"{o}"' for o in links[pid]) + "]")
    return "\n".join(lines) + "\n" + extra


LINE = {"a": ["b"], "b": ["a", "c"], "c": ["b", "d"], "d": ["c", "e"], "e": ["d"]}  # diameter 4
# Linear costs (a = 0) on a line farm – mill – bakery: the price must settle exactly on
# the bakery's marginal value 0.22, where its best response is the whole of [0, 3] kWh
# (it takes the 2.4 kWh the mill leaves).
LINEAR = """
[community]
name = "linear"
[market]
mechanism = "consensus"
[grid]
buy_price = 0.30
sell_price = 0.08
[[peers]]
id = "farm"
cost = { a = 0.0, b = -0.02 }
min = -3.0
max = 0.0
neighbors = ["mill"]
[[peers]]
id = "mill"
cost = { a = 0.05, b = -0.25 }
min = 0.0
max = 5.0
neighbors = ["farm", "bakery"]
[[peers]]
id = "bakery"
cost = { a = 0.0, b = -0.22 }
min = 0.0
max = 3.0
neighbors = ["mill"]
"""

CASES: dict[str, str] = {
    # sparse neighbour lists (ring ±2 plus one random link), no fees
    "n12-sparse-grid-sell-price": consensus(random_community(12, 0, degree=5)),
    "n12-sparse-grid-interior": consensus(random_community(12, 8, degree=5)),
    "n16-sparse-nogrid": consensus(random_community(16, 2, degree=5, grid=False)),
    # a line (diameter 4) of homes that are short of energy: the price is the grid's buy price
    "line-grid-short": homes({"a": 3.0, "b": 2.5, "c": -1.0, "d": 4.0, "e": -0.5}, LINE),
    "line-nogrid": homes({"a": 1.0, "b": -2.0, "c": 0.5, "d": 1.5, "e": -1.0}, LINE, grid=False),
    # full topology with roles: positions respect them, the optimum is reachable
    "n10-full-grid-roles": consensus(random_community(10, 4, roles=True)),
    "linear-costs-line": LINEAR,
}
NO_FEES = list(CASES)
FEE_CASE = consensus(random_community(10, 3, degree=5, fee=0.01))


def keys_for(scenario: Scenario) -> dict[str, Ed25519PrivateKey]:
    return {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    bus: BusResult
    optimum: Optimum


@functools.cache
def market(case: str) -> Run:
    """GIVEN the case's community, WHEN its consensus market runs on the bus (once)."""
    text = FEE_CASE if case == "fee" else CASES[case]
    scenario = parse_scenario(text, source=case)
    assert scenario.public.mechanism == "consensus"
    return Run(scenario, run_in_memory(scenario, keys_for(scenario)), social_optimum(scenario))


def clearing_price(run: Run) -> float:
    prices = {price for o in run.bus.outcomes.values() for _, price in o.trades.values()}
    assert len(prices) == 1, prices  # one community price, the same float everywhere
    return prices.pop()


def optimal_prices(run: Run) -> list[float]:
    """Marginal values −C'(y) of the optimum's peers strictly inside their limits.

    Without fees or binding roles, every such peer values energy at the community price.
    """
    prices = []
    for pid, y in run.optimum.net_demand.items():
        spec = run.scenario.peers[pid]
        if spec.cost_quadratic > 0 and spec.min_kwh + 1e-4 < y < spec.max_kwh - 1e-4:
            prices.append(-(spec.cost_quadratic * y + spec.cost_linear))
    return prices


@pytest.mark.parametrize("case", NO_FEES)
def test_social_cost_matches_the_central_optimum(case: str) -> None:
    run = market(case)
    # THEN the peers' reported costs add up to the social optimum
    reported = sum(o.cost for o in run.bus.outcomes.values())
    optimum = run.optimum.social_cost
    assert abs(reported - optimum) <= COST_TOLERANCE * max(abs(optimum), 1.0), (reported, optimum)
    # AND every peer's net demand is the optimal one (unique: strictly convex or pinned)
    for pid, outcome in run.bus.outcomes.items():
        assert outcome.net_demand == pytest.approx(run.optimum.net_demand[pid], abs=2e-3), pid


@pytest.mark.parametrize("case", NO_FEES)
def test_the_price_is_the_optimums_marginal_value(case: str) -> None:
    run = market(case)
    price = clearing_price(run)
    # THEN it equals −C'(y) of every optimal peer that is free to move
    marginal = optimal_prices(run)
    if marginal:
        assert_allclose(marginal, price, atol=PRICE_TOLERANCE)
    # AND with a grid it lies within the tariff
    grid = run.scenario.public.grid
    if grid is not None:
        assert grid.sell_price <= price <= grid.buy_price


def test_a_short_community_pays_the_grid_buy_price() -> None:
    # GIVEN homes on a line that together need more than they can spare
    run = market("line-grid-short")
    # THEN the community price is exactly the tariff's buy price
    assert clearing_price(run) == 0.30
    # AND nobody resells grid energy: every grid import is non-negative
    assert all(o.grid_import >= -1e-4 for o in run.bus.outcomes.values())


def test_a_surplus_community_gets_the_grid_sell_price() -> None:
    run = market("n12-sparse-grid-sell-price")
    assert clearing_price(run) == 0.08
    assert all(o.grid_import <= 1e-4 for o in run.bus.outcomes.values())


@pytest.mark.parametrize("case", [*NO_FEES, "fee"])
def test_everyone_stops_on_the_same_round_with_one_message_per_round(case: str) -> None:
    run = market(case)
    outcomes = run.bus.outcomes.values()
    # THEN all peers voted the same stop, converged, well before the cap
    assert all(o.converged for o in outcomes)
    rounds = {o.iterations for o in outcomes}
    assert len(rounds) == 1 and rounds.pop() < ConsensusSettings().max_iterations
    # AND the bus carried one round message per peer and round: no re-sends
    assert run.bus.messages == sum(o.iterations for o in outcomes)


@pytest.mark.parametrize("case", [*NO_FEES, "fee"])
def test_trades_are_reciprocal_bit_for_bit_and_budget_balanced(case: str) -> None:
    run = market(case)
    outcomes = run.bus.outcomes
    price = clearing_price(run)
    for pid, outcome in outcomes.items():
        # THEN each peer reports one trade per neighbour, mirrored exactly by the neighbour
        assert set(outcome.trades) == set(run.scenario.public.links[pid])
        for other, (kwh, trade_price) in outcome.trades.items():
            assert kwh == -outcomes[other].trades[pid][0], (pid, other)
            assert trade_price == price
        # AND its payment is the price times its routed import
        assert outcome.payment == pytest.approx(price * outcome.community_import, abs=1e-12)
    # AND what buyers pay, sellers receive
    assert abs(sum(o.payment for o in outcomes.values())) <= 1e-9


@pytest.mark.parametrize("case", NO_FEES)
def test_each_peer_is_balanced_and_routed_as_it_wants(case: str) -> None:
    run = market(case)
    grid = run.scenario.public.grid
    for pid, o in run.bus.outcomes.items():
        spec = run.scenario.peers[pid]
        # THEN y = q + g, q = Σ_j t_ij, and g = 0 without a grid
        assert o.net_demand == pytest.approx(o.community_import + o.grid_import, abs=1e-12)
        assert o.community_import == pytest.approx(math.fsum(k for k, _ in o.trades.values()), abs=1e-12)
        if grid is None:
            assert o.grid_import == 0.0
        # AND y stays within its limits (up to the unrouted rest the stop rule bounds)
        assert spec.min_kwh - 1e-4 <= o.net_demand <= spec.max_kwh + 1e-4, pid
        # AND its routed import is a best response to the clearing price (within the stop tolerance)
        price = clearing_price(run)
        tariff = None if grid is None else (grid.buy_price, grid.sell_price)
        low, high = position_range(spec, tariff, price - PRICE_TOLERANCE, price + PRICE_TOLERANCE)
        assert low - 1e-4 <= o.community_import <= high + 1e-4, (pid, o.community_import, low, high)


def test_roles_bound_each_peers_community_position() -> None:
    run = market("n10-full-grid-roles")
    for pid, o in run.bus.outcomes.items():
        role = run.scenario.peers[pid].role
        # THEN a buyer imports (q ≥ 0), a seller exports (q ≤ 0), up to the stop tolerance
        if role == "buyer":
            assert o.community_import >= -1e-5, pid
        elif role == "seller":
            assert o.community_import <= 1e-5, pid
    assert any(s.role != "flexible" for s in run.scenario.peers.values())


def test_with_fees_trades_pay_them_and_the_community_stays_above_the_optimum() -> None:
    # GIVEN a sparse community with a fee of 0.01 per kWh traded on every link
    run = market("fee")
    outcomes = run.bus.outcomes
    price = clearing_price(run)
    grid = run.scenario.public.grid
    assert grid is not None
    for pid, o in outcomes.items():
        # THEN each peer's cost includes half the fee on each of its trades
        spec = run.scenario.peers[pid]
        fees = sum(0.5 * run.scenario.public.fee(pid, j) * abs(k) for j, (k, _) in o.trades.items())
        expected = spec.cost(o.net_demand) + grid.cost(o.grid_import) + price * o.community_import + fees
        assert o.cost == pytest.approx(expected, abs=1e-9)
    # AND the price ignores fees, so the outcome is feasible but not better than the optimum
    assert sum(o.cost for o in outcomes.values()) >= run.optimum.social_cost - 1e-9


@pytest.mark.parametrize("case", [*NO_FEES, "fee"])
def test_result_document_aggregates_the_reports(case: str) -> None:
    run = market(case)
    reports = {pid: o.to_body() for pid, o in run.bus.outcomes.items()}
    # WHEN the reports are aggregated into the result file
    result = aggregate_reports(run.scenario.public, reports, wall_seconds=1.0)
    # THEN nobody disputes a trade, and the community does no worse than the grid alone
    assert result["disputes"] == [] and result["missing_peers"] == [] and result["converged"] is True
    assert result["mechanism"] == "consensus"
    if result["grid_only_cost"] is not None:
        assert result["social_cost"] <= result["grid_only_cost"] + 1e-9


# ---------------------------------------------------------------- the core by hand
def triangle(settings: str = "") -> Scenario:
    links = {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
    return parse_scenario(homes({"a": 2.0, "b": -1.5, "c": 0.5}, links, extra=settings))


TRIANGLE = triangle()


def envelope(sender: str, body: dict[str, object], *, kind: str = ROUND_TYPE, seq: int = 1) -> Envelope:
    return Envelope(kind, sender, "hand", "s", seq, 0, body)


def good_body(k: int = 1) -> dict[str, object]:
    return {"k": k, "lam": 0.19, "s": 0.5, "v0": 1, "votes": [False] * (k - 1), "low": [0.1] * (k - 1),
            "high": [0.2] * (k - 1)}  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        {},
        {**good_body(), "k": True},  # bool is not a round
        {**good_body(), "k": 0},
        {**good_body(), "lam": "0.1"},
        {**good_body(), "s": False},  # bool is not a number of kWh
        {**good_body(), "s": math.nan},
        {**good_body(), "extra": 1},
        {**good_body(2), "votes": [True, True]},  # window longer than the rounds before k
        {**good_body(2), "low": []},
        {**good_body(2), "high": ["x"]},
        {**good_body(2), "votes": [1]},
        {**good_body(), "v0": 2},
    ],
)
def test_malformed_round_bodies_are_refused_and_change_nothing(body: dict[str, object]) -> None:
    scenario = triangle()
    core = ConsensusPeer(scenario.peers["a"], scenario.public, horizon=1)
    core.start(0.0)
    before = (core.round, core.price, core.tracker, dict(core.flows))
    # WHEN a neighbour sends junk THEN the core refuses it and keeps its state
    with pytest.raises(ProtocolError):
        core.receive(envelope("b", body), 0.0)
    assert (core.round, core.price, core.tracker, dict(core.flows)) == before


_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(["k", "lam", "s", "v0", "votes", "low", "high", "x"]), _JUNK, max_size=8)
)
def test_any_body_is_taken_or_refused_with_a_protocol_error(body: dict[str, object]) -> None:
    scenario = TRIANGLE
    core = ConsensusPeer(scenario.peers["a"], scenario.public, horizon=1)
    core.start(0.0)
    try:
        out = core.receive(envelope("b", body), 0.0)
    except ProtocolError:
        return
    assert isinstance(out, list)


def test_strangers_other_types_and_rounds_far_ahead_are_refused() -> None:
    scenario = parse_scenario(homes({"a": 1.0, "b": -1.0, "c": 0.5}, {"a": ["b"], "b": ["a", "c"], "c": ["b"]}))
    core = ConsensusPeer(scenario.peers["a"], scenario.public, horizon=2)
    core.start(0.0)
    with pytest.raises(ProtocolError):
        core.receive(envelope("c", good_body()), 0.0)  # not a neighbour of a
    with pytest.raises(ProtocolError):
        core.receive(envelope("b", good_body(), kind="admm.round"), 0.0)
    with pytest.raises(StaleRoundError):
        core.receive(envelope("b", good_body(3)), 0.0)


def test_a_late_round_is_re_sent_and_a_silent_neighbour_fails_the_session() -> None:
    # GIVEN a triangle where c never speaks
    scenario = triangle("[market.consensus]\nround_timeout_s = 2.0\nneighbour_timeout_s = 9.0\n")
    core = ConsensusPeer(scenario.peers["a"], scenario.public, horizon=1)
    first = core.start(0.0)
    assert [o.type for o in first] == [ROUND_TYPE]
    assert core.receive(envelope("b", good_body()), 0.5) == []  # still waiting for c
    # WHEN the round timeout passes THEN it re-publishes its round-1 message
    deadline = core.next_deadline()
    assert deadline == pytest.approx(2.0)
    assert core.on_timer(deadline) == first
    # AND after the neighbour timeout it fails, naming c only
    assert core.on_timer(9.0) == []
    assert core.failure is not None and "c" in core.failure and "b," not in core.failure
    assert core.done and core.next_deadline() is None


def test_a_peer_without_neighbours_settles_with_the_grid_at_once() -> None:
    scenario = parse_scenario(homes({"a": 4.0, "b": -1.0}, {"a": [], "b": []}))  # a needs ≥ 3 kWh
    core = ConsensusPeer(scenario.peers["a"], scenario.public, horizon=0)
    out = core.start(0.0)
    assert [o.type for o in out] == [REPORT_TYPE]
    assert core.outcome is not None and core.outcome.trades == {} and core.outcome.grid_import > 0
    assert core.outcome.cost == pytest.approx(core.outcome.grid_only_cost)


def test_status_telemetry_has_every_documented_field() -> None:
    scenario = triangle()
    cores = {pid: ConsensusPeer(scenario.peers[pid], scenario.public, horizon=1) for pid in "abc"}
    messages = {pid: core.start(0.0)[0] for pid, core in cores.items()}
    statuses = []
    for pid, core in cores.items():
        for other, message in messages.items():
            if other != pid:
                out = core.receive(envelope(other, dict(message.body)), 0.0)
                statuses += [o for o in out if o.channel == "telemetry"]
    assert len(statuses) == 3
    for status in statuses:
        assert status.type == STATUS_TYPE
        assert set(status.body) == {"k", "primal", "dual", "price_min", "price_max", "cost", "converged",
                                    "community_import", "traded"}  # fmt: skip
        assert status.body["price_min"] <= status.body["price_max"]


@pytest.mark.parametrize(
    ("spec", "grid", "prices", "expected"),
    [
        # household a = 0.2, d = 1: y*(p) = 1 − p/0.2 inside the tariff
        (PeerSpec("h", 0.2, -0.2, 0.1, 0.0, 2.0), (0.30, 0.08), (0.1, 0.1), (0.5, 0.5)),
        (PeerSpec("h", 0.2, -0.2, 0.1, 0.0, 2.0), (0.30, 0.08), (0.1, 0.2), (0.0, 0.5)),
        # at the buy price an importer may take any part from the grid instead
        (PeerSpec("h", 0.2, -0.2, 0.1, 0.0, 2.0), (0.30, 0.08), (0.30, 0.30), (0.0, 0.0)),
        (PeerSpec("h", 0.2, -0.4, 0.4, 0.0, 4.0), (0.30, 0.08), (0.30, 0.30), (0.0, 0.5)),
        # at the sell price an exporter may sell any part to the grid instead
        (PeerSpec("h", 0.2, 0.2, 0.1, -2.0, 0.0), (0.30, 0.08), (0.08, 0.08), (-1.4, 0.0)),
        # a linear cost at its marginal value: the whole range
        (PeerSpec("h", 0.0, -0.22, 0.0, 0.0, 3.0), None, (0.22, 0.22), (0.0, 3.0)),
        (PeerSpec("h", 0.0, -0.22, 0.0, 0.0, 3.0), None, (0.23, 0.25), (0.0, 0.0)),
        # roles clip the sign
        (PeerSpec("h", 0.2, -0.2, 0.1, -1.0, 2.0, "buyer"), None, (0.4, 0.4), (0.0, 0.0)),
        (PeerSpec("h", 0.2, -0.2, 0.1, -1.0, 2.0, "seller"), None, (0.1, 0.1), (0.0, 0.0)),
    ],
)
def test_position_range_is_the_set_of_best_responses(
    spec: PeerSpec, grid: tuple[float, float] | None, prices: tuple[float, float], expected: tuple[float, float]
) -> None:
    assert_allclose(position_range(spec, grid, *prices), expected, atol=1e-12)


@pytest.mark.parametrize(
    "settings",
    [
        {"step": 0.0},
        {"position_step": 1.5},
        {"eps_abs": -1.0},
        {"max_iterations": 0},
        {"step": True},  # bool is not a number
        {"rho": 1.0},  # an ADMM setting
        {"neighbour_timeout_s": -1.0},
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        validate_settings(settings)


def test_settings_come_from_the_scenario_table() -> None:
    scenario = parse_scenario(consensus(random_community(4, 0), "step = 0.05\nmax_iterations = 300"))
    core = ConsensusPeer(scenario.peers["h000"], scenario.public, horizon=1)
    assert core.settings == ConsensusSettings(step=0.05, max_iterations=300)


SMALL = parse_scenario(consensus(random_community(6, 3, degree=3)))

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
