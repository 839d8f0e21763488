"""The ADMM state machine (``AdmmPeer``) driven by hand with Envelope objects.

No wire, no bus: a tiny network below hands each published round message to the
sender's neighbours through one FIFO channel per (sender, receiver) pair — the
ordering MQTT gives per topic — and the tests choose which channel delivers next,
when time passes, and which message is lost or duplicated.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattmesh.protocols.admm import ROUND_TYPE, STATUS_TYPE, AdmmPeer, AdmmSettings, Outgoing, PeerOutcome
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope

ROUND_TIMEOUT = 2.0  # [s]; the tests that move the clock set both explicitly (TIMING)
NEIGHBOUR_TIMEOUT = 30.0
TIMING = f"round_timeout_s = {ROUND_TIMEOUT}\nneighbour_timeout_s = {NEIGHBOUR_TIMEOUT}"
assert AdmmSettings().neighbour_timeout_s > AdmmSettings().round_timeout_s  # the defaults keep that order


def community(*, neighbours: Mapping[str, list[str]] | None = None, admm: str = "") -> Scenario:
    """Four households a, b, c, d with a grid; full topology unless ``neighbours``."""
    homes = {"a": (2.0, 0.2), "b": (-1.5, 0.1), "c": (0.5, 0.3), "d": (-2.5, 0.15)}
    lines = ['[community]\nname = "core-test"', '[market]\nmechanism = "admm"\nfee = 0.002']
    if admm:
        lines.append(f"[market.admm]\n{admm}")
    lines.append("[grid]\nbuy_price = 0.30\nsell_price = 0.08")
    for pid, (demand, flex_cost) in homes.items():
        if neighbours is not None and pid not in neighbours:
            continue
        lines.append(f'[[peers]]\nid = "{pid}"\ndemand = {demand}\nflex = 1.5\nflex_cost = {flex_cost}')
        if neighbours is not None:
            lines.append("neighbors = [" + ", ".join(f'"{o}"' for o in neighbours[pid]) + "]")
    return parse_scenario("\n".join(lines) + "\n", source="core-test")


def triangle(admm: str = "") -> Scenario:
    return community(neighbours={"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}, admm=admm)


def line() -> Scenario:
    """a – b – c: a and c are not neighbours (diameter 2)."""
    return community(neighbours={"a": ["b"], "b": ["a", "c"], "c": ["b"]})


def ring_with_chord() -> Scenario:
    """a – b – c – d – a plus a – c (diameter 2, votes need two hops)."""
    return community(neighbours={"a": ["b", "c", "d"], "b": ["a", "c"], "c": ["a", "b", "d"], "d": ["a", "c"]})


class Network:
    """N cores, one FIFO channel per (sender, receiver), a clock the test moves."""

    def __init__(self, scenario: Scenario) -> None:
        self.public = scenario.public
        horizon = diameter(self.public.links)
        self.cores = {pid: AdmmPeer(scenario.peers[pid], self.public, horizon) for pid in self.public.peer_ids}
        self.channels: dict[tuple[str, str], deque[Envelope]] = {
            (s, r): deque() for s in self.public.peer_ids for r in self.public.links[s]
        }
        self.order: deque[tuple[str, str]] = deque()  # publication order, for FIFO runs
        self.seq: Counter[str] = Counter()
        self.published: Counter[str] = Counter()
        self.last: dict[str, Outgoing] = {}
        self.now = 0.0

    def envelope(self, sender: str, body: Mapping[str, Any], type: str = ROUND_TYPE) -> Envelope:
        self.seq[sender] += 1
        return Envelope(type, sender, self.public.name, "session-1", self.seq[sender], 0, body)

    def publish(self, sender: str, items: list[Outgoing]) -> None:
        for item in items:
            if item.channel != "market":  # report and telemetry go to observers
                assert (item.channel, item.type) in {("report", "admm.report"), ("telemetry", STATUS_TYPE)}
                continue
            self.published[sender] += 1
            self.last[sender] = item
            envelope = self.envelope(sender, item.body)
            for receiver in self.public.links[sender]:
                self.channels[(sender, receiver)].append(envelope)
                self.order.append((sender, receiver))

    def start(self) -> Network:
        for pid, core in self.cores.items():
            self.publish(pid, core.start(self.now))
        return self

    def deliver(self, sender: str, receiver: str) -> list[Outgoing]:
        """Hand the oldest message on sender → receiver over; publish the answer."""
        envelope = self.channels[(sender, receiver)].popleft()
        self.order.remove((sender, receiver))
        out = self.cores[receiver].receive(envelope, self.now)
        self.publish(receiver, out)
        return out

    def drop(self, sender: str, receiver: str) -> None:
        self.channels[(sender, receiver)].popleft()
        self.order.remove((sender, receiver))

    def pending(self) -> list[tuple[str, str]]:
        return [key for key, queue in self.channels.items() if queue]

    def run_fifo(self) -> None:
        while self.order:
            self.deliver(*self.order[0])

    def run_random(self, rng: random.Random) -> None:
        while pending := self.pending():
            self.deliver(*rng.choice(pending))

    def tick(self, now: float) -> None:
        """Move the clock and fire every core's timer that is due."""
        self.now = now
        for pid, core in self.cores.items():
            deadline = core.next_deadline()
            if deadline is not None and deadline <= now:
                self.publish(pid, core.on_timer(now))

    def outcomes(self) -> dict[str, PeerOutcome]:
        assert all(core.outcome is not None for core in self.cores.values()), "not finished"
        return {pid: core.outcome for pid, core in self.cores.items() if core.outcome is not None}


