"""A peer gone for good in an ADMM market: its neighbours exclude it and the rest clears.

A small discrete-event network (virtual clock, every message delivered after a fixed
latency, every core's timer fired when due) runs the cores; one peer stops for good
right after it published a chosen round. Its neighbours hear nothing from it for
``neighbour_timeout_s`` and exclude it when the link graph without it still fits the
stop vote's horizon; peers further away keep waiting for their live (stuck) neighbours
meanwhile, and everyone left stops on the same round at the optimum of the community
without the gone peer. When the graph would become too wide, the session fails at every
peer, by a bounded deadline.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import pytest
from communities import random_community, without_peer
from reference import social_optimum

from wattmesh.protocols.admm import ROUND_TYPE, AdmmPeer
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope

TIMEOUT = 30.0  # neighbour_timeout_s
ADMM = f"round_timeout_s = 2.0\nneighbour_timeout_s = {TIMEOUT}"
LATENCY = 0.01  # [s] per message


class EventNetwork:
    """Cores exchanging round messages on a virtual clock; one of them may die."""

    def __init__(self, scenario: Scenario) -> None:
        self.public = scenario.public
        self.horizon = diameter(self.public.links)
        self.cores = {pid: AdmmPeer(scenario.peers[pid], self.public, self.horizon) for pid in self.public.peer_ids}
        # (time, order, receiver, round message or the id of a neighbour whose session failed)
        self.events: list[tuple[float, int, str, Envelope | str]] = []
        self.order = 0
        self.now = 0.0
        self.dead: set[str] = set()
        self.kill_after: tuple[str, int] | None = None  # (peer, last round it publishes)
        self.failed_at: dict[str, float] = {}

    def publish(self, sender: str, items: Iterable[object]) -> None:
        for item in items:
            if sender in self.dead or getattr(item, "channel", None) != "market":
                continue
            body = item.body  # type: ignore[attr-defined]
            envelope = Envelope(ROUND_TYPE, sender, self.public.name, "s", 1, 0, body)
            for receiver in self.public.links[sender]:
                self.order += 1
                heapq.heappush(self.events, (self.now + LATENCY, self.order, receiver, envelope))
            if self.kill_after == (sender, body["k"]):
                self.dead.add(sender)

    def alive(self) -> dict[str, AdmmPeer]:
        return {pid: core for pid, core in self.cores.items() if pid not in self.dead}

    def run(self, until: float) -> None:
        for pid, core in self.cores.items():
            self.publish(pid, core.start(0.0))
        while any(not core.done for core in self.alive().values()):
            timers = [(core.next_deadline(), pid) for pid, core in self.alive().items() if not core.done]
            due, pid = min((d, p) for d, p in timers if d is not None)
            if self.events and self.events[0][0] <= due:
                self.now, _, receiver, message = heapq.heappop(self.events)
                core = self.cores[receiver]
                if receiver in self.dead or core.done:
                    continue
                if isinstance(message, str):
                    core.neighbour_failed(message)
                else:
                    self.publish(receiver, core.receive(message, self.now))
                self._spread_failure(receiver)
            else:
                self.now = due
                self.cores[pid].neighbours_offline(self.dead)  # presence: their Last Will
                self.publish(pid, self.cores[pid].on_timer(due))
                self._spread_failure(pid)
            assert self.now <= until, "the network hung"

    def _spread_failure(self, pid: str) -> None:
        """A failed peer publishes ``session.failed``; its neighbours' shells read it."""
        if self.cores[pid].failure is None or pid in self.failed_at:
            return
        self.failed_at[pid] = self.now
        for other in self.public.links[pid]:
            self.order += 1
            heapq.heappush(self.events, (self.now + LATENCY, self.order, other, pid))


def waiting_for_c_in_round_one(name: str, start_grace_s: float = 0.0) -> AdmmPeer:
    """Peer h000 of a triangle, started at t = 0 and holding h001's round 1 (at 0.1 s):
    it waits for h002 alone."""
    net = EventNetwork(parse_scenario(random_community(3, 4, name=name, admm=ADMM)))
    a = net.cores["h000"]
    b_first = net.cores["h001"].start(0.0)
    a.start(0.0, start_grace_s=start_grace_s)
    a.receive(Envelope(ROUND_TYPE, "h001", name, "s", 1, 0, b_first[0].body), 0.1)
    return a


