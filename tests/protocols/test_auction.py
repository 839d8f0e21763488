"""The uniform-price double auction end to end on the in-memory bus.

Every community runs once (cached) with N cores passing encoded, signed frames; the
tests then check what the peers reported: one identical book and clearing everywhere,
the clearing against an independent Walrasian computation from the signed order
frames themselves, budget balance, individual rationality, and the social-cost gap to
the central optimum (reported, not required to be 0). Misbehaviour is injected by
wrapping one peer's core: an equivocating order, lost orders, a silent peer.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import msgpack
import pytest
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import social_optimum

from wattmesh.protocols import auction, memory_bus
from wattmesh.protocols.demand import demand_bounds
from wattmesh.protocols.errors import ProtocolError, ScenarioError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import Outgoing
from wattmesh.protocols.memory_bus import BusResult, run_in_memory
from wattmesh.protocols.result import aggregate_reports
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.wire import Envelope, Verifier

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Relative social-cost gap allowed before a test calls it a regression. Measured: below
# 0.15 % on the random communities; 0.85 % on producers-consumers, whose 0.02 pair fee the
# optimum avoids by relaying through a flexible peer (2 × 0.005), which an auction of net
# positions cannot do.
GAP_GUARD = 0.015


def as_auction(text: str) -> str:
    assert 'mechanism = "admm"' in text
    return text.replace('mechanism = "admm"', 'mechanism = "auction"')


CASES: dict[str, str] = {
    "n5-grid": as_auction(random_community(5, 1)),
    "n12-grid-fee": as_auction(random_community(12, 2, fee=0.01)),
    "n16-grid-pairfees": as_auction(random_community(16, 5, fee=0.01, pair_fees=6)),
    "n24-grid-roles-fee": as_auction(random_community(24, 4, roles=True, fee=0.005)),
    "example-ten-homes": as_auction((EXAMPLES / "ten-homes.toml").read_text()),
    "example-producers-consumers": as_auction((EXAMPLES / "producers-consumers.toml").read_text()),
}


def keys_for(scenario: Scenario) -> dict[str, Ed25519PrivateKey]:
    return {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    bus: BusResult
    cores: dict[str, Any]  # peer id -> the core (wrapped or not)
    frames: list[tuple[str, bytes]]  # every (sender, signed frame) the bus carried


Wrap = Callable[[auction.AuctionPeer], Any]


@contextmanager
def _instrumented(wraps: Mapping[str, Wrap]) -> Iterator[tuple[dict[str, Any], list[tuple[str, bytes]]]]:
    """Record every core and every signed frame; replace some cores by wrappers."""
    cores: dict[str, Any] = {}
    frames: list[tuple[str, bytes]] = []
    real_create, real_encode = auction.create, memory_bus.encode

    def create(spec: Any, public: Any, horizon: int) -> Any:
        core = real_create(spec, public, horizon)
        cores[spec.id] = wraps[spec.id](core) if spec.id in wraps else core
        return cores[spec.id]

    def encode(envelope: Envelope, key: Ed25519PrivateKey) -> bytes:
        frame = real_encode(envelope, key)
        frames.append((envelope.sender, frame))
        return frame

    with mock.patch.object(auction, "create", create), mock.patch.object(memory_bus, "encode", encode):
        yield cores, frames


def run(scenario: Scenario, wraps: Mapping[str, Wrap] | None = None) -> Run:
    with _instrumented(wraps or {}) as (cores, frames):
        bus = run_in_memory(scenario, keys_for(scenario))
    return Run(scenario, bus, cores, frames)


@functools.cache
def market(case: str) -> Run:
    """GIVEN the case's community, WHEN its auction runs on the in-memory bus (once)."""
    return run(parse_scenario(CASES[case], source=case))


def verified(run_: Run) -> list[Envelope]:
    """Every frame, checked against the senders' public keys by a fresh verifier."""
    public = run_.scenario.public
    keys = keys_for(run_.scenario)
    roster = Roster({pid: keys[pid].public_key() for pid in public.peer_ids})
    verifier = Verifier(roster, public.name, None)
    return [verifier.verify(frame) for _, frame in run_.frames]