def fifo_outcome(scenario: Scenario) -> dict[str, PeerOutcome]:
    net = Network(scenario).start()
    net.run_fifo()
    return net.outcomes()


def round_body(
    k: int, trade_for: Mapping[str, float], *, v0: int = 1, votes: list[bool] | None = None
) -> dict[str, Any]:
    return {"k": k, "t": dict(trade_for), "v0": v0, "votes": votes or []}


# ---------------------------------------------------------------- lifecycle


def test_start_returns_one_round_one_message() -> None:
    # GIVEN peer a of a triangle
    net = Network(triangle())
    # WHEN it starts
    out = net.cores["a"].start(0.0)
    # THEN it publishes exactly one market message: round 1, a trade for each neighbour
    assert len(out) == 1
    message = out[0]
    assert (message.channel, message.type) == ("market", ROUND_TYPE)
    assert message.body["k"] == 1 and message.body["v0"] == 1 and message.body["votes"] == []
    assert set(message.body["t"]) == {"b", "c"}
    assert net.cores["a"].round == 1
    # AND starting twice is a lifecycle error
    with pytest.raises(RuntimeError):
        net.cores["a"].start(0.0)


def test_a_peer_without_neighbours_settles_with_the_grid_at_start() -> None:
    # GIVEN a household that lists no one it may trade with
    scenario = community(neighbours={"a": ["b"], "b": ["a"], "c": []})
    core = AdmmPeer(scenario.peers["c"], scenario.public, horizon=1)
    # WHEN it starts, THEN it reports at once, having bought only from the grid
    out = core.start(0.0)
    assert [o.channel for o in out] == ["report"]
    assert core.outcome is not None and core.outcome.converged and core.outcome.trades == {}
    assert core.outcome.cost == pytest.approx(core.outcome.grid_only_cost)
    assert core.next_deadline() is None


# ---------------------------------------------------------------- refusals


def test_a_round_two_ahead_is_refused_as_stale() -> None:
    # GIVEN a started peer a at round 1
    net = Network(triangle()).start()
    a = net.cores["a"]
    # WHEN b's round-2 message arrives, THEN it is kept for later (one ahead is legal)
    assert a.receive(net.envelope("b", round_body(2, {"a": 0.1})), 0.0) == []
    # WHEN a round-3 message arrives, THEN it is refused: an honest peer is never two ahead
    with pytest.raises(StaleRoundError) as caught:
        a.receive(net.envelope("c", round_body(3, {"a": 0.1})), 0.0)
    assert caught.value.round == 3 and caught.value.peer_id == "c"


def test_a_non_neighbour_is_refused() -> None:
    # GIVEN the line a – b – c
    net = Network(line()).start()
    # WHEN c (a roster member, but not a's neighbour) sends a a round message
    with pytest.raises(ProtocolError) as caught:
        net.cores["a"].receive(net.envelope("c", round_body(1, {"a": 0.5})), 0.0)
    # THEN it is refused, naming c
    assert type(caught.value) is ProtocolError and caught.value.peer_id == "c"