@pytest.mark.parametrize(
    ("n", "seed", "degree", "victim", "dies_after"),
    [(8, 3, None, "h005", 4), (12, 5, 4, "h007", 6), (6, 2, None, "h000", 1)],
    ids=["complete-8", "sparse-12", "gone-after-round-1"],
)
def test_the_rest_clears_without_a_peer_gone_for_good(
    n: int, seed: int, degree: int | None, victim: str, dies_after: int
) -> None:
    # GIVEN a community in which one peer stops for good after publishing a round
    text = random_community(n, seed, degree=degree, fee=0.001, name="gone", admm=ADMM)
    net = EventNetwork(parse_scenario(text))
    neighbours = set(net.public.links[victim])
    rest = {p: tuple(q for q in links if q != victim) for p, links in net.public.links.items() if p != victim}
    assert diameter(rest) <= net.horizon  # the case where the market can go on
    net.kill_after = (victim, dies_after)
    # WHEN the market runs on
    net.run(until=3600.0)
    alive = net.alive()
    # THEN every remaining peer finished converged, on the same round
    assert all(core.outcome is not None and core.outcome.converged for core in alive.values())
    assert len({core.outcome.iterations for core in alive.values()}) == 1  # type: ignore[union-attr]
    # AND exactly the gone peer's neighbours excluded it, nobody excluded anyone else
    assert {pid for pid, core in alive.items() if core.excluded} == neighbours
    assert all(core.excluded == {victim} for pid, core in alive.items() if pid in neighbours)
    # AND within one neighbour timeout (plus the stall's own rounds) of its death
    assert net.now < 2 * TIMEOUT + 10
    # AND no trade with it, every other trade mirrored exactly at both ends
    for pid, core in alive.items():
        assert victim not in core.outcome.trades  # type: ignore[union-attr]
        for other, (kwh, price) in core.outcome.trades.items():  # type: ignore[union-attr]
            assert alive[other].outcome.trades[pid] == (-kwh, price)  # type: ignore[union-attr]
    # AND the social cost is the optimum of the community without it
    optimum = social_optimum(parse_scenario(without_peer(text, victim))).social_cost
    achieved = sum(core.outcome.cost for core in alive.values())  # type: ignore[union-attr]
    assert achieved == pytest.approx(optimum, rel=1e-3, abs=1e-3)


def test_the_session_fails_everywhere_when_the_rest_would_be_too_wide_for_the_stop_vote() -> None:
    # GIVEN a ring of five (diameter 2): without one peer it is a path of four (diameter 3)
    text = random_community(5, 1, degree=2, name="ring", admm=ADMM)
    net = EventNetwork(parse_scenario(text))
    assert net.horizon == 2
    net.kill_after = ("h002", 3)
    # WHEN that peer dies
    net.run(until=3600.0)
    # THEN every remaining peer failed, none with an outcome, all by one neighbour timeout
    alive = net.alive()
    assert all(core.failure is not None and core.outcome is None for core in alive.values())
    assert max(net.failed_at.values()) < TIMEOUT + 10
    # AND the gone peer's neighbours say why; the others learnt it from them
    for pid in ("h001", "h003"):
        failure = alive[pid].failure
        assert failure is not None and "from h002 within 30 s" in failure and "wider" in failure
    for pid in ("h000", "h004"):
        assert alive[pid].failure in {"neighbour h001 gave up the session", "neighbour h003 gave up the session"}


def test_a_live_but_stuck_neighbour_is_waited_for_then_the_session_fails_at_twice_the_timeout() -> None:
    # GIVEN a triangle where everyone completed round 1 and a and b sent round 2 (at t = 0)
    scenario = parse_scenario(random_community(3, 4, name="stuck", admm=ADMM))
    net = EventNetwork(scenario)
    a = net.cores["h000"]
    firsts = {pid: core.start(0.0) for pid, core in net.cores.items()}

    def envelope(sender: str, body: dict) -> Envelope:
        return Envelope(ROUND_TYPE, sender, "stuck", "s", 1, 0, body)

    round1 = {pid: next(o.body for o in out if o.channel == "market") for pid, out in firsts.items()}
    a.receive(envelope("h001", round1["h001"]), 0.0)
    a.receive(envelope("h002", round1["h002"]), 0.0)
    assert a.round == 2
    b = net.cores["h001"]
    b.receive(envelope("h000", round1["h000"]), 0.0)
    b_out = b.receive(envelope("h002", round1["h002"]), 0.0)
    a.receive(envelope("h001", next(o.body for o in b_out if o.channel == "market")), 0.0)
    # WHEN c never sends round 2 but re-sends its round 1 now and then (it is alive, stuck)
    a.receive(envelope("h002", round1["h002"]), 20.0)
    # THEN at the neighbour timeout a does not exclude c: it waits one timeout past c's last word
    assert a.on_timer(TIMEOUT) == []
    assert not a.excluded and not a.done
    a.receive(envelope("h002", round1["h002"]), 45.0)
    a.on_timer(20.0 + TIMEOUT)
    assert not a.excluded and not a.done
    # AND at twice the timeout without progress it gives up, naming c
    a.on_timer(2 * TIMEOUT - 0.1)
    assert not a.done
    assert a.on_timer(2 * TIMEOUT) == []
    assert a.failure is not None and "h002" in a.failure and "still online or heard lately" in a.failure
    assert not a.excluded