def order_identity(body: Mapping[str, Any]) -> bytes:
    """docs/mechanisms/auction.md: SHA-256 over a domain prefix and msgpack [[bids], [asks]] of floats."""
    canonical = [[[float(p), float(q)] for p, q in body["bids"]], [[float(p), float(q)] for p, q in body["asks"]]]
    return hashlib.sha256(b"wattmesh/auction/order\x00" + msgpack.packb(canonical)).digest()


@dataclass(frozen=True)
class Walras:
    price: float
    volume: float
    net: dict[str, float]  # peer -> net fill, buyers positive


def walrasian_clearing(book: Mapping[str, Mapping[str, Any]]) -> Walras:
    """The uniform-price clearing computed the plain way, independent of the core.

    A price p is competitive when some volume lies both in the demand range
    [Σ bids > p, Σ bids ≥ p] and the supply range [Σ asks < p, Σ asks ≤ p]. The
    competitive prices of step curves form an interval whose ends are order prices;
    the rule takes its midpoint, fills everything strictly in the money and shares the
    rest pro rata among the blocks priced exactly at p*.
    """
    bids = [(float(p), float(q), s) for s, body in book.items() for p, q in body["bids"]]
    asks = [(float(p), float(q), s) for s, body in book.items() for p, q in body["asks"]]

    def ranges(p: float) -> tuple[float, float, float, float]:
        d_strict = sum(q for b, q, _ in bids if b > p)
        s_strict = sum(q for a, q, _ in asks if a < p)
        return (d_strict, d_strict + sum(q for b, q, _ in bids if b == p),
                s_strict, s_strict + sum(q for a, q, _ in asks if a == p))  # fmt: skip

    levels = sorted({p for p, _, _ in bids + asks})
    candidates = levels + [(x + y) / 2 for x, y in itertools.pairwise(levels)]
    competitive = [p for p in candidates if (r := ranges(p))[0] <= r[3] + 1e-9 and r[2] <= r[1] + 1e-9]
    price = (min(competitive) + max(competitive)) / 2
    d_strict, d_all, s_strict, s_all = ranges(price)
    volume = min(d_all, s_all)
    net: dict[str, float] = {}
    for p, q, s in bids:
        share = 1.0 if p > price else ((volume - d_strict) / (d_all - d_strict) if p == price else 0.0)
        net[s] = net.get(s, 0.0) + q * share
    for p, q, s in asks:
        share = 1.0 if p < price else ((volume - s_strict) / (s_all - s_strict) if p == price else 0.0)
        net[s] = net.get(s, 0.0) - q * share
    return Walras(price, volume, net)


def signed_orders(run_: Run, senders: set[str] | None = None) -> dict[str, Mapping[str, Any]]:
    """The order each sender signed (the last one of each, when it signed several)."""
    return {
        e.sender: e.body
        for e in verified(run_)
        if e.type == auction.ORDER_TYPE and (senders is None or e.sender in senders)
    }


# ---------------------------------------------------------------- honest markets


@pytest.mark.parametrize("case", list(CASES))
def test_every_peer_clears_the_same_book_the_same_way(case: str) -> None:
    r = market(case)
    cores = list(r.cores.values())
    # THEN all peers agreed on the book in the first digest round, with nobody excluded
    assert all(o.converged and o.iterations == 1 for o in r.bus.outcomes.values())
    assert all(c.excluded == set() and c.equivocations == {} for c in cores)
    reference = cores[0]
    assert set(reference.book) == set(r.scenario.public.peer_ids)
    for core in cores[1:]:
        # AND every peer holds the very same orders and computed the very same clearing
        assert core.book == reference.book
        assert core.clearing == reference.clearing
    # AND the bus carried one order and one (hash-only) digest per peer: no re-sends
    assert r.bus.messages == 2 * len(cores)


