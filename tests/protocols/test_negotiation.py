"""The negotiation market: end to end on the signed in-memory bus, and its core by hand.

End to end: seeded communities (``tests/communities.py``) and the shipped examples run
once each (cached) with N cores passing encoded, signed frames (``run_in_memory``);
the tests check the market's promises: both ends of every contract record the same
energy and price, no peer ends worse off than with the grid alone, prices stay within
the tariff, nobody both buys and sells, every peer terminates, and a silent or muted
peer does not stop the others. By hand: one core fed ``Envelope`` objects, for the
strict body checks and the request/grant bookkeeping.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattmesh.protocols import memory_bus
from wattmesh.protocols.admm import best_net_demand, standalone_cost
from wattmesh.protocols.errors import ProtocolError, ScenarioError, StaleRoundError
from wattmesh.protocols.mechanism import Outgoing, PeerOutcome, create_core
from wattmesh.protocols.memory_bus import BusResult, run_in_memory
from wattmesh.protocols.negotiation import (
    GRID_REQUIRED,
    REPORT_TYPE,
    ROUND_TYPE,
    STATUS_TYPE,
    NegotiationPeer,
    NegotiationSettings,
    validate_public,
)
from wattmesh.protocols.result import aggregate_reports
from wattmesh.protocols.scenario import PeerSpec, PublicScenario, Scenario, parse_scenario
from wattmesh.protocols.wire import Envelope

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUY, SELL = 0.30, 0.08  # the tariff of the hand-built communities below


def negotiation(text: str, settings: str = "") -> str:
    """A scenario text switched to ``mechanism = "negotiation"`` (with optional settings)."""
    text = text.replace('mechanism = "admm"', 'mechanism = "negotiation"')
    if settings:
        text = text.replace("[grid]", f"[market.negotiation]\n{settings}\n[grid]", 1)
    return text


CASES: dict[str, str] = {
    "n10-full-1": random_community(10, 1),
    "n10-full-2-fee": random_community(10, 2, fee=0.01),
    "n10-full-3-roles-pairfees": random_community(10, 3, roles=True, pair_fees=4, fee=0.002),
    "n50-sparse-1-roles-fee-pairfees": random_community(50, 1, degree=5, roles=True, fee=0.005, pair_fees=8),
    "example-ten-homes": (EXAMPLES / "ten-homes.toml").read_text(),
    "example-producers-consumers": (EXAMPLES / "producers-consumers.toml").read_text(),
}


def keys_for(scenario: Scenario) -> dict[str, Ed25519PrivateKey]:
    """Deterministic keys (signatures never change the arithmetic, only the bytes)."""
    return {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }


@functools.cache
def market(case: str) -> tuple[Scenario, BusResult]:
    """GIVEN the case's community, WHEN its negotiation runs on the signed in-memory bus (once)."""
    scenario = parse_scenario(negotiation(CASES[case]), source=case)
    return scenario, run_in_memory(scenario, keys_for(scenario))


def assert_contracts_balance(outcomes: Mapping[str, PeerOutcome]) -> None:
    """Both ends of every trade: the very same floats, energy with opposite sign."""
    for pid, outcome in outcomes.items():
        for other, (kwh, price) in outcome.trades.items():
            assert pid in outcomes[other].trades, (pid, other)
            their_kwh, their_price = outcomes[other].trades[pid]
            assert kwh == -their_kwh and price == their_price, (pid, other)


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("case", list(CASES))
def test_contracts_balance_at_both_ends(case: str) -> None:
    scenario, bus = market(case)
    # THEN buyer and seller record identical kWh (opposite sign) and identical price
    assert_contracts_balance(bus.outcomes)
    # AND what buyers pay, sellers receive
    assert abs(sum(o.payment for o in bus.outcomes.values())) <= 1e-9
    # AND the result document lists every trade and no dispute
    result = aggregate_reports(scenario.public, {p: o.to_body() for p, o in bus.outcomes.items()}, wall_seconds=1.0)
    assert result["disputes"] == [] and result["missing_peers"] == [] and result["converged"] is True
    assert len(result["trades"]) == sum(len(o.trades) for o in bus.outcomes.values()) // 2
    assert result["trades"], "a community with a grid spread and no trade at all"