def test_a_wrong_message_type_is_refused() -> None:
    net = Network(triangle()).start()
    # WHEN b sends a well-formed body under another type
    with pytest.raises(ProtocolError) as caught:
        net.cores["a"].receive(net.envelope("b", round_body(1, {"a": 0.5}), type="admm.report"), 0.0)
    # THEN it is refused
    assert type(caught.value) is ProtocolError and "type" in str(caught.value)


MALFORMED: dict[str, dict[str, Any]] = {
    "no k": {"t": {"a": 0.1}, "v0": 1, "votes": []},
    "k zero": round_body(0, {"a": 0.1}),
    "k bool": {"k": True, "t": {"a": 0.1}, "v0": 1, "votes": []},
    "k float": {"k": 1.0, "t": {"a": 0.1}, "v0": 1, "votes": []},
    "t a list": {"k": 1, "t": [0.1], "v0": 1, "votes": []},
    "no trade for me": round_body(1, {"c": 0.1}),
    "trade a string": round_body(1, {"a": "0.1"}),  # type: ignore[dict-item]
    "trade bool": round_body(1, {"a": True}),
    "votes not a list": {"k": 1, "t": {"a": 0.1}, "v0": 1, "votes": True},
    "vote not bool": round_body(1, {"a": 0.1}, votes=[1]),  # type: ignore[list-item]
    "no v0": {"k": 1, "t": {"a": 0.1}, "votes": []},
    "v0 bool": {"k": 1, "t": {"a": 0.1}, "v0": False, "votes": []},
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_body_is_refused_and_changes_nothing(name: str) -> None:
    # GIVEN a triangle that has started
    net = Network(triangle()).start()
    # WHEN a receives a malformed round body from neighbour b
    with pytest.raises(ProtocolError) as caught:
        net.cores["a"].receive(net.envelope("b", MALFORMED[name]), 0.0)
    # THEN it is refused as malformed, naming b
    assert type(caught.value) is ProtocolError and caught.value.peer_id == "b"
    assert "malformed" in str(caught.value)
    # AND the market still ends exactly as if it had never arrived
    net.run_fifo()
    assert net.outcomes() == fifo_outcome(triangle())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.dictionaries(
        st.sampled_from(["k", "t", "v0", "votes", "x"]),
        st.one_of(
            st.integers(-3, 4), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=3), st.lists(st.one_of(st.booleans(), st.integers(0, 2)), max_size=4),
            st.dictionaries(
                st.sampled_from(["a", "b", "c"]),
                st.one_of(st.floats(-5, 5), st.booleans(), st.text(max_size=2)), max_size=3,
            ),
        ),
    )
)  # fmt: skip
def test_any_body_is_taken_or_refused_explicitly(body: dict[str, Any]) -> None:
    # GIVEN a started peer; WHEN any body arrives from a neighbour
    net = Network(triangle()).start()
    try:
        out = net.cores["a"].receive(net.envelope("b", body), 0.0)
    except ProtocolError:
        return  # THEN either an explicit refusal ...
    assert isinstance(out, list) and all(isinstance(o, Outgoing) for o in out)  # ... or a transition


# ---------------------------------------------------------------- late and lost messages