@pytest.mark.parametrize("case", list(CASES))
def test_clearing_matches_an_independent_walrasian_computation(case: str) -> None:
    r = market(case)
    # GIVEN the orders as the peers signed them on the wire (not as any core parsed them)
    orders = signed_orders(r)
    assert set(orders) == set(r.scenario.public.peer_ids)
    # WHEN the uniform-price clearing is computed the plain way
    expected = walrasian_clearing(orders)
    clearing = next(iter(r.cores.values())).clearing
    # THEN the price and volume are the same, and so is every peer's net position
    assert clearing.price == pytest.approx(expected.price, abs=1e-12)
    assert clearing.volume == pytest.approx(expected.volume, abs=1e-9)
    assert expected.volume > 0  # every case trades something
    for pid, outcome in r.bus.outcomes.items():
        assert outcome.community_import == pytest.approx(expected.net.get(pid, 0.0), abs=1e-9), pid
        # AND every trade of a peer is at that one price
        assert all(price == clearing.price for _, price in outcome.trades.values())


@pytest.mark.parametrize("case", list(CASES))
def test_budget_balance_and_reciprocal_trades(case: str) -> None:
    r = market(case)
    outcomes = r.bus.outcomes
    # THEN payments cancel and each trade is reported exactly opposite by both ends
    assert abs(sum(o.payment for o in outcomes.values())) <= 1e-12
    for pid, outcome in outcomes.items():
        for other, (kwh, price) in outcome.trades.items():
            assert outcomes[other].trades[pid] == (-kwh, price)
            # AND no trade breaks a role (a buyer never exports, a seller never imports)
            role = r.scenario.peers[pid].role
            assert not (role == "buyer" and kwh < 0) and not (role == "seller" and kwh > 0), (pid, other, kwh)
    # AND the result document lists every trade and no dispute
    result = aggregate_reports(r.scenario.public, {p: o.to_body() for p, o in outcomes.items()}, wall_seconds=0.0)
    assert result["disputes"] == [] and result["missing_peers"] == [] and result["converged"] is True
    assert len(result["trades"]) == sum(len(o.trades) for o in outcomes.values()) // 2


@pytest.mark.parametrize("case", list(CASES))
def test_no_peer_is_worse_off_than_with_the_grid_alone(case: str) -> None:
    r = market(case)
    # THEN every peer's reported cost is at most its grid-only cost (individual rationality)
    for pid, o in r.bus.outcomes.items():
        assert o.grid_only_cost is not None
        assert o.cost <= o.grid_only_cost + 1e-9, (pid, o.cost, o.grid_only_cost)
    # AND the community as a whole gains
    total = sum(o.cost for o in r.bus.outcomes.values())
    assert total < sum(o.grid_only_cost for o in r.bus.outcomes.values())


@pytest.mark.parametrize("case", list(CASES))
def test_each_peer_is_balanced_within_its_limits(case: str) -> None:
    r = market(case)
    for pid, o in r.bus.outcomes.items():
        spec = r.scenario.peers[pid]
        # THEN y = q + g, q is the sum of its trades, y within its limits
        assert o.net_demand == pytest.approx(o.community_import + o.grid_import, abs=1e-12)
        assert o.community_import == pytest.approx(sum(kwh for kwh, _ in o.trades.values()), abs=1e-12)
        assert spec.min_kwh - 1e-12 <= o.net_demand <= spec.max_kwh + 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_social_cost_gap_to_the_central_optimum_is_reported(case: str, record_property: Any) -> None:
    r = market(case)
    optimum = social_optimum(r.scenario).social_cost
    reported = sum(o.cost for o in r.bus.outcomes.values())
    gap = (reported - optimum) / max(abs(optimum), 1.0)
    record_property("social_cost_gap", gap)
    # THEN no mechanism beats the optimum (an accounting error would), and the loss from
    # step orders and fee shading stays small
    assert gap >= -1e-7, (reported, optimum)
    assert gap <= GAP_GUARD, (case, gap)