@pytest.mark.parametrize("case", list(CASES))
def test_no_peer_ends_worse_off_than_with_the_grid_alone(case: str) -> None:
    scenario, bus = market(case)
    grid = scenario.public.grid
    assert grid is not None
    for pid, o in bus.outcomes.items():
        spec = scenario.peers[pid]
        # THEN its cost (flex, grid, payments, half the fees) is at most its grid-only cost
        assert o.grid_only_cost == standalone_cost(spec, (grid.buy_price, grid.sell_price))
        assert o.grid_only_cost is not None and o.cost <= o.grid_only_cost + 1e-9, (pid, o.cost, o.grid_only_cost)
        # AND the reported cost is exactly that sum, with the fee split in half
        fees = sum(0.5 * scenario.public.fee(pid, j) * abs(kwh) for j, (kwh, _) in o.trades.items())
        expected = spec.cost(o.net_demand) + grid.cost(o.grid_import) + o.payment + fees
        assert o.cost == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_prices_stay_within_the_tariff_and_nobody_both_buys_and_sells(case: str) -> None:
    scenario, bus = market(case)
    grid = scenario.public.grid
    assert grid is not None
    for pid, o in bus.outcomes.items():
        # THEN every price lies in [sell, buy]
        assert all(grid.sell_price <= price <= grid.buy_price for _, price in o.trades.values()), pid
        # AND a peer's trades all go one way, the way its role allows
        signs = {math.copysign(1.0, kwh) for kwh, _ in o.trades.values()}
        assert len(signs) <= 1, (pid, o.trades)
        role = scenario.peers[pid].role
        if role == "buyer":
            assert signs <= {1.0}
        elif role == "seller":
            assert signs <= {-1.0}


@pytest.mark.parametrize("case", list(CASES))
def test_every_peer_terminates_balanced_at_its_best_response(case: str) -> None:
    scenario, bus = market(case)
    grid = scenario.public.grid
    assert grid is not None
    # THEN every peer stopped by its own rules, before the round cap
    assert set(bus.outcomes) == set(scenario.public.peer_ids)
    assert all(o.converged and o.iterations < NegotiationSettings().max_rounds for o in bus.outcomes.values())
    # AND one round message per peer and round: no re-sends on a lossless bus
    assert bus.messages == sum(o.iterations for o in bus.outcomes.values())
    for pid, o in bus.outcomes.items():
        spec = scenario.peers[pid]
        # AND y = q + g with q the sum of its trades, y its best response to q, within limits
        assert o.community_import == pytest.approx(sum(kwh for kwh, _ in o.trades.values()), abs=1e-12)
        assert o.net_demand == pytest.approx(o.community_import + o.grid_import, abs=1e-12)
        assert o.net_demand == best_net_demand(spec, (grid.buy_price, grid.sell_price), o.community_import)
        assert spec.min_kwh <= o.net_demand <= spec.max_kwh


@pytest.mark.parametrize("case", list(CASES))
def test_the_community_captures_most_of_the_sharing_gain(case: str) -> None:
    from reference import social_optimum  # cvxpy: imported only where needed

    scenario, bus = market(case)
    cost = sum(o.cost for o in bus.outcomes.values())
    alone = sum(o.grid_only_cost or 0.0 for o in bus.outcomes.values())
    optimum = social_optimum(scenario).social_cost
    # THEN it lies between the optimum and the grid-only cost, well towards the optimum
    # (docs/mechanisms/negotiation.md measures 75–98 % on such communities)
    assert optimum - 1e-6 <= cost <= alone
    assert (alone - cost) >= 0.6 * (alone - optimum), (case, cost, alone, optimum)


def test_two_peers_meet_halfway_between_their_quotes() -> None:
    # GIVEN a solar farm (marginal cost 0.02, 4 kWh) and a bakery (marginal value 0.22,
    # 3 kWh), tariff 0.30 / 0.08, δ = 0.22 / 22 = 0.01 per round
    scenario = parse_scenario(
        negotiation(
            """
[community]
name = "pair"
[market]
mechanism = "admm"
[grid]
buy_price = 0.30
sell_price = 0.08
[[peers]]
id = "solar"
cost = { a = 0.0, b = -0.02 }
min = -4.0
max = 0.0
[[peers]]
id = "bakery"
cost = { a = 0.0, b = -0.22 }
min = 0.0
max = 3.0
""",
            "steps = 22",
        )
    )
    # WHEN they negotiate
    outcomes = run_in_memory(scenario, keys_for(scenario)).outcomes
    # THEN the bakery's bid (0.08 + 12δ in round 13) first meets the farm's round-12 ask
    # (0.30 − 11δ): it requests its whole 3 kWh at their midpoint, and the farm grants it
    kwh, price = outcomes["bakery"].trades["solar"]
    assert kwh == 3.0 and price == pytest.approx(0.195, abs=1e-12)
    assert outcomes["solar"].trades["bakery"] == (-3.0, price)
    # AND the bakery pays 3 × 0.195 instead of 3 × 0.30 to the grid; the farm earns
    # 0.195 instead of 0.08 on 3 kWh and sells its fourth kWh to the grid
    assert outcomes["bakery"].cost == pytest.approx(-0.66 + 3 * 0.195)
    assert outcomes["solar"].net_demand == -4.0 and outcomes["solar"].grid_import == -1.0
    assert outcomes["solar"].cost == pytest.approx(0.08 - 3 * 0.195 - 0.08)


