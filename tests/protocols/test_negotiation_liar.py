"""A lying peer in a negotiation market: detected with a transferable proof, excluded, the rest trades on.

The liar signs two different messages for one round (another quote and quantity) on its
market topic. Every neighbour reads that topic, so every neighbour holds both signed
frames: an :class:`~wattmesh.protocols.evidence.Equivocation` anyone can check with the
roster. Each honest peer does what the peer shell does (``peer/market.py``): it checks
every market frame before its core sees it, and on a proof calls ``exclude`` (unless it
has finished) and drops that frame and everything the liar sends after. The rule
(module docstring of ``protocols/negotiation.py``, *Liars*): a peer still trading at the
proof voids every deal with the liar (no contract with it could be signed), a peer that
had finished keeps its deals; the honest peers finish among themselves, agree on every
deal between them, and end no worse off than with the grid alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.evidence import EquivocationDetector, verify_evidence
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import Outgoing
from wattmesh.protocols.negotiation import REPORT_TYPE, ROUND_TYPE, Deal, NegotiationPeer
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.wire import Envelope, Verifier, encode

BUY, SELL = 0.30, 0.08  # the tariff of random_community and of the trio below


def negotiation(text: str) -> str:
    """A scenario text switched to ``mechanism = "negotiation"`` (as in test_negotiation.py)."""
    return text.replace('mechanism = "admm"', 'mechanism = "negotiation"')


# ---------------------------------------------------------------------- a whole community
@dataclass
class Run:
    cores: dict[str, NegotiationPeer]
    roster: Roster
    proofs: dict[str, dict[str, Any]] = field(default_factory=dict)
    before: dict[str, list[Deal]] = field(default_factory=dict)  # deals with the liar just before exclude
    after: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # round bodies sent after exclude


def run_with_liar(seed: int, liar: str, lie_round: int) -> Run:
    """Eight homes on a complete graph; ``liar`` publishes a second round-``lie_round`` message."""
    scenario = parse_scenario(negotiation(random_community(8, seed, name="liar")))
    public = scenario.public
    keys = {pid: Ed25519PrivateKey.from_private_bytes(bytes([n + 1]) * 32) for n, pid in enumerate(public.peer_ids)}
    roster = Roster({pid: k.public_key() for pid, k in keys.items()})
    run = Run({pid: NegotiationPeer(scenario.peers[pid], public, 1) for pid in public.peer_ids}, roster)
    verifiers = {pid: Verifier(roster, "liar", "s") for pid in public.peer_ids}
    detectors = {pid: EquivocationDetector() for pid in public.peer_ids}
    liars: dict[str, set[str]] = {pid: set() for pid in public.peer_ids}  # the shell's drop list
    seq = dict.fromkeys(public.peer_ids, 0)
    queue: deque[tuple[str, bytes]] = deque()

    def publish(sender: str, items: list[Outgoing]) -> None:
        for item in items:
            if item.channel != "market":
                continue
            if sender in run.after:
                run.after[sender].append(item.body)
            bodies = [item.body]
            if sender == liar and item.body["k"] == lie_round:
                # the lie: a second message for the same round, another quote and quantity
                price = SELL if item.body["price"] != SELL else BUY
                bodies.append({**item.body, "price": price, "qty": item.body["qty"] + 1.0})
            for body in bodies:
                seq[sender] += 1
                envelope = Envelope(item.type, sender, "liar", "s", seq[sender], 0, body)
                queue.append((sender, encode(envelope, keys[sender])))

    # WHEN the market runs, each peer checking every frame for a contradiction first
    for pid, core in run.cores.items():
        publish(pid, core.start(0.0))
    while queue:
        sender, frame = queue.popleft()
        for receiver in public.links[sender]:
            if sender in liars[receiver]:
                continue  # the shell drops everything from a proven liar
            core = run.cores[receiver]
            envelope = verifiers[receiver].verify(frame)
            proof = detectors[receiver].observe(envelope, frame)
            if proof is not None:
                # the shell: publish the proof, exclude the liar, drop this frame
                run.proofs[receiver] = proof.to_body()
                if not core.done:
                    liars[receiver].add(proof.accused)
                    run.before[receiver] = [d for d in core.deals if d.counterparty == proof.accused]
                    run.after[receiver] = []
                    publish(receiver, core.exclude(proof.accused, 0.0))
                continue
            try:
                out = core.receive(envelope, 0.0)
            except ProtocolError:
                assert receiver == liar, "an honest peer refused an honest message"
                continue  # the shell counts and drops what its core refuses
            publish(receiver, out)
    return run


CASES = {
    # (seed, liar, lie round, deals with it voided by the honest peers still trading at the
    # proof, deals with it kept by those that had finished) over all honest peers
    # seed 4: h002 buys from five sellers; h000, h001, h005 grant it in round 13, h004 in 15 and 16
    "buyer lies in round 16, after its first deals": (4, "h002", 16, 5, 0),
    # seed 3: h003 sells to h002 in rounds 17 and 18; h004 has finished by round 20, with no deal
    "seller lies in round 20, after its first deals": (3, "h003", 20, 2, 0),
    # seed 6: h002 sells to six buyers in round 13; h001, h005, h006 finish in round 17
    "seller lies in round 20, after half its buyers finished": (6, "h002", 20, 3, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_honest_peers_prove_the_lie_exclude_the_liar_and_trade_on_without_it(case: str) -> None:
    # GIVEN eight homes on a complete graph, one of which equivocates in some round
    seed, liar, lie_round, voided, kept = CASES[case]
    run = run_with_liar(seed, liar, lie_round)
    cores = run.cores
    honest = [pid for pid in cores if pid != liar]
    # THEN every honest peer holds a proof naming the liar, valid for anyone with the roster
    assert set(run.proofs) == set(honest)
    for body in run.proofs.values():
        assert verify_evidence(body, run.roster, "liar").accused == liar
    # AND every honest peer finished; those still trading excluded the liar, the others
    # had finished before the lie
    assert run.before, "nobody was still trading at the lie"
    for pid in honest:
        outcome = cores[pid].outcome
        assert outcome is not None and outcome.converged, pid
        if pid in run.before:
            assert cores[pid].excluded == {liar} and outcome.excluded == (liar,), pid
            assert outcome.to_body()["excluded"] == [liar]
        else:
            assert outcome.iterations < lie_round and outcome.excluded == (), pid
    # AND no honest peer still trading at the proof holds any deal with the liar, whatever
    # its round; every message it sent after the exclusion says the liar is gone from the
    # cut round r <= the lie round, asking and granting it nothing
    for pid in run.before:
        outcome = cores[pid].outcome
        assert outcome is not None
        assert [d for d in cores[pid].deals if d.counterparty == liar] == [], pid
        assert liar not in outcome.trades, pid
        cuts = {body["gone"].get(liar) for body in run.after[pid]}
        assert cuts <= {lie_round - 1, lie_round}, (pid, cuts)
        for body in run.after[pid]:
            assert liar not in body["req"] and liar not in body["grant"], pid
    # AND a peer that had finished before the proof keeps its deals with the liar, the
    # same floats the liar recorded
    liar_outcome = cores[liar].outcome
    assert liar_outcome is not None
    finished = [pid for pid in honest if pid not in run.before]
    for pid in finished:
        outcome = cores[pid].outcome
        assert outcome is not None
        if liar in outcome.trades:
            kwh, price = outcome.trades[liar]
            assert liar_outcome.trades[pid] == (-kwh, price), pid
    # (the case exercises what it says: deals with the liar in place at the proof, all
    # voided, and those of finished peers kept)
    assert voided > 0
    assert sum(map(len, run.before.values())) == voided
    assert sum(1 for pid in finished for d in cores[pid].deals if d.counterparty == liar) == kept
    # AND every deal between honest peers is the same floats at both ends
    for pid in honest:
        for other, (kwh, price) in cores[pid].outcome.trades.items():  # type: ignore[union-attr]
            if other == liar:
                continue
            mirror = cores[other].outcome.trades[pid]  # type: ignore[union-attr]
            assert (mirror[0], mirror[1]) == (-kwh, price), (pid, other)
    assert any(other != liar for pid in honest for other in cores[pid].outcome.trades)  # type: ignore[union-attr]
    # AND nobody honest ends worse off than with the grid alone
    for pid in honest:
        outcome = cores[pid].outcome
        assert outcome is not None and outcome.grid_only_cost is not None
        assert outcome.cost <= outcome.grid_only_cost + 1e-9, (pid, outcome.cost, outcome.grid_only_cost)


# ---------------------------------------------------------------------- the core by hand
def trio() -> Scenario:
    """a (a buyer), b (a seller) and c (a seller, the liar below), everyone linked, fee 0.002."""
    lines = [
        '[community]\nname = "trio"', '[market]\nmechanism = "negotiation"\nfee = 0.002',
        f"[grid]\nbuy_price = {BUY}\nsell_price = {SELL}",
        '[[peers]]\nid = "a"\ndemand = 2.0\nflex = 1.0\nflex_cost = 0.1\nrole = "buyer"',
        '[[peers]]\nid = "b"\ndemand = -2.0\nflex = 1.0\nflex_cost = 0.1\nrole = "seller"',
        '[[peers]]\nid = "c"\ndemand = -2.0\nflex = 1.0\nflex_cost = 0.1\nrole = "seller"',
    ]  # fmt: skip
    return parse_scenario("\n".join(lines) + "\n", source="trio")


def body(k: int, **changes: Any) -> dict[str, Any]:
    """A valid round body (a seller's quote), with changes."""
    base: dict[str, Any] = {
        "k": k, "side": "sell", "price": BUY, "qty": 1.0, "req": {}, "grant": {}, "done": False, "gone": {},
    }  # fmt: skip
    base.update(changes)
    return base


_seq: dict[str, int] = {}


def envelope(sender: str, content: Mapping[str, Any]) -> Envelope:
    _seq[sender] = _seq.get(sender, 0) + 1
    return Envelope(ROUND_TYPE, sender, "trio", "hand", _seq[sender], 0, content)


def core(pid: str) -> NegotiationPeer:
    scenario = trio()
    return NegotiationPeer(scenario.peers[pid], scenario.public, 1)


def market(out: list[Outgoing]) -> list[Outgoing]:
    return [o for o in out if o.channel == "market"]


def state(peer: NegotiationPeer) -> tuple[Any, ...]:
    return (peer.round, list(peer.deals), set(peer.excluded), peer.next_deadline(), peer.outcome)


def buyer_dealing_with_c() -> NegotiationPeer:
    """Buyer a at round 5, waiting for c's round-5 message (b's is in): seller c granted
    a's requests of rounds 2 and 3 (deals of rounds 3 and 4), its round-4 request to c is
    in flight; b quotes too high to be asked."""
    a = core("a")
    a.start(0.0)
    requests: dict[int, list[float]] = {}
    for k in range(1, 5):
        a.receive(envelope("b", body(k)), 0.0)
        grant = {"a": requests[k - 1]} if k - 1 in requests else {}
        (message,) = market(a.receive(envelope("c", body(k, price=SELL, qty=2.0, grant=grant)), 0.0))
        requests[k + 1] = message.body["req"]["c"]
    assert market(a.receive(envelope("b", body(5)), 0.0)) == []
    assert a.round == 5 and [(d.counterparty, d.round) for d in a.deals] == [("c", 3), ("c", 4)]
    return a


def test_excluding_a_stranger_or_twice_returns_nothing_and_changes_nothing() -> None:
    # GIVEN buyer a with deals with c and a request to it in flight
    a = buyer_dealing_with_c()
    before = state(a)
    # WHEN it is told to exclude someone who is not its neighbour (or itself)
    # THEN nothing is sent and nothing changes
    assert a.exclude("zz", 1.0) == []
    assert a.exclude("a", 1.0) == []
    assert state(a) == before and a.excluded == set()
    # WHEN it excludes c, THEN something changes (c is excluded, a moves on) ...
    assert a.exclude("c", 1.0) != []
    assert a.excluded == {"c"} and state(a) != before
    after = state(a)
    # ... and excluding c again sends nothing and changes nothing
    assert a.exclude("c", 2.0) == []
    assert state(a) == after


def test_a_buyer_voids_every_deal_with_the_liar_and_releases_its_request() -> None:
    # GIVEN buyer a waiting for c's round 5, with deals with c of rounds 3 and 4 and its
    # round-5 request to c in flight
    a = buyer_dealing_with_c()
    assert sum(d.kwh for d in a.deals) > 0.1
    # WHEN c is proven to lie (the second version of its round 4 just arrived)
    (m6,) = market(a.exclude("c", 0.0))
    # THEN round 5 completes at once without c, and a says c is gone from round 4
    assert m6.body["k"] == 6 and m6.body["gone"] == {"c": 4}
    # AND both deals are void (round 3 too, concluded before the cut), the request to c
    # is released, and a asks nobody (b's ask plus fee is above any bid): its open
    # quantity is D(bid) with nothing committed or reserved, y*(p) = 2 − p/0.1 on [1, 3]
    assert a.deals == []
    bid = m6.body["price"]
    assert m6.body["qty"] == pytest.approx(min(3.0, max(1.0, 2.0 - bid / 0.1)))
    assert m6.body["req"] == {}
    # AND whatever c sends from now on is ignored, even a malformed body
    assert a.receive(envelope("c", body(6, grant={"a": [9.0, 0.2]})), 0.0) == []
    assert a.receive(envelope("c", {"junk": True}), 0.0) == []
    assert a.deals == []
    # AND a finishes with b alone: c excluded, no trade with it in the outcome, and a
    # pays exactly its grid-only cost
    out: list[Outgoing] = []
    for k in range(6, 60):
        out = a.receive(envelope("b", body(k)), 0.0)
        if a.done:
            break
    assert a.outcome is not None and out[-1].type == REPORT_TYPE
    assert a.outcome.excluded == ("c",) and out[-1].body["excluded"] == ["c"]
    assert a.outcome.trades == {} and a.outcome.community_import == 0.0
    assert a.outcome.grid_only_cost is not None
    assert a.outcome.cost == pytest.approx(a.outcome.grid_only_cost, abs=1e-12)


def test_exclusion_unblocks_a_round_that_waited_for_the_liar() -> None:
    # GIVEN seller b in round 1: a's message is in, c (the liar) has sent nothing
    b = core("b")
    b.start(0.0)
    assert market(b.receive(envelope("a", body(1, side="buy", price=SELL)), 0.0)) == []
    assert b.round == 1 and b.next_deadline() is not None
    # WHEN c is excluded, THEN b's round 2 goes out at once, naming c gone from round 1
    (m2,) = market(b.exclude("c", 0.0))
    assert m2.body["k"] == 2 and m2.body["gone"] == {"c": 1}
    # AND from then on a alone is waited for
    (m3,) = market(b.receive(envelope("a", body(2, side="buy", price=SELL)), 0.0))
    assert m3.body["k"] == 3


def test_a_seller_voids_its_grant_to_a_contradicted_request_and_offers_that_energy_again() -> None:
    # GIVEN seller b that granted a's round-2 request in its round-3 message
    b = core("b")
    b.start(0.0)
    b.receive(envelope("a", body(1, side="buy", price=SELL)), 0.0)
    b.receive(envelope("c", body(1, side="none", price=0.19, qty=0.0)), 0.0)
    b.receive(envelope("a", body(2, side="buy", price=0.25, req={"b": [1.0, 0.25]})), 0.0)
    (m3,) = market(b.receive(envelope("c", body(2, side="none", price=0.19, qty=0.0)), 0.0))
    assert m3.body["grant"] == {"a": [1.0, 0.25]} and [d.kwh for d in b.deals] == [-1.0]
    # WHEN a turns out to have sent two versions of that round-2 request, while b waits
    # for a's round 3
    b.receive(envelope("c", body(3, side="none", price=0.19, qty=0.0)), 0.0)
    (m4,) = market(b.exclude("a", 0.0))
    # THEN the grant is void, a is gone from round 2, and b grants it nothing more
    assert b.deals == []
    assert m4.body["k"] == 4 and m4.body["gone"] == {"a": 2} and m4.body["grant"] == {}
    # AND b offers the energy it had sold to a again: its open quantity is what it
    # would export at its ask, S(ask) = −y*(ask) with y*(p) = −2 − p/0.1 on [−3, −1]
    ask = m4.body["price"]
    assert m4.body["qty"] == pytest.approx(min(3.0, 2.0 + ask / 0.1))