def test_telemetry_reports_each_round_with_finite_figures() -> None:
    # GIVEN a fresh core of a five-peer auction, driven by hand
    scenario = parse_scenario(CASES["n5-grid"])
    public = scenario.public
    cores = {pid: auction.create(scenario.peers[pid], public, 1) for pid in public.peer_ids}
    envelopes: list[Envelope] = []
    status: list[Outgoing] = []
    seq = 0

    def post(sender: str, items: list[Outgoing]) -> None:
        nonlocal seq
        for item in items:
            if item.channel == "market":
                seq += 1
                envelopes.append(Envelope(item.type, sender, public.name, "s", seq, 0, item.body))
            elif item.channel == "telemetry" and sender == "h000":
                status.append(item)

    for pid, core in cores.items():
        post(pid, core.start(0.0))
    while envelopes:
        envelope = envelopes.pop(0)
        for pid, core in cores.items():
            if pid != envelope.sender:
                post(pid, core.receive(envelope, 0.0))
    # THEN h000 published one status for its one round, with every documented key, finite
    assert [s.type for s in status] == [auction.STATUS_TYPE]
    body = status[0].body
    assert set(body) == {"k", "primal", "dual", "price_min", "price_max", "cost", "converged",
                         "community_import", "traded"}  # fmt: skip
    assert body["k"] == 1 and body["converged"] is True and body["primal"] == 0.0
    assert all(math.isfinite(v) for v in body.values() if isinstance(v, float))
    assert body["price_min"] <= cores["h000"].clearing.price <= body["price_max"]
    assert body["cost"] == cores["h000"].outcome.cost


# ---------------------------------------------------------------- misbehaviour


class Equivocator:
    """Wraps an honest core; its order goes out as two different signed orders."""

    def __init__(self, core: auction.AuctionPeer, *, split: bool) -> None:
        self.core = core
        self.split = split  # True: A to half the peers, B to the rest; False: both to all
        self.other = auction.Order(core.order.bids, ((core._sell, 50.0),))  # dumps 50 kWh at the floor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        out = [o for o in self.core.start(now, start_grace_s=start_grace_s) if o.type != auction.ORDER_TYPE]
        a, b = self.core.order.to_body(), self.other.to_body()
        if not self.split:
            return [Outgoing("market", auction.ORDER_TYPE, a), Outgoing("market", auction.ORDER_TYPE, b), *out]
        peers = self.core.neighbours
        half = len(peers) // 2
        return [
            *(Outgoing("inbox", auction.ORDER_TYPE, a, to=p) for p in peers[:half]),
            *(Outgoing("inbox", auction.ORDER_TYPE, b, to=p) for p in peers[half:]),
            *out,
        ]


def test_an_order_signed_twice_differently_is_caught_by_the_digests_and_excluded() -> None:
    # GIVEN eight peers, one of which (h003) signs order A for half the peers and a
    # different order B for the others: no single honest peer sees both
    scenario = parse_scenario(as_auction(random_community(8, 11, fee=0.004)))
    r = run(scenario, {"h003": lambda core: Equivocator(core, split=True)})
    honest = {pid: c for pid, c in r.cores.items() if pid != "h003"}
    signed = [e for e in verified(r) if e.type == auction.ORDER_TYPE and e.sender == "h003"]
    # THEN the two signed frames of h003 carry two different orders
    identities = sorted({order_identity(e.body) for e in signed})
    assert len(identities) == 2
    for core in honest.values():
        # AND every honest peer learned of both from the round-1 mismatch and the round-2
        # identity lists, and excluded h003
        assert core.equivocations == {"h003": tuple(identities)}
        assert core.excluded == {"h003"}
        # AND the identity it holds itself is the one in the frame h003 signed for it,
        # filed under that frame's sequence number: the signed frames are the evidence
        ((held_id, held_seq),) = core.evidence["h003"].items()
        frame = next(e for e in signed if e.seq == held_seq)
        assert order_identity(frame.body) == held_id
    # AND all honest peers clear the same book, without h003, on the same round
    books = [c.book for c in honest.values()]
    assert all(b == books[0] for b in books) and "h003" not in books[0]
    assert {o.iterations for o in r.bus.outcomes.values()} == {2}
    assert all(o.converged for o in r.bus.outcomes.values())
    # AND h003 trades with nobody, nobody trades with it
    assert r.bus.outcomes["h003"].trades == {}
    assert all("h003" not in o.trades for o in r.bus.outcomes.values())
    # AND the clearing is the independent one on the honest peers' signed orders
    expected = walrasian_clearing(signed_orders(r, set(honest)))
    for pid, core in honest.items():
        assert core.clearing.price == pytest.approx(expected.price, abs=1e-12)
        assert r.bus.outcomes[pid].community_import == pytest.approx(expected.net.get(pid, 0.0), abs=1e-9)