def test_a_fee_is_covered_by_the_spread_and_split_in_half() -> None:
    # GIVEN the same pair of linear peers with a fee of 0.02 per kWh on their link
    scenario = parse_scenario(
        negotiation(
            """
[community]
name = "pair-fee"
[market]
mechanism = "admm"
fee = 0.02
[grid]
buy_price = 0.30
sell_price = 0.08
[[peers]]
id = "solar"
cost = { a = 0.0, b = -0.02 }
min = -4.0
max = 0.0
[[peers]]
id = "bakery"
cost = { a = 0.0, b = -0.22 }
min = 0.0
max = 3.0
""",
            "steps = 22",
        )
    )
    outcomes = run_in_memory(scenario, keys_for(scenario)).outcomes
    kwh, price = outcomes["bakery"].trades["solar"]
    # THEN they deal only once the bid covers ask + fee (0.08 + 13δ ≥ 0.30 − 12δ + 0.02)
    assert kwh == 3.0 and price == pytest.approx(0.5 * (0.21 + 0.18), abs=1e-12)
    # AND each side carries half the fee
    assert outcomes["bakery"].cost == pytest.approx(-0.66 + 3 * price + 3 * 0.01)
    assert outcomes["solar"].cost == pytest.approx(0.08 - 3 * price + 3 * 0.01 - 0.08)


# ---------------------------------------------------------------------- configuration
def test_without_a_grid_it_refuses_to_start_with_a_clear_message() -> None:
    # GIVEN a community with no [grid] table, WHEN its file is loaded,
    # THEN the scenario error names the file, the key and why (mechanism.check_scenario
    # creates every core once at load time and reports the core's ValueError)
    text = negotiation(random_community(4, 1, grid=False))
    with pytest.raises(ScenarioError) as excinfo:
        parse_scenario(text, source="no-grid.toml")
    assert str(excinfo.value) == f"no-grid.toml: market.mechanism: {GRID_REQUIRED}"
    # AND a core created from a grid-less public scenario raises that ValueError itself
    public = dataclasses.replace(parse_scenario(negotiation(random_community(4, 1))).public, grid=None)
    spec = parse_scenario(negotiation(random_community(4, 1))).peers["h000"]
    with pytest.raises(ValueError, match=r"needs a \[grid\] table"):
        create_core(spec, public, 1)
    with pytest.raises(ValueError, match=r"needs a \[grid\] table"):
        validate_public(public)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ("steps = 0", "steps must be >= 1"),
        ("patience = 0", "patience must be >= 1"),
        ("max_rounds = 0", "max_rounds must be >= 1"),
        ("min_trade_kwh = 0.0", "min_trade_kwh must be > 0"),
        ("round_timeout_s = -1", "round_timeout_s must be > 0"),
        ("steps = 2.5", "wrong type"),
        ("rho = 1.0", "unknown setting 'rho'"),
    ],
)
def test_bad_settings_are_scenario_errors(settings: str, reason: str) -> None:
    # GIVEN a [market.negotiation] table with a bad value, THEN the scenario is refused
    with pytest.raises(ScenarioError, match=reason) as excinfo:
        parse_scenario(negotiation(random_community(3, 1), settings), source="bad.toml")
    assert excinfo.value.key == "market.negotiation"


# ---------------------------------------------------------------------- silent peers
class SilentCore:
    """A peer that never starts: it sends nothing, ever. Its outcome is filled in only so
    that ``run_in_memory`` (which wants one per peer) returns; nobody reads it."""

    def __init__(self, spec: PeerSpec, public: PublicScenario) -> None:
        self.peer_id = spec.id
        self.neighbours = tuple(public.links[spec.id])
        self.outcome = PeerOutcome(spec.id, False, 0, 0.0, 0.0, 0.0, 0.0, 0.0, None, {})
        self.failure: str | None = None

    done = True
    linger_s = 0.0

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        return []

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        return []

    def on_timer(self, now: float) -> list[Outgoing]:
        return []

    def next_deadline(self) -> float | None:
        return None