def test_an_older_round_again_is_taken_as_still_waiting_and_answered() -> None:
    # GIVEN a triangle where a has completed round 1 and published round 2
    net = Network(triangle(TIMING)).start()
    b_round1 = net.last["b"].body
    net.deliver("b", "a")
    net.deliver("c", "a")
    a = net.cores["a"]
    assert a.round == 2
    a_round2 = net.last["a"]
    # WHEN b's round-1 message arrives again (b re-publishes: it is still waiting)
    out = a.receive(net.envelope("b", b_round1), 1.0)
    # THEN a re-publishes its last two round messages, rounds 1 and 2, unchanged
    assert [o.body["k"] for o in out] == [1, 2]
    assert out[1] == a_round2
    # AND further nudges are answered at most once per half re-send interval, which
    # doubles with every re-send until the next progress (no re-send storm)
    assert a.receive(net.envelope("b", b_round1), 1.0 + ROUND_TIMEOUT - 0.01) == []
    assert len(a.receive(net.envelope("b", b_round1), 1.0 + ROUND_TIMEOUT)) == 2
    assert a.receive(net.envelope("b", b_round1), 3.0 + 2 * ROUND_TIMEOUT - 0.01) == []
    assert len(a.receive(net.envelope("b", b_round1), 3.0 + 2 * ROUND_TIMEOUT)) == 2
    # WHEN b reaches round 2 and a receives b's round 2 twice
    net.deliver("a", "b")
    net.deliver("c", "b")
    assert net.cores["b"].round == 2
    b_round2 = net.channels[("b", "a")][0].body
    assert b_round2["k"] == 2
    net.deliver("b", "a")
    out = a.receive(net.envelope("b", b_round2), 7.0 + 4 * ROUND_TIMEOUT)
    # THEN the repeat of a round a already holds is ignored: b waits for someone, not
    # necessarily a, and a's own timer re-sends if a's message was the one lost
    assert out == []
    assert a.round == 2
    # AND none of this changed the market's result
    net.run_fifo()
    assert net.outcomes() == fifo_outcome(triangle())


def test_round_timeout_republishes_then_a_silent_neighbour_is_excluded_at_the_neighbour_timeout() -> None:
    # GIVEN a triangle where a started at t = 0 and hears from b but never from c
    net = Network(triangle(TIMING)).start()
    a = net.cores["a"]
    net.deliver("b", "a")
    # THEN its next deadline is one round timeout after its last progress
    assert a.next_deadline() == pytest.approx(ROUND_TIMEOUT)
    # WHEN the timer fires early, nothing happens
    assert a.on_timer(ROUND_TIMEOUT - 0.1) == []
    # WHEN it fires after the round timeout, a re-publishes its round-1 message
    out = a.on_timer(ROUND_TIMEOUT)
    assert [o.body["k"] for o in out] == [1]
    # AND each further re-send waits twice as long as the one before: 2, 6, 14 s
    assert a.next_deadline() == pytest.approx(ROUND_TIMEOUT + 2 * ROUND_TIMEOUT)
    assert len(a.on_timer(3 * ROUND_TIMEOUT)) == 1
    assert a.next_deadline() == pytest.approx(3 * ROUND_TIMEOUT + 4 * ROUND_TIMEOUT)
    assert a.on_timer(7 * ROUND_TIMEOUT - 0.1) == []
    assert len(a.on_timer(7 * ROUND_TIMEOUT)) == 1
    # ... until the neighbour timeout, which the backoff never postpones
    assert a.next_deadline() == pytest.approx(NEIGHBOUR_TIMEOUT)
    assert not a.done
    # WHEN the neighbour timeout passes without a word from c, whose presence says offline
    a.neighbours_offline({"c"})
    out = a.on_timer(NEIGHBOUR_TIMEOUT)
    # THEN a excludes c (and only c) and completes round 1 with b alone
    # (tests/protocols/test_admm_gone_peer.py runs whole markets through this)
    assert a.excluded == {"c"} and a.failure is None and a.round == 2
    assert [o.body["k"] for o in out if o.channel == "market"] == [2]
    assert set(out[-1].body["t"]) == {"b", "c"} and out[-1].body["t"]["c"] == 0.0


def test_progress_resets_the_resend_backoff() -> None:
    # GIVEN a triangle where a, missing c's round 1, has re-sent twice (at 2 s and 6 s)
    net = Network(triangle(TIMING)).start()
    a = net.cores["a"]
    net.deliver("b", "a")
    assert len(a.on_timer(ROUND_TIMEOUT)) == 1 and len(a.on_timer(3 * ROUND_TIMEOUT)) == 1
    # WHEN c's round 1 arrives at 7 s and a completes the round
    net.now = 7.0
    net.deliver("c", "a")
    assert a.round == 2
    # THEN its next re-send is again one round timeout after that progress
    assert a.next_deadline() == pytest.approx(7.0 + ROUND_TIMEOUT)


