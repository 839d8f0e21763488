"""A lying peer over Mosquitto: proven, reported on telemetry, excluded; the others finish.

Five homes as worker processes, in an ADMM and in a negotiation market; one runs the
equivocation drill (it signs a second, different round-3 message). Its neighbours read
both frames on its market topic, publish the two signed frames as a proof on the
telemetry topic, stop trading with it and finish among themselves with signed
contracts. The ADMM liar, answered by nobody, fails by its own neighbour deadline; the
negotiation liar reads its neighbours' gone-notices and ends with no deal.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from communities import random_community

from wattmesh.broker import BrokerHandle
from wattmesh.peer.connection import PeerConnection
from wattmesh.peer.faults import NO_FAULTS, FaultPlan
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.ledger import Ledger
from wattmesh.peer.market import PeerJob
from wattmesh.protocols.evidence import EVIDENCE_TYPE, verify_evidence
from wattmesh.protocols.scenario import parse_scenario
from wattmesh.protocols.topology import diameter

LIAR = "h002"
TIMEOUT_S = 90.0


@pytest.mark.mosquitto
@pytest.mark.parametrize("mechanism", ["admm", "negotiation"])
async def test_a_liar_is_proven_reported_and_excluded_and_the_rest_settles(
    mosquitto_broker: BrokerHandle, tmp_path: Path, mechanism: str
) -> None:
    # GIVEN five homes, one of which will equivocate in round 3
    text = random_community(5, 7, name="liars", admm="round_timeout_s = 1.0\nneighbour_timeout_s = 8.0")
    text = text.replace('mechanism = "admm"', f'mechanism = "{mechanism}"').replace(
        "[market.admm]", f"[market.{mechanism}]"
    )
    scenario = parse_scenario(text)
    public = scenario.public
    keys = {pid: generate_key(tmp_path / f"{pid}.key") for pid in [*public.peer_ids, "watcher"]}
    roster = write_roster(tmp_path / "roster.toml", keys)
    state = tmp_path / "state"
    proofs: list[dict[str, object]] = []
    watcher = PeerConnection(
        "watcher", keys["watcher"], roster, community="liars", session=None, url=mosquitto_broker.url, read_only=True
    )
    async with watcher as conn:
        await conn.subscribe_all("telemetry")
        processes = {}
        for pid in public.peer_ids:
            faults = FaultPlan(equivocate_round=3) if pid == LIAR else NO_FAULTS
            job = PeerJob(
                scenario.peers[pid], public, diameter(public.links), tmp_path / f"{pid}.key", roster.to_toml(),
                mosquitto_broker.url, "liars-1", state, 30.0, faults,
            )  # fmt: skip
            with open(tmp_path / f"{pid}.log", "wb") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "wattmesh.peer.worker", stdin=asyncio.subprocess.PIPE, stderr=log
                )
            assert process.stdin is not None
            process.stdin.write(json.dumps([job.to_dict()]).encode())
            process.stdin.close()
            processes[pid] = process

        # WHEN the market runs, the watcher collecting every proof published on telemetry
        async def collect() -> None:
            while True:
                incoming = await conn.receive()
                if incoming.envelope.type == EVIDENCE_TYPE:
                    proofs.append(dict(incoming.envelope.body))

        collector = asyncio.create_task(collect())
        codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes.values())), TIMEOUT_S)
        collector.cancel()

    logs = {pid: (tmp_path / f"{pid}.log").read_text() for pid in public.peer_ids}
    honest = [pid for pid in public.peer_ids if pid != LIAR]
    # THEN the honest peers finished; in ADMM the liar failed by its own deadline (its
    # neighbours finished without it), in negotiation it read their gone-notices and ended
    exits = dict(zip(public.peer_ids, codes, strict=True))
    assert {pid: exits[pid] for pid in honest} == dict.fromkeys(honest, 0), logs
    if mechanism == "admm":
        assert exits[LIAR] == 1, logs[LIAR]
    # AND each honest peer published a proof that anyone with the roster can check
    reporters = {pid for pid in honest if "equivocated" in logs[pid]}
    assert reporters == set(honest), logs
    assert len(proofs) >= len(honest)
    assert all(verify_evidence(p, roster, "liars").accused == LIAR for p in proofs)
    # AND no contract involves the liar, while the honest pairs signed theirs
    finals = 0
    for pid in honest:
        with Ledger(state / f"{pid}.ledger.sqlite") as ledger:
            records = ledger.records("liars-1")
        assert all(r.counterparty != LIAR for r in records), pid
        finals += sum(r.status == "final" for r in records)
    assert finals > 0