class MutedCore:
    """A real core whose market messages from round ``from_round`` on are lost: it still
    hears everyone (a one-way partition), nobody hears it."""

    def __init__(self, core: NegotiationPeer, from_round: int) -> None:
        self.core = core
        self.from_round = from_round
        self.peer_id = core.peer_id
        self.neighbours = core.neighbours

    def _drop(self, out: list[Outgoing]) -> list[Outgoing]:
        return [o for o in out if o.channel != "market" or o.body["k"] < self.from_round]

    @property
    def outcome(self) -> PeerOutcome | None:
        return self.core.outcome

    @property
    def failure(self) -> str | None:
        return self.core.failure

    @property
    def done(self) -> bool:
        return self.core.done

    @property
    def linger_s(self) -> float:
        return self.core.linger_s

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        return self._drop(self.core.start(now, start_grace_s=start_grace_s))

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        return self._drop(self.core.receive(envelope, now))

    def on_timer(self, now: float) -> list[Outgoing]:
        return self._drop(self.core.on_timer(now))

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()


def run_with(monkeypatch: pytest.MonkeyPatch, scenario: Scenario, wrap: Any) -> BusResult:
    """run_in_memory (signed frames) with ``wrap(spec, public, core)`` deciding each peer's core."""

    def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> Any:
        return wrap(spec, public, create_core(spec, public, horizon))

    monkeypatch.setattr(memory_bus, "create_core", create)
    return run_in_memory(scenario, keys_for(scenario))


def test_a_peer_that_never_starts_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a community in which h003 never sends anything
    scenario = parse_scenario(negotiation(random_community(8, 2)))

    def wrap(spec: PeerSpec, public: PublicScenario, core: Any) -> Any:
        return SilentCore(spec, public) if spec.id == "h003" else core

    # WHEN the others negotiate (virtual clock: round 1 waits neighbour_timeout_s for it)
    bus = run_with(monkeypatch, scenario, wrap)
    others = {pid: o for pid, o in bus.outcomes.items() if pid != "h003"}
    # THEN every other peer finishes, nobody trades with the silent one
    assert all(o.converged for o in others.values())
    assert all("h003" not in o.trades for o in others.values())
    # AND the rest is a normal market: balanced contracts, nobody worse off, trades made
    assert_contracts_balance(others)
    assert all(o.grid_only_cost is not None and o.cost <= o.grid_only_cost + 1e-9 for o in others.values())
    assert any(o.trades for o in others.values())


@pytest.mark.parametrize(
    ("who", "from_round", "cancels"),
    [("h001", 2, False), ("h001", 14, False), ("h003", 13, True), ("h003", 19, True)],  # h001 buys, h003 sells
)
def test_a_peer_muted_mid_session_agrees_with_everyone_on_its_deals(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, who: str, from_round: int, cancels: bool
) -> None:
    # GIVEN a community in which one peer's messages are lost from round `from_round` on,
    # before or while deals are being made (the first ones conclude in round 13)
    scenario = parse_scenario(negotiation(random_community(10, 1)))
    muted: dict[str, MutedCore] = {}

    def wrap(spec: PeerSpec, public: PublicScenario, core: Any) -> Any:
        if spec.id != who:
            return core
        muted[spec.id] = MutedCore(core, from_round)
        return muted[spec.id]

    # WHEN they negotiate
    caplog.set_level("INFO", logger="wattmesh.protocols.negotiation")
    bus = run_with(monkeypatch, scenario, wrap)
    # THEN everyone finishes, including the muted peer (it reads the others' gone-notices)
    assert set(bus.outcomes) == set(scenario.public.peer_ids)
    # AND every deal, the muted peer's included, is recorded identically at both ends:
    # its grants that nobody saw were cancelled, requests to it released
    assert_contracts_balance(bus.outcomes)
    assert all(o.grid_only_cost is not None and o.cost <= o.grid_only_cost + 1e-9 for o in bus.outcomes.values())
    result = aggregate_reports(scenario.public, {p: o.to_body() for p, o in bus.outcomes.items()}, wall_seconds=1.0)
    assert result["disputes"] == []
    # AND it traded only on messages its neighbours heard; the seller waited for the
    # notices before finishing, so it could cancel the grants they never saw
    assert all(d.round <= from_round - (d.kwh < 0) for d in muted[who].core.deals)
    assert ("cancelled" in caplog.text) == cancels
    assert "one-sided" not in caplog.text