def test_two_orders_broadcast_to_everyone_are_caught_and_excluded() -> None:
    # GIVEN h000 (the first to start) publishing two different orders to everyone
    scenario = parse_scenario(as_auction(random_community(6, 12)))
    r = run(scenario, {"h000": lambda core: Equivocator(core, split=False)})
    for pid, core in r.cores.items():
        if pid != "h000":
            # THEN every honest peer holds both signed orders itself before its digest
            assert len(core.evidence["h000"]) == 2
            # AND after the identity lists of round 2 (h000's own digest names only one)
            # everyone excludes h000
            assert core.excluded == {"h000"} and len(core.equivocations["h000"]) == 2
    assert {o.iterations for o in r.bus.outcomes.values()} == {2}
    assert r.bus.outcomes["h000"].trades == {}
    books = [c.book for pid, c in r.cores.items() if pid != "h000"]
    assert all(b == books[0] for b in books) and "h000" not in books[0]


def test_a_second_order_after_the_digests_is_ignored_consistently() -> None:
    # GIVEN h005, the last to start, publishing a second order that reaches every peer
    # only after each has sent its digest
    scenario = parse_scenario(as_auction(random_community(6, 12)))
    r = run(scenario, {"h005": lambda core: Equivocator(core, split=False)})
    first = r.cores["h005"].order
    for pid, core in r.cores.items():
        if pid == "h005":
            continue
        # THEN the digests agreed on the first order: it stands and h005 trades on it
        assert core.book["h005"] == first and core.excluded == set()
        # AND the peer kept the late second order as evidence only
        assert len(core.evidence["h005"]) == 2
    books = [c.book for c in r.cores.values()]
    assert all(b == books[0] for b in books)


class DropOrders:
    """Wraps an honest core; drops the first `count` orders that arrive from `victim`."""

    def __init__(self, core: auction.AuctionPeer, victim: str, count: int) -> None:
        self.core, self.victim, self.count = core, victim, count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        if envelope.sender == self.victim and envelope.type == auction.ORDER_TYPE and self.count > 0:
            self.count -= 1
            return []
        return self.core.receive(envelope, now)


def test_a_lost_order_is_published_again_and_the_book_is_the_same() -> None:
    # GIVEN h001 losing the first order of h004
    text = as_auction(random_community(7, 13))
    r = run(parse_scenario(text), {"h001": lambda core: DropOrders(core, "h004", 1)})
    lossless = run(parse_scenario(text))
    # THEN h001 sent its digest after round_timeout_s without it, the digests differed,
    # h004's order reached it again, and round 2 agreed on the full book
    assert {o.iterations for o in r.bus.outcomes.values()} == {2}
    assert all(o.converged for o in r.bus.outcomes.values())
    # AND the outcome is exactly that of the lossless run
    reference = next(iter(lossless.cores.values()))
    for core in r.cores.values():
        assert core.book == reference.book and core.clearing == reference.clearing


