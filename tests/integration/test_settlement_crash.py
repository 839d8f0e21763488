"""kill -9 during settlement: every countersigned contract survives, both ledgers agree.

Three peers run as real worker processes over Mosquitto. One of them carries a fault
plan that SIGKILLs its own process at a named point (right after the market cleared, or
right after a contract became final on disk and before its message left). The test
waits for that death, restarts the peer with the same job and no fault, and waits for
every process to exit. Then it opens each ledger: every trade of the market is a final
contract in both parties' ledgers, with the same terms bytes and two valid signatures,
and nothing half-signed is final.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from wattmesh.broker import BrokerHandle
from wattmesh.peer.faults import NO_FAULTS, FaultPlan
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.ledger import Ledger, audit
from wattmesh.peer.market import PeerJob
from wattmesh.protocols.scenario import parse_scenario
from wattmesh.protocols.topology import diameter

# one PV home selling to two homes with loads: every run has two trades (s1->b1, s1->b2)
SCENARIO = """
[community]
name = "crash"
[grid]
buy_price = 0.30
sell_price = 0.08
[[peers]]
id = "s1"
demand = -3.0
flex = 0.5
flex_cost = 0.05
[[peers]]
id = "b1"
demand = 1.5
flex = 0.5
flex_cost = 0.1
[[peers]]
id = "b2"
demand = 1.0
flex = 0.5
flex_cost = 0.2
"""
EXIT_TIMEOUT_S = 120.0


async def _spawn(job: PeerJob, log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wattmesh.peer.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(json.dumps([job.to_dict()]).encode())
    await process.stdin.drain()
    process.stdin.close()
    return process


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    ("victim", "point"),
    [("b1", "contract.recorded"), ("s1", "market.cleared"), ("s1", "contract.recorded")],
)
async def test_a_peer_killed_during_settlement_restarts_and_both_ledgers_agree(
    mosquitto_broker: BrokerHandle, tmp_path: Path, victim: str, point: str
) -> None:
    # GIVEN three peers, one of which will SIGKILL itself at `point`
    scenario = parse_scenario(SCENARIO, source="crash")
    keys = {pid: generate_key(tmp_path / f"{pid}.key") for pid in scenario.public.peer_ids}
    roster = write_roster(tmp_path / "roster.toml", keys)
    state = tmp_path / "state"

    def job(pid: str, faults: FaultPlan = NO_FAULTS) -> PeerJob:
        return PeerJob(
            scenario.peers[pid], scenario.public, diameter(scenario.public.links), tmp_path / f"{pid}.key",
            roster.to_toml(), mosquitto_broker.url, "crash-1", state, 30.0, faults,
        )  # fmt: skip

    processes = {
        pid: await _spawn(job(pid, FaultPlan(crash_at=point) if pid == victim else NO_FAULTS), tmp_path / f"{pid}.log")
        for pid in scenario.public.peer_ids
    }
    # WHEN the victim dies at that point and is restarted with the same job
    code = await asyncio.wait_for(processes[victim].wait(), EXIT_TIMEOUT_S)
    assert code == -signal.SIGKILL, (tmp_path / f"{victim}.log").read_text()
    with Ledger(state / f"{victim}.ledger.sqlite") as ledger:
        assert ledger.session_report("crash-1") is not None  # it died after the market cleared
    processes[victim] = await _spawn(job(victim), tmp_path / f"{victim}.log")
    codes = {pid: await asyncio.wait_for(p.wait(), EXIT_TIMEOUT_S) for pid, p in processes.items()}

    # THEN every peer finished cleanly, the restarted one by resuming settlement
    logs = {pid: (tmp_path / f"{pid}.log").read_text() for pid in processes}
    assert codes == dict.fromkeys(processes, 0), logs
    # AND both trades are final contracts in both ledgers, byte for byte the same
    records = {}
    for pid in processes:
        with Ledger(state / f"{pid}.ledger.sqlite") as ledger:
            records[pid] = {r.counterparty: r for r in ledger.records("crash-1")}
            rows = audit(ledger.records(), roster)
        assert all(row["check"] == "ok" for row in rows), rows
    assert set(records["s1"]) == {"b1", "b2"}
    for buyer in ("b1", "b2"):
        mine, theirs = records["s1"][buyer], records[buyer]["s1"]
        assert mine.status == theirs.status == "final"
        assert (mine.role, theirs.role) == ("seller", "buyer")
        assert mine.terms_bytes == theirs.terms_bytes
        assert mine.contract == theirs.contract
    # AND no record anywhere is final without both signatures
    for by_counterparty in records.values():
        for record in by_counterparty.values():
            assert record.status != "final" or record.contract is not None