# ---------------------------------------------------------------------- the core by hand
def trio(settings: str = "") -> Scenario:
    """a (a buyer household), b and c (sellers), everyone linked, fee 0.002 on every link."""
    lines = [
        '[community]\nname = "trio"', '[market]\nmechanism = "negotiation"\nfee = 0.002',
        f"[market.negotiation]\n{settings}", f"[grid]\nbuy_price = {BUY}\nsell_price = {SELL}",
        '[[peers]]\nid = "a"\ndemand = 2.0\nflex = 1.0\nflex_cost = 0.1\nrole = "buyer"',
        '[[peers]]\nid = "b"\ndemand = -2.0\nflex = 1.0\nflex_cost = 0.1\nrole = "seller"',
        '[[peers]]\nid = "c"\ndemand = -1.0\nflex = 1.0\nflex_cost = 0.1',
    ]  # fmt: skip
    return parse_scenario("\n".join(lines) + "\n", source="trio")


def body(k: int = 1, **changes: Any) -> dict[str, Any]:
    """A valid round body (a seller's quote), with changes."""
    base: dict[str, Any] = {
        "k": k, "side": "sell", "price": BUY, "qty": 1.0, "req": {}, "grant": {}, "done": False, "gone": {},
    }  # fmt: skip
    base.update(changes)
    return base


_seq: dict[str, int] = {}


def envelope(sender: str, content: Mapping[str, Any], type_: str = ROUND_TYPE) -> Envelope:
    _seq[sender] = _seq.get(sender, 0) + 1
    return Envelope(type_, sender, "trio", "hand", _seq[sender], 0, content)


@functools.cache
def core_of_scenario(settings: str) -> Scenario:
    return trio(settings)


def core_of(pid: str, settings: str = "") -> NegotiationPeer:
    scenario = core_of_scenario(settings)
    return NegotiationPeer(scenario.peers[pid], scenario.public, 1)


def market_messages(out: list[Outgoing]) -> list[Outgoing]:
    return [o for o in out if o.channel == "market"]


def test_round_one_quotes_and_telemetry() -> None:
    # GIVEN buyer a, WHEN it starts
    out = core_of("a").start(0.0)
    (message,) = market_messages(out)
    # THEN its round-1 message bids the grid sell price for what it wants at that price:
    # y*(p) = 2 − p/0.1 on [1, 3], so 1.2 kWh at 0.08
    assert message.type == ROUND_TYPE
    assert message.body == {
        "k": 1, "side": "buy", "price": SELL, "qty": pytest.approx(2.0 - SELL / 0.1), "req": {}, "grant": {},
        "done": False, "gone": {},
    }  # fmt: skip
    # AND it publishes the status every monitor reads
    (status,) = [o for o in out if o.channel == "telemetry"]
    assert status.type == STATUS_TYPE
    assert set(status.body) == {
        "k", "primal", "dual", "price_min", "price_max", "cost", "converged", "community_import", "traded",
    }  # fmt: skip