def test_an_order_some_peer_never_gets_is_left_out_by_everyone() -> None:
    # GIVEN h001 losing every order of h004
    scenario = parse_scenario(as_auction(random_community(7, 13)))
    r = run(scenario, {"h001": lambda core: DropOrders(core, "h004", 10**6)})
    # THEN after digest_rounds rounds every peer clears on the orders all hold: without h004
    rounds = auction.AuctionSettings().digest_rounds
    assert {o.iterations for o in r.bus.outcomes.values()} == {rounds}
    books = [c.book for c in r.cores.values() if c.book is not None]
    assert len(books) == 7 and all(b == books[0] for b in books) and "h004" not in books[0]
    # AND the reports say so: not converged, h004 without trades, no dispute
    assert not any(o.converged for o in r.bus.outcomes.values())
    assert r.bus.outcomes["h004"].trades == {}
    result = aggregate_reports(scenario.public, {p: o.to_body() for p, o in r.bus.outcomes.items()}, wall_seconds=0.0)
    assert result["disputes"] == []


class Silent:
    """A peer that never says anything."""

    def __init__(self, core: auction.AuctionPeer) -> None:
        self.peer_id, self.neighbours = core.peer_id, core.neighbours
        self.outcome = self.failure = None
        self.done, self.linger_s = False, 0.0

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        return []

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        return []

    def on_timer(self, now: float) -> list[Outgoing]:
        return []

    def next_deadline(self) -> None:
        return None


def test_a_silent_peer_fails_the_session_by_name() -> None:
    # GIVEN h002 never sending its order or digest
    scenario = parse_scenario(as_auction(random_community(5, 14)))
    # THEN every other peer fails after neighbour_timeout_s, naming h002
    with pytest.raises(RuntimeError, match="cores failed") as caught:
        run(scenario, {"h002": Silent})
    message = str(caught.value)
    for pid in ("h000", "h001", "h003", "h004"):
        assert f"'{pid}': 'no round-1 auction.digest from h002 within 30 s'" in message


# ---------------------------------------------------------------- strict input


@functools.cache
def _small() -> Scenario:
    return parse_scenario(CASES["n5-grid"])


def _core() -> auction.AuctionPeer:
    scenario = _small()
    return auction.create(scenario.peers["h000"], scenario.public, 1)


def _envelope(type_: str, body: Mapping[str, Any], sender: str = "h001") -> Envelope:
    return Envelope(type_, sender, "test", "s", 1, 0, body)


GOOD_ORDER = {"bids": [[0.25, 1.0]], "asks": [[0.1, 2.0]]}
JUNK: list[tuple[str, Mapping[str, Any]]] = [
    (auction.ORDER_TYPE, {}),
    (auction.ORDER_TYPE, {**GOOD_ORDER, "to": "h000"}),  # unknown key
    (auction.ORDER_TYPE, {"bids": "x", "asks": []}),
    (auction.ORDER_TYPE, {"bids": [[0.25]], "asks": []}),
    (auction.ORDER_TYPE, {"bids": [[True, 1.0]], "asks": []}),
    (auction.ORDER_TYPE, {"bids": [[0.31, 1.0]], "asks": []}),  # above the tariff
    (auction.ORDER_TYPE, {"bids": [[0.2, 0.0]], "asks": []}),  # empty block
    (auction.ORDER_TYPE, {"bids": [[0.2, -1.0]], "asks": []}),
    (auction.ORDER_TYPE, {"bids": [[0.2, 1e12]], "asks": []}),
    (auction.ORDER_TYPE, {"bids": [[0.2, 1.0], [0.2, 1.0]], "asks": []}),  # not strictly falling
    (auction.ORDER_TYPE, {"bids": [], "asks": [[0.2, 1.0], [0.1, 1.0]]}),  # asks falling
    (auction.ORDER_TYPE, {"bids": [[0.1, 1.0]] * 40, "asks": []}),  # more blocks than steps + 1
    (auction.DIGEST_TYPE, {"k": 1}),
    (auction.DIGEST_TYPE, {"k": 1, "digest": b"short"}),
    (auction.DIGEST_TYPE, {"k": True, "digest": bytes(32)}),
    (auction.DIGEST_TYPE, {"k": 0, "digest": bytes(32)}),
    (auction.DIGEST_TYPE, {"k": 99, "digest": bytes(32)}),  # beyond digest_rounds
    (auction.DIGEST_TYPE, {"k": 1, "digest": bytes(32), "held": {}}),  # round 1 carries no list
    (auction.DIGEST_TYPE, {"k": 2, "digest": bytes(32)}),  # later rounds must
    (auction.DIGEST_TYPE, {"k": 2, "digest": bytes(32), "held": {"nobody": [bytes(32)]}}),
    (auction.DIGEST_TYPE, {"k": 2, "digest": bytes(32), "held": {"h001": [bytes(32)] * 2}}),  # not increasing
    (auction.DIGEST_TYPE, {"k": 2, "digest": bytes(32), "held": {"h001": [bytes(31)]}}),
    (auction.DIGEST_TYPE, {"k": 2, "digest": bytes(32), "held": {"h001": [bytes(32)]}}),  # hash mismatch
    ("admm.round", {"k": 1}),
]


