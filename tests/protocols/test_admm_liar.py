"""A lying peer in an ADMM market: detected with a transferable proof, excluded, the rest clears.

The liar signs two different round-3 messages (different trade offers) on its market
topic. Every neighbour reads that topic, so every neighbour holds both signed frames:
an :class:`~wattmesh.protocols.evidence.Equivocation` that anyone can check with the
roster. The honest peers exclude the liar (its trades fixed at 0 kWh, no contract) and
finish the market among themselves, at the social optimum of the community without it.
"""

from __future__ import annotations

from collections import deque

import pytest
from communities import random_community, without_peer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from reference import social_optimum

from wattmesh.protocols.admm import AdmmPeer
from wattmesh.protocols.evidence import EquivocationDetector, verify_evidence
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.scenario import parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope, Verifier, encode

LIAR = "h003"
LIE_ROUND = 3


def test_honest_peers_prove_the_lie_exclude_the_liar_and_clear_without_it() -> None:
    # GIVEN eight homes on a complete graph, one of which will equivocate at round 3
    scenario = parse_scenario(random_community(8, 11, name="liar"))
    public = scenario.public
    keys = {pid: Ed25519PrivateKey.from_private_bytes(bytes([n + 1]) * 32) for n, pid in enumerate(public.peer_ids)}
    roster = Roster({pid: k.public_key() for pid, k in keys.items()})
    cores = {pid: AdmmPeer(scenario.peers[pid], public, diameter(public.links)) for pid in public.peer_ids}
    verifiers = {pid: Verifier(roster, "liar", "s") for pid in public.peer_ids}
    detectors = {pid: EquivocationDetector() for pid in public.peer_ids}
    seq = dict.fromkeys(public.peer_ids, 0)
    queue: deque[tuple[str, bytes]] = deque()
    proofs: dict[str, dict[str, object]] = {}

    def publish(sender: str, items: list) -> None:
        for item in items:
            if item.channel != "market":
                continue
            bodies = [item.body]
            if sender == LIAR and item.body["k"] == LIE_ROUND:
                # the lie: a second round-3 message offering everyone twice as much
                bodies.append({**item.body, "t": {j: 2 * t + 0.5 for j, t in item.body["t"].items()}})
            for body in bodies:
                seq[sender] += 1
                queue.append((sender, encode(Envelope(item.type, sender, "liar", "s", seq[sender], 0, body), keys[sender])))

    # WHEN the market runs, each honest peer checking every round message for contradictions
    for pid, core in cores.items():
        publish(pid, core.start(0.0))
    while queue:
        sender, frame = queue.popleft()
        for receiver in public.links[sender]:
            envelope = verifiers[receiver].verify(frame)
            proof = detectors[receiver].observe(envelope, frame)
            out = cores[receiver].receive(envelope, 0.0)
            if proof is not None:
                proofs[receiver] = proof.to_body()
                out += cores[receiver].exclude(proof.accused, 0.0)
            publish(receiver, out)

    honest = [pid for pid in public.peer_ids if pid != LIAR]
    # THEN every honest peer holds a proof naming the liar, valid for anyone with the roster
    assert set(proofs) == set(honest)
    for body in proofs.values():
        assert verify_evidence(body, roster, "liar").accused == LIAR
    # AND every honest peer finished, converged, with no trade (no contract) with the liar
    for pid in honest:
        outcome = cores[pid].outcome
        assert outcome is not None and outcome.converged, pid
        assert LIAR not in outcome.trades
    # AND the honest trades balance exactly and reach the optimum of the community without the liar
    for pid in honest:
        for other, (kwh, price) in cores[pid].outcome.trades.items():  # type: ignore[union-attr]
            mirror = cores[other].outcome.trades[pid]  # type: ignore[union-attr]
            assert (mirror[0], mirror[1]) == (-kwh, price)
    optimum = social_optimum(parse_scenario(without_peer(random_community(8, 11, name="liar"), LIAR))).social_cost
    achieved = sum(cores[pid].outcome.cost for pid in honest)  # type: ignore[union-attr]
    assert achieved == pytest.approx(optimum, rel=1e-3, abs=1e-3)