def test_request_grant_and_deal_bookkeeping() -> None:
    # GIVEN buyer a after round 1, and seller b quoting an ask a can meet
    a = core_of("a")
    a.start(0.0)
    a.receive(envelope("b", body(1, price=SELL, qty=2.0)), 0.0)
    (message,) = market_messages(a.receive(envelope("c", body(1, side="none", qty=0.0, price=0.19)), 0.0))
    # THEN in round 2 it requests from b at the midpoint of its bid and b's ask
    bid = message.body["price"]
    kwh, price = message.body["req"]["b"]
    assert message.body["k"] == 2 and price == 0.5 * (bid + SELL) and kwh > 0
    # AND round 2 passes with the request in flight: reserved, so the bid is capped at the
    # marginal value at the reserved position, mv = −C'(kWh), and a further request only
    # adds what is still worth buying at the new, lower midpoint
    a.receive(envelope("b", body(2, price=SELL, qty=2.0)), 0.0)
    (message,) = market_messages(a.receive(envelope("c", body(2, side="none", qty=0.0, price=0.19)), 0.0))
    assert message.body["k"] == 3 and message.body["price"] == pytest.approx(-0.1 * (kwh - 2.0))
    more, at = message.body["req"]["b"]
    assert at == 0.5 * (message.body["price"] + SELL) and more == pytest.approx(2.0 - (at + 0.001) / 0.1 - kwh)
    # WHEN b answers in round 3 with more than requested, or at another price: refused
    with pytest.raises(ProtocolError, match="answers no request"):
        a.receive(envelope("b", body(3, grant={"a": [kwh + 0.1, price]})), 0.0)
    with pytest.raises(ProtocolError, match="answers no request"):
        a.receive(envelope("b", body(3, grant={"a": [kwh, price + 0.01]})), 0.0)
    # AND c cannot grant what was never asked of it
    with pytest.raises(ProtocolError, match="answers no request"):
        a.receive(envelope("c", body(3, grant={"a": [0.5, price]})), 0.0)
    # WHEN b grants part of it, THEN that part is a deal at exactly the request's floats
    a.receive(envelope("b", body(3, grant={"a": [0.5 * kwh, price]})), 0.0)
    a.receive(envelope("c", body(3, side="none", qty=0.0, price=0.19)), 0.0)
    assert [(d.counterparty, d.kwh, d.price, d.round) for d in a.deals] == [("b", 0.5 * kwh, price, 3)]


def test_a_seller_grants_in_order_of_net_price_within_its_quantity() -> None:
    # GIVEN seller b at round 2, with requests from a (higher price) and c (lower)
    b = core_of("b")
    b.start(0.0)
    b.receive(envelope("a", body(1, side="buy", price=SELL)), 0.0)
    b.receive(envelope("c", body(1, side="buy", price=SELL)), 0.0)
    b.receive(envelope("a", body(2, side="buy", price=0.25, req={"b": [2.5, 0.25]})), 0.0)
    (message,) = market_messages(b.receive(envelope("c", body(2, side="buy", price=0.2, req={"b": [2.5, 0.2]})), 0.0))
    # THEN a is served first, in full; c gets what is left of b's export at c's price
    # (S(p) = max(0, −y*(p)), y*(p) = −2 − p/0.1 clipped to [−3, −1])
    grants = message.body["grant"]
    assert grants["a"] == [2.5, 0.25]
    room_c = min(3.0, 2.0 + (0.2 - 0.001) / 0.1) - 2.5
    assert grants["c"] == [pytest.approx(room_c), 0.2]
    assert [d.kwh for d in b.deals] == [-2.5, -grants["c"][0]]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ({"k": 1}, "keys must be exactly"),
        (body(extra=1), "keys must be exactly"),
        (body(k=0), "k must be"),
        (body(k=True), "k must be"),
        (body(k=1.0), "k must be"),
        (body(side="hold"), "side must be"),
        (body(side=["sell"]), "side must be"),
        (body(price=0.31), "price must be"),
        (body(price=math.nan), "price must be"),
        (body(price="0.2"), "price must be"),
        (body(qty=-1.0), "qty must be"),
        (body(qty=math.inf), "qty must be"),
        (body(qty=10**400), "qty must be"),
        (body(k=2**64), "k must be"),
        (body(done=1), "done must be"),
        (body(req=[]), "req must be a map"),
        (body(side="buy", req={"x": [1.0, 0.2]}), "not a neighbour"),
        (body(side="buy", req={"a": [1.0]}), r"\[kWh, price\]"),
        (body(side="buy", req={"a": (1.0, 0.2)}), r"\[kWh, price\]"),
        (body(side="buy", req={"a": [0.0, 0.2]}), "kWh > 0"),
        (body(side="buy", req={"a": [1.0, 0.5]}), "within the grid tariff"),
        (body(side="buy", req={"a": [True, 0.2]}), r"\[kWh, price\]"),
        (body(side="sell", req={"a": [1.0, 0.2]}), "only a buyer"),
        (body(side="buy", done=True, req={"a": [1.0, 0.2]}), "only a buyer that is not done"),
        (body(side="buy", grant={"a": [1.0, 0.2]}), "only a seller grants"),
        (body(k=2, gone={"a": 2}), "gone maps"),
        (body(k=2, gone={"a": 0}), "gone maps"),
        (body(k=2, gone={"zz": 1}), "gone maps"),
        (body(gone=[]), "gone must be a map"),
    ],
)
def test_malformed_bodies_raise_protocol_error(content: dict[str, Any], why: str) -> None:
    # GIVEN peer b, WHEN c sends it a malformed round body, THEN ProtocolError, state untouched
    b = core_of("b")
    b.start(0.0)
    with pytest.raises(ProtocolError, match=why):
        b.receive(envelope("c", content), 0.0)
    assert b.round == 1 and not b.deals