@pytest.mark.parametrize(("type_", "body"), JUNK)
def test_malformed_messages_are_refused_with_a_protocol_error(type_: str, body: Mapping[str, Any]) -> None:
    # GIVEN a started core; WHEN junk arrives; THEN a ProtocolError, and the core carries on
    core = _core()
    core.start(0.0)
    with pytest.raises(ProtocolError):
        core.receive(_envelope(type_, body), 0.0)
    assert not core.done and core.failure is None


def test_a_sender_outside_the_community_and_a_far_future_digest_are_refused() -> None:
    core = _core()
    core.start(0.0)
    with pytest.raises(ProtocolError):
        core.receive(_envelope(auction.ORDER_TYPE, GOOD_ORDER, sender="h000"), 0.0)  # itself
    with pytest.raises(ProtocolError, match="stale_round"):
        held = {"h001": (bytes(32),)}
        body = {"k": 3, "digest": auction.digest_of(held), "held": {"h001": [bytes(32)]}}
        core.receive(_envelope(auction.DIGEST_TYPE, body), 0.0)
    # AND a valid order is taken
    assert core.receive(_envelope(auction.ORDER_TYPE, GOOD_ORDER), 0.0) == []


_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.binary(max_size=40), st.text(max_size=5))  # fmt: skip
_value = st.one_of(
    _scalar,
    st.lists(st.one_of(_scalar, st.lists(_scalar, max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.one_of(_scalar, st.lists(_scalar, max_size=3)), max_size=3),
)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([auction.ORDER_TYPE, auction.DIGEST_TYPE]),
       st.dictionaries(st.sampled_from(["k", "digest", "held", "bids", "asks", "x"]), _value, max_size=4))  # fmt: skip
def test_any_body_is_either_taken_or_refused_never_a_crash(type_: str, body: dict[str, Any]) -> None:
    core = _core()
    core.start(0.0)
    try:
        out = core.receive(_envelope(type_, body), 0.0)
    except ProtocolError:
        return
    assert isinstance(out, list)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ("steps = 0", "steps"),
        ("steps = 1.5", "wrong type"),
        ("digest_rounds = 1", "digest_rounds"),
        ("round_timeout_s = 0", "round_timeout_s"),
        ("colour = 1", "unknown setting"),
    ],
)
def test_bad_settings_are_scenario_errors(table: str, reason: str) -> None:
    text = CASES["n5-grid"].replace("[grid]", f"[market.auction]\n{table}\n[grid]", 1)
    with pytest.raises(ScenarioError, match=reason) as caught:
        parse_scenario(text, source="x.toml")
    assert caught.value.key == "market.auction"