def test_a_lost_message_is_recovered_by_the_round_timeout() -> None:
    # GIVEN a triangle where b's round-3 message to c is lost in transit
    reference = fifo_outcome(triangle())
    net = Network(triangle(TIMING)).start()
    lost = False
    while net.order:
        sender, receiver = net.order[0]
        if not lost and (sender, receiver) == ("b", "c") and net.channels[("b", "c")][0].body["k"] == 3:
            net.drop("b", "c")
            lost = True
            continue
        net.deliver(sender, receiver)
    assert lost and not any(core.done for core in net.cores.values())  # stuck without it
    # WHEN the round timeout passes (b, waiting for c's round 3, re-publishes)
    net.tick(net.now + ROUND_TIMEOUT)
    net.run_fifo()
    # THEN the market completes with exactly the result of a loss-free run
    assert net.outcomes() == reference


def test_late_message_within_the_window_gives_the_in_order_result() -> None:
    # GIVEN a triangle in which b completes round 1 before c's round 1 reaches a
    net = Network(triangle()).start()
    net.deliver("a", "b")
    net.deliver("c", "b")  # b has all of round 1: it publishes round 2
    assert net.cores["b"].round == 2
    net.deliver("b", "a")  # b's round 1 to a
    net.deliver("b", "a")  # WHEN b's round 2 reaches a before c's round 1
    a = net.cores["a"]
    assert a.round == 1  # a keeps it for later
    net.deliver("c", "a")  # c's round 1 arrives late: a completes round 1
    assert a.round == 2
    # THEN the market ends exactly as with in-order delivery
    net.run_fifo()
    assert net.outcomes() == fifo_outcome(triangle())


def test_max_iterations_stops_everyone_unconverged_on_the_same_round() -> None:
    # GIVEN an unreachable tolerance and a cap of 7 rounds
    scenario = community(admm="eps_rel = 1e-15\neps_abs = 0.0\nmax_iterations = 7")
    # WHEN the market runs
    outcomes = fifo_outcome(scenario)
    # THEN every peer stops at round 7 and says it did not converge
    assert {o.iterations for o in outcomes.values()} == {7}
    assert not any(o.converged for o in outcomes.values())
    # AND the (unconverged) trades still agree at both ends
    for pid, o in outcomes.items():
        for other, (kwh, price) in o.trades.items():
            assert outcomes[other].trades[pid] == (-kwh, price)


@pytest.mark.parametrize(
    "make", [triangle, line, ring_with_chord, community], ids=["triangle", "line", "ring-chord", "full-4"]
)
def test_fifo_run_converges_with_one_message_per_round(make: Any) -> None:
    # GIVEN a small community; WHEN it runs with FIFO delivery
    net = Network(make()).start()
    net.run_fifo()
    outcomes = net.outcomes()
    # THEN all converge on one round, having published one round message per round
    rounds = {o.iterations for o in outcomes.values()}
    assert len(rounds) == 1 and all(o.converged for o in outcomes.values())
    assert all(net.published[pid] == rounds.copy().pop() for pid in outcomes)
    # AND afterwards no core wants a timer, and an old message is answered with a re-send
    assert all(core.next_deadline() is None for core in net.cores.values())
    a = net.cores["a"]
    neighbour = a.neighbours[0]
    out = a.receive(net.envelope(neighbour, round_body(1, {"a": 0.0})), 1000.0)
    assert [o.body["k"] for o in out] == [a.round - 1, a.round]


SCENARIOS = {"triangle": triangle(), "line": line(), "ring-chord": ring_with_chord(), "full-4": community()}
FIFO = {name: fifo_outcome(s) for name, s in SCENARIOS.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(SCENARIOS)), rng=st.randoms(use_true_random=False))
def test_any_delivery_order_gives_the_fifo_outcome(name: str, rng: random.Random) -> None:
    # GIVEN a small community; WHEN its messages are delivered in a random interleaving
    # that keeps each sender's order on each link (what MQTT guarantees per topic)
    net = Network(SCENARIOS[name]).start()
    net.run_random(rng)
    # THEN every peer ends exactly (bit for bit) as with FIFO delivery, with no re-send
    assert net.outcomes() == FIFO[name]
    iterations = next(iter(FIFO[name].values())).iterations
    assert all(count == iterations for count in net.published.values())