def test_wrong_type_stranger_and_far_future_are_refused() -> None:
    b = core_of("b")
    b.start(0.0)
    with pytest.raises(ProtocolError, match="unexpected message type"):
        b.receive(envelope("c", body(), type_="admm.round"), 0.0)
    with pytest.raises(StaleRoundError):
        b.receive(envelope("c", body(3)), 0.0)
    lone = parse_scenario(negotiation(random_community(3, 1, degree=0)))
    stranger = NegotiationPeer(lone.peers["h000"], lone.public, 1)
    with pytest.raises(ProtocolError, match="not my neighbour"):
        stranger.receive(Envelope(ROUND_TYPE, "h001", "test", "hand", 1, 0, body()), 0.0)


def test_a_peer_without_neighbours_settles_with_the_grid_at_once() -> None:
    # GIVEN a peer nobody is linked to, WHEN it starts
    lone = parse_scenario(negotiation(random_community(3, 1, degree=0)))
    core = NegotiationPeer(lone.peers["h000"], lone.public, 1)
    out = core.start(0.0)
    # THEN it reports its grid-only outcome and sends no market message
    assert core.done and [o.type for o in out] == [REPORT_TYPE]
    assert core.outcome is not None and core.outcome.trades == {}
    assert core.outcome.cost == pytest.approx(core.outcome.grid_only_cost)


def test_repeats_are_ignored_and_an_old_round_is_answered_by_a_resend() -> None:
    # GIVEN b in round 2 (round 1 of a and c received)
    b = core_of("b", "round_timeout_s = 2.0")
    b.start(0.0)
    first = envelope("a", body(1, side="buy", price=SELL))
    b.receive(first, 0.0)
    b.receive(envelope("c", body(1, side="buy", price=SELL)), 0.0)
    assert b.round == 2
    # WHEN a's round-2 message comes twice, THEN the repeat changes nothing
    b.receive(envelope("a", body(2, side="buy", price=SELL)), 1.0)
    assert b.receive(envelope("a", body(2, side="buy", price=SELL)), 1.0) == []
    # WHEN c re-sends round 1 (it waits for someone), THEN b re-sends its last two rounds, once
    again = b.receive(envelope("c", body(1, side="buy", price=SELL)), 1.5)
    assert [o.body["k"] for o in again] == [1, 2]
    assert b.receive(envelope("c", body(1, side="buy", price=SELL)), 1.6) == []


def test_a_silent_neighbour_is_resent_to_then_given_up_on() -> None:
    # GIVEN a in round 1, with b's message in but c silent
    a = core_of("a", "round_timeout_s = 2.0\nneighbour_timeout_s = 9.0")
    a.start(0.0)
    a.receive(envelope("b", body(1, price=0.25)), 0.0)
    # WHEN time passes, THEN it re-sends with backoff (2 s, then 4 s later) ...
    assert a.next_deadline() == 2.0
    assert [o.body["k"] for o in a.on_timer(2.0)] == [1]
    assert a.next_deadline() == 6.0
    a.on_timer(6.0)
    # ... and at neighbour_timeout_s gives c up: round 2 goes out with a gone-notice
    assert a.next_deadline() == 9.0
    (message,) = market_messages(a.on_timer(9.0))
    assert message.body["k"] == 2 and message.body["gone"] == {"c": 1}
    # AND c's late messages are ignored from then on; b alone is waited for
    assert a.receive(envelope("c", body(1)), 9.5) == []
    assert market_messages(a.receive(envelope("b", body(2, price=0.25)), 9.5))[0].body["k"] == 3


def test_a_gone_notice_cancels_the_grants_it_never_saw() -> None:
    # GIVEN seller b that granted a's round-2 request in its round-3 message
    b = core_of("b")
    b.start(0.0)
    for k, req in ((1, {}), (2, {"b": [1.0, 0.25]})):
        b.receive(envelope("a", body(k, side="buy", price=0.25 if k > 1 else SELL, req=req)), 0.0)
        b.receive(envelope("c", body(k, side="none", price=0.19, qty=0.0)), 0.0)
    assert [d.kwh for d in b.deals] == [-1.0] and b.round == 3
    # WHEN a, after its round-3 message, says it gave b up at round 3 (it never saw b's
    # round-3 message, which carried the grant)
    b.receive(envelope("a", body(3, side="buy", price=0.25)), 0.0)
    b.receive(envelope("a", body(4, side="buy", price=0.25, gone={"b": 3})), 0.0)
    # THEN b cancels that grant and no longer waits for a
    assert b.deals == []
    (message,) = market_messages(b.receive(envelope("c", body(3, side="none", price=0.19, qty=0.0)), 0.0))
    assert message.body["k"] == 4