def test_the_auction_needs_a_grid_and_a_complete_community() -> None:
    # GIVEN a community without a grid: the tariff band that bounds orders is missing
    # THEN loading the scenario already says so (the cores check it when created)
    with pytest.raises(ScenarioError, match="market.mechanism: .*needs a \\[grid\\]"):
        parse_scenario(as_auction(random_community(4, 1, grid=False)))
    # GIVEN neighbour lists: one community-wide book cannot respect them
    with pytest.raises(ScenarioError, match="market.mechanism: .*not linked"):
        parse_scenario(as_auction(random_community(8, 1, degree=2)))


def test_orders_stay_within_the_band_and_below_true_demand() -> None:
    # GIVEN every peer of two communities and a half fee
    for case in ("n24-grid-roles-fee", "example-producers-consumers"):
        scenario = parse_scenario(CASES[case])
        grid = scenario.public.grid
        for spec in scenario.peers.values():
            order = auction.build_order(spec, grid.buy_price, grid.sell_price, 0.005, 16)
            # THEN it parses under the receivers' strict rules
            assert (
                auction.Order.from_body(order.to_body(), sell=grid.sell_price, buy=grid.buy_price, max_blocks=17)
                == order
            )
            # AND at every price its demand never exceeds what the peer would really buy
            for price in [grid.sell_price + i * (grid.buy_price - grid.sell_price) / 50 for i in range(51)]:
                bid = sum(q for p, q in order.bids if p >= price)
                ask = sum(q for p, q in order.asks if p <= price)
                most_bought = demand_bounds(spec, price + 0.005)[1]
                least_kept = demand_bounds(spec, price - 0.005)[0]
                assert bid <= max(most_bought, 0.0) + 1e-9, (spec.id, price)
                assert ask <= max(-least_kept, 0.0) + 1e-9, (spec.id, price)
                assert spec.role != "buyer" or ask == 0.0
                assert spec.role != "seller" or bid == 0.0


_price = st.sampled_from([0.08, 0.1, 0.12, 0.15, 0.2, 0.22, 0.25, 0.3])  # few levels: ties and exact crossings
_block = st.tuples(_price, st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]))


def _side(descending: bool) -> st.SearchStrategy[tuple[tuple[float, float], ...]]:
    return st.lists(_block, max_size=3, unique_by=lambda b: b[0]).map(
        lambda blocks: tuple(sorted(blocks, reverse=descending))
    )


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]),
                       st.tuples(_side(True), _side(False)), min_size=2))  # fmt: skip
def test_clear_book_matches_the_walrasian_rule_on_any_book(orders: dict[str, Any]) -> None:
    # GIVEN any small book with tied prices, exact crossings and one-sided peers
    book = {s: auction.Order(bids, asks) for s, (bids, asks) in orders.items()}
    clearing = auction.clear_book(book, 0.08, 0.3)
    if clearing.volume == 0.0:
        # THEN with no crossing nothing trades
        bids = [p for o in book.values() for p, _ in o.bids]
        asks = [p for o in book.values() for p, _ in o.asks]
        assert not bids or not asks or max(bids) < min(asks)
        assert clearing.trades == ()
        return
    # THEN price, volume and every net fill are those of the plain computation
    expected = walrasian_clearing({s: o.to_body() for s, o in book.items()})
    assert clearing.price == pytest.approx(expected.price, abs=1e-12)
    assert clearing.volume == pytest.approx(expected.volume, abs=1e-9)
    for s in book:
        assert clearing.fills.get(s, 0.0) == pytest.approx(expected.net.get(s, 0.0), abs=1e-9)
    # AND the trades realise exactly those fills
    traded: dict[str, float] = {}
    for buyer, seller, kwh in clearing.trades:
        assert kwh > 0 and buyer != seller
        traded[buyer] = traded.get(buyer, 0.0) + kwh
        traded[seller] = traded.get(seller, 0.0) - kwh
    for s in book:
        assert traded.get(s, 0.0) == pytest.approx(clearing.fills.get(s, 0.0), abs=1e-9)