def test_a_neighbour_silent_since_the_start_is_excluded_after_the_start_grace() -> None:
    # GIVEN a triangle where c passed the start barrier but never sends round 1
    a = waiting_for_c_in_round_one("mute", start_grace_s=60.0)
    # THEN a waits the grace and one timeout before giving c (offline) up ...
    a.neighbours_offline({"h002"})
    a.on_timer(60.0 + TIMEOUT - 0.1)
    assert not a.excluded and a.round == 1
    out = a.on_timer(60.0 + TIMEOUT)
    # ... then excludes c and goes on to round 2 with b alone
    assert a.excluded == {"h002"} and a.round == 2
    assert [o.body["k"] for o in out if o.channel == "market"] == [2]


def test_a_silent_neighbour_that_reported_finished_without_us_and_the_session_fails() -> None:
    # GIVEN a triangle where c has published its report (it left the market) and then
    # falls silent while a still waits for its round 1 (e.g. c excluded a as a liar)
    a = waiting_for_c_in_round_one("left")
    a.neighbour_finished("h002")
    a.neighbour_finished("nobody")  # not a neighbour: ignored
    # WHEN the neighbour timeout passes
    a.on_timer(TIMEOUT)
    # THEN a does not carry on as if c were gone: its session fails, saying why
    assert not a.excluded and a.outcome is None
    assert a.failure == "h002 finished the market without us (no round-1 message)"


def test_silence_while_our_own_connection_was_down_does_not_make_a_neighbour_gone() -> None:
    # GIVEN a triangle where a completed nothing since t = 0 and c has been silent
    a = waiting_for_c_in_round_one("deaf")
    # WHEN a's broker connection was down until t = 25 s (the shell says so), c offline
    a.neighbours_offline({"h002"})
    a.deaf_until(25.0)
    a.deaf_until(5.0)  # an older outage changes nothing
    # THEN at the neighbour timeout c is not taken for gone: a waits until 25 s + timeout
    a.on_timer(TIMEOUT)
    assert not a.excluded and not a.done
    a.on_timer(25.0 + TIMEOUT - 0.1)
    assert not a.excluded and not a.done
    # AND if c (offline) stays silent that long after the reconnection, it is gone
    a.neighbours_offline({"h002"})
    a.on_timer(25.0 + TIMEOUT)
    assert a.excluded == {"h002"} and a.round == 2


def test_a_silent_neighbour_that_is_still_online_is_not_gone() -> None:
    # GIVEN a triangle where c is silent since the start but its presence says online
    # (an overloaded host, or its messages wait unread in a's own backlog)
    a = waiting_for_c_in_round_one("busy")
    a.neighbours_offline(set())
    # THEN the shell is asked to look up c's presence only once the round is overdue
    assert a.silent_neighbours(TIMEOUT - 0.1) == []
    assert a.silent_neighbours(TIMEOUT) == ["h002"]
    # WHEN the neighbour timeout passes, and a while longer
    a.on_timer(TIMEOUT)
    a.on_timer(1.5 * TIMEOUT)
    # THEN a keeps waiting for c, looking again one round timeout (2 s) later
    assert not a.excluded and not a.done
    # AND if c goes offline meanwhile, it is gone at that next look
    a.neighbours_offline({"h002"})
    a.on_timer(1.5 * TIMEOUT + 1.9)
    assert not a.excluded
    a.on_timer(1.5 * TIMEOUT + 2.0)
    assert a.excluded == {"h002"} and a.round == 2