def test_buyers_spread_over_equally_priced_sellers() -> None:
    # GIVEN buyers x and y, each seeing four sellers quote the same ask
    lines = [
        '[community]\nname = "spread"',
        '[market]\nmechanism = "negotiation"',
        f"[grid]\nbuy_price = {BUY}\nsell_price = {SELL}",
    ]
    for pid, demand, role in [("x", 3.0, "buyer"), ("y", 3.0, "buyer")] + [(f"s{i}", -2.0, "seller") for i in range(4)]:
        lines.append(f'[[peers]]\nid = "{pid}"\ndemand = {demand}\nflex = 0.5\nflex_cost = 0.1\nrole = "{role}"')
    scenario = parse_scenario("\n".join(lines) + "\n", source="spread")
    sellers = [f"s{i}" for i in range(4)]
    first_choice = {}
    for buyer, other in (("x", "y"), ("y", "x")):
        core = NegotiationPeer(scenario.peers[buyer], scenario.public, 1)
        core.start(0.0)
        core.receive(Envelope(ROUND_TYPE, other, "spread", "hand", 1, 0, body(1, side="buy", price=SELL)), 0.0)
        out: list[Outgoing] = []
        for seq, s in enumerate(sellers, start=2):
            out = core.receive(Envelope(ROUND_TYPE, s, "spread", "hand", seq, 0, body(1, price=SELL, qty=0.5)), 0.0)
        # WHEN it requests in round 2, THEN it asks the sellers in its own fixed
        # pseudo-random order (crc32 of "buyer|seller"), not by id
        (message,) = market_messages(out)
        order = sorted(sellers, key=lambda s, b=buyer: zlib.crc32(f"{b}|{s}".encode()))
        assert list(message.body["req"]) == order[: len(message.body["req"])]
        first_choice[buyer] = order[0]
    # AND so two buyers facing the same asks do not all queue at the same seller
    assert first_choice["x"] != first_choice["y"]


def test_a_seller_waits_while_a_bid_covers_its_ask_and_then_stops() -> None:
    # GIVEN seller b (floor = the grid sell price), buyer a bidding 0.25 without ever
    # requesting from b, and c not trading
    b = core_of("b")
    out = b.start(0.0)
    for k in range(1, 36):
        b.receive(envelope("a", body(k, side="buy", price=0.25)), 0.0)
        out = b.receive(envelope("c", body(k, side="none", price=0.19, qty=0.0)), 0.0)
    # THEN long after its ask reached its floor (round 21) it has not given up
    (message,) = market_messages(out)
    assert message.body["price"] == SELL and message.body["done"] is False
    # WHEN a's bid no longer covers b's ask plus the fee, THEN b stops within patience rounds
    for k in range(36, 36 + NegotiationSettings().patience + 1):
        b.receive(envelope("a", body(k, side="buy", price=SELL)), 0.0)
        out = b.receive(envelope("c", body(k, side="none", price=0.19, qty=0.0)), 0.0)
        if market_messages(out)[0].body["done"]:
            break
    assert market_messages(out)[0].body["done"] is True


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_bodies = st.dictionaries(
    st.sampled_from(["k", "side", "price", "qty", "req", "grant", "done", "gone", "extra"]), _values, max_size=9
) | st.fixed_dictionaries(
    {
        "k": st.integers(0, 3), "side": st.sampled_from(["buy", "sell", "none", "x"]),
        "price": st.floats(0.0, 0.4), "qty": st.floats(-1.0, 5.0), "req": _values, "grant": _values,
        "done": st.booleans(), "gone": _values,
    }
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=_bodies)
def test_any_body_is_accepted_or_refused_never_a_crash(content: dict[str, Any]) -> None:
    # GIVEN peer b in round 1, WHEN anything arrives from c, THEN it is taken or refused
    b = core_of("b")
    b.start(0.0)
    try:
        out = b.receive(envelope("c", content), 0.0)
    except ProtocolError:
        return
    assert isinstance(out, list)
