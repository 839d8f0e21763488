"""AdmmPeer.snapshot / restore / resume: a core killed mid-market carries on bit for bit.

The bus below is the in-memory bus (:mod:`wattmesh.protocols.memory_bus`: encoded,
signed frames, one verifier per receiver, virtual time) plus a crash: when the victim
advances to round k, its snapshot goes through JSON (as the shell writes it), the core
is thrown away together with the round-k message it had not yet published, and every
message reaching it while it is "down" is lost. Then it is restored from the JSON and
resumed. The market must end exactly as the clean ``run_in_memory`` run: same round,
same floats, for every peer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from typing import Any

import pytest
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.admm import ROUND_TYPE, SNAPSHOT_FORMAT, AdmmPeer
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import Outgoing, PeerOutcome
from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope, Verifier, encode

TIMING = "round_timeout_s = 0.5\nneighbour_timeout_s = 30.0"


def scenario(n: int = 6, seed: int = 1, degree: int | None = None) -> Scenario:
    return parse_scenario(random_community(n, seed, fee=0.01, degree=degree, admm=TIMING), source="snapshot")


def keys_for(s: Scenario) -> dict[str, Ed25519PrivateKey]:
    ids = s.public.peer_ids
    return {pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest()) for pid in ids}


class CrashingBus:
    """The memory bus with one peer that dies when it advances to ``crash_round``."""

    def __init__(self, s: Scenario, victim: str, crash_round: int, down_deliveries: int) -> None:
        self.scenario, self.public = s, s.public
        self.keys = keys_for(s)
        roster = Roster({pid: key.public_key() for pid, key in self.keys.items()})
        self.horizon = diameter(self.public.links)
        self.cores = {pid: AdmmPeer(s.peers[pid], self.public, self.horizon) for pid in self.public.peer_ids}
        self.verifiers = {pid: Verifier(roster, self.public.name, "memory") for pid in self.public.peer_ids}
        self.seq = dict.fromkeys(self.public.peer_ids, 0)  # persisted across the crash, like SequenceStore
        self.queue: deque[tuple[str, bytes]] = deque()
        self.now = 0.0
        self.victim, self.crash_round, self.down_left = victim, crash_round, down_deliveries
        self.saved: str | None = None  # the snapshot file's text
        self.lost = 0  # messages that reached the victim while it was down

    def publish(self, sender: str, items: list[Outgoing]) -> None:
        core = self.cores.get(sender)
        if sender == self.victim and core is not None and self.saved is None and core.round == self.crash_round:
            # write-ahead: the snapshot is on disk, then the process dies before publishing
            self.saved = json.dumps(core.snapshot())
            del self.cores[sender]
            return
        for item in items:
            if item.channel == "market":
                self.seq[sender] += 1
                envelope = Envelope(item.type, sender, self.public.name, "memory", self.seq[sender], 0, item.body)
                self.queue.append((sender, encode(envelope, self.keys[sender])))

    def restart(self) -> AdmmPeer:
        assert self.saved is not None
        spec = self.scenario.peers[self.victim]
        core = AdmmPeer.restore(spec, self.public, self.horizon, json.loads(self.saved), self.now)
        self.cores[self.victim] = core
        self.publish(self.victim, core.resume(self.now))
        return core

    def run(self) -> dict[str, PeerOutcome]:
        for pid, core in list(self.cores.items()):
            self.publish(pid, core.start(self.now))
        while True:
            while self.queue:
                sender, frame = self.queue.popleft()
                for receiver in self.public.links[sender]:
                    envelope = self.verifiers[receiver].verify(frame)
                    if receiver not in self.cores:
                        self.lost += 1
                        self.down_left -= 1
                        if self.down_left <= 0:
                            self.restart()
                        continue
                    self.publish(receiver, self.cores[receiver].receive(envelope, self.now))
            # while the victim is down, time passes: its neighbours' timers re-send, and
            # what they re-send to it is lost too, until it has missed `down` messages
            deadlines = [(d, pid) for pid, c in self.cores.items() if (d := c.next_deadline()) is not None]
            if not deadlines and self.victim not in self.cores:
                self.restart()
                continue
            if not deadlines:
                break
            self.now = max(self.now, min(deadlines)[0])
            for d, pid in deadlines:
                if d <= self.now and pid in self.cores:
                    self.publish(pid, self.cores[pid].on_timer(self.now))
        assert not any(core.failure for core in self.cores.values())
        return {pid: core.outcome for pid, core in self.cores.items() if core.outcome is not None}


@pytest.mark.parametrize(
    ("n", "seed", "degree", "victim", "crash_round", "down"),
    [
        (6, 4, None, "h002", 1, 0),  # dies before its very first message left
        (6, 4, None, "h000", 5, 3),
        (6, 4, None, "h005", 12, 20),  # down long enough for its neighbours to back off
        (7, 4, 3, "h003", 9, 7),  # sparse, diameter 3: votes travel more than one hop
    ],
)
def test_a_core_restored_mid_market_ends_bit_identical_to_the_clean_run(
    n: int, seed: int, degree: int | None, victim: str, crash_round: int, down: int
) -> None:
    # GIVEN a community and its clean in-memory result
    s = scenario(n, seed, degree)
    clean = run_in_memory(s, keys_for(s)).outcomes
    rounds = next(iter(clean.values())).iterations
    assert rounds > crash_round + 2
    # WHEN one peer dies on reaching round k (snapshot written, round-k message unsent),
    # loses what reaches it while down, and is restored from the JSON and resumed
    bus = CrashingBus(s, victim, crash_round, down)
    outcomes = bus.run()
    # THEN it really was down, and it came back
    assert bus.saved is not None and json.loads(bus.saved)["round"] == crash_round
    assert bus.lost >= down
    # AND every peer's outcome is the clean run's, float for float
    assert outcomes == dict(clean)


def test_snapshot_survives_json_and_restores_the_same_state() -> None:
    # GIVEN a run stopped with one core mid-market, some rounds received ahead
    s = scenario()
    bus = CrashingBus(s, "h001", 10**9, 0)  # never crashes
    for pid, core in bus.cores.items():
        bus.publish(pid, core.start(0.0))
    for _ in range(40):
        sender, frame = bus.queue.popleft()
        for receiver in bus.public.links[sender]:
            bus.publish(receiver, bus.cores[receiver].receive(bus.verifiers[receiver].verify(frame), 0.0))
    core = bus.cores["h001"]
    snap = core.snapshot()
    # WHEN it goes through JSON and back into a core
    text = json.dumps(snap, allow_nan=False)  # plain JSON: no NaN or Infinity in it
    restored = AdmmPeer.restore(s.peers["h001"], s.public, bus.horizon, json.loads(text), now=100.0)
    # THEN the restored core's snapshot is the same document
    assert restored.snapshot() == snap
    assert snap["format"] == SNAPSHOT_FORMAT and snap["round"] == core.round
    # AND its state is the same floats
    for name in ("price", "rho", "center", "trades"):
        assert getattr(restored, name).tolist() == getattr(core, name).tolist()
    assert restored.round == core.round and restored._votes == core._votes
    # AND resume re-publishes exactly the last two round messages the lost core had sent
    resent = restored.resume(100.0)
    assert [o.body for o in resent] == [core._sent[k].body for k in (core.round - 1, core.round)]
    assert all(o.channel == "market" and o.type == ROUND_TYPE for o in resent)
    # AND its timers start now: next re-send one round timeout later
    assert restored.next_deadline() == pytest.approx(100.0 + 0.5)


def test_residuals_before_the_first_complete_round_are_kept_as_null() -> None:
    s = scenario()
    core = AdmmPeer(s.peers["h000"], s.public, diameter(s.public.links))
    core.start(0.0)
    snap = core.snapshot()
    assert snap["primal_residual"] is None and snap["dual_residual"] is None and snap["round"] == 1
    restored = AdmmPeer.restore(s.peers["h000"], s.public, diameter(s.public.links), snap, 0.0)
    assert math.isinf(restored.primal_residual) and restored.resume(0.0)[0].body == snap["sent"][0]


def test_snapshot_refuses_before_start_and_after_the_end() -> None:
    s = scenario()
    core = AdmmPeer(s.peers["h000"], s.public, diameter(s.public.links))
    with pytest.raises(RuntimeError, match="before start"):
        core.snapshot()
    core.start(0.0)
    core.failure = "gave up"  # a finished market resumes from the ledger, not from a snapshot
    with pytest.raises(RuntimeError, match="finished"):
        core.snapshot()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other/1"}, "not an ADMM snapshot"),
        ({"peer": "h001"}, "not of 'h000'"),
        ({"horizon": 7}, "horizon"),
        ({"price": [0.1]}, "malformed"),
        ({"sent": []}, "missing"),
        ({"pending": [[3, "nobody", 0.0, 1, []]]}, "non-neighbour"),
        ({"round": True}, "malformed"),
    ],
)
def test_restore_refuses_a_snapshot_that_is_not_this_peers(change: dict[str, Any], message: str) -> None:
    s = scenario()
    horizon = diameter(s.public.links)
    core = AdmmPeer(s.peers["h000"], s.public, horizon)
    core.start(0.0)
    with pytest.raises(ValueError, match=message):
        AdmmPeer.restore(s.peers["h000"], s.public, horizon, {**core.snapshot(), **change}, 0.0)


def test_resume_of_a_finished_core_sends_nothing() -> None:
    s = parse_scenario(random_community(2, 0, admm=TIMING), source="two")
    cores = {pid: AdmmPeer(s.peers[pid], s.public, 1) for pid in s.public.peer_ids}
    core = cores["h000"]
    core.start(0.0)
    core.failure = "gave up"
    assert core.resume(1.0) == []


def test_the_start_grace_postpones_giving_up_but_not_the_round_one_resends() -> None:
    # GIVEN a core started with a 60 s start grace (neighbours may still be starting)
    s = scenario()
    core = AdmmPeer(s.peers["h000"], s.public, diameter(s.public.links))
    first = core.start(0.0, start_grace_s=60.0)
    # THEN a lost round-1 message is re-sent one round timeout later, not after the grace
    assert core.next_deadline() == pytest.approx(0.5)
    assert core.on_timer(0.5) == first
    # AND its silent neighbours are given up only after the grace plus the neighbour timeout
    core.neighbours_offline(set(core.neighbours))
    core.on_timer(89.9)  # (re-sends, backing off)
    assert not core.excluded and core.round == 1
    core.on_timer(90.0)
    assert core.excluded == set(core.neighbours)
