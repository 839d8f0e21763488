"""The ADMM market as real OS processes over real brokers, against the in-memory bus.

``run_scenario`` starts one worker process per peer (or per K peers), each with its own
key, MQTT connection and core. The arithmetic is deterministic and the wire carries
float64 exactly, so the processes must reproduce the in-memory run: same stopping
round, same per-peer figures. When a peer dies for good mid-market, its neighbours
exclude it after their neighbour timeout and the rest clears; the run reports the dead
peer (``RunError``) and still writes the survivors' result.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
from communities import random_community, without_peer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.testing import assert_allclose
from reference import social_optimum

from wattmesh.peer.launcher import RunError, RunOptions, run_scenario
from wattmesh.protocols.memory_bus import BusResult, run_in_memory
from wattmesh.protocols.monitoring import MonitorState
from wattmesh.protocols.scenario import Scenario, parse_scenario

TEN = random_community(10, 3, fee=0.01, name="admm-ten")  # grid 0.30/0.08 and a fee
RUN_TIMEOUT = 60.0  # [s] per run; ten processes start in ~5 s on two cores
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# the result document's keys (DESIGN.md §2)
RESULT_KEYS = {
    "scenario", "mechanism", "converged", "iterations", "social_cost", "grid_only_cost",
    "wall_seconds", "messages", "peers", "trades",
}  # fmt: skip
PEER_KEYS = {"net_demand", "community_import", "grid_import", "payment", "cost"}
TRADE_KEYS = {"buyer", "seller", "kwh", "price"}


def scenario() -> Scenario:
    return parse_scenario(TEN, source="admm-ten")


@cache
def in_memory() -> BusResult:
    s = scenario()
    keys = {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest()) for pid in s.public.peer_ids
    }
    return run_in_memory(s, keys)


def assert_matches_memory_bus(result: dict, path: Path) -> None:
    memory = in_memory().outcomes
    # THEN the processes stopped on the in-memory run's round, converged
    assert result["converged"] is True
    assert result["iterations"] == next(iter(memory.values())).iterations
    assert result["disputes"] == [] and result["missing_peers"] == []
    # AND every peer's figures are the in-memory ones
    assert set(result["peers"]) == set(memory)
    for pid, outcome in memory.items():
        row = result["peers"][pid]
        got = [row[key] for key in sorted(PEER_KEYS)]
        want = [getattr(outcome, key) for key in sorted(PEER_KEYS)]
        assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=pid)
    # AND so is every trade, energy and price
    for trade in result["trades"]:
        kwh, price = memory[trade["buyer"]].trades[trade["seller"]]
        assert_allclose([trade["kwh"], trade["price"]], [kwh, price], rtol=1e-9, atol=1e-12)
    assert len(result["trades"]) == sum(1 for o in memory.values() for kwh, _ in o.trades.values() if kwh > 1e-9)
    # AND the result file on disk is that document, with the DESIGN.md §2 keys
    on_disk = json.loads(path.read_text())
    assert RESULT_KEYS <= set(on_disk) and set(on_disk["messages"]) >= {"published", "bytes"}
    assert all(PEER_KEYS <= set(row) for row in on_disk["peers"].values())
    assert all(TRADE_KEYS <= set(trade) for trade in on_disk["trades"])
    assert on_disk["social_cost"] == result["social_cost"] and on_disk["iterations"] == result["iterations"]
    # AND traffic was counted: at least one round message per peer and round
    assert on_disk["messages"]["published"] >= len(memory) * result["iterations"]
    assert on_disk["messages"]["bytes"] > 0


@pytest.mark.parametrize(
    ("broker", "per_process"),
    [
        pytest.param("mosquitto", 1, marks=pytest.mark.mosquitto, id="mosquitto"),
        pytest.param("embedded", 1, id="embedded"),
        pytest.param("mosquitto", 5, marks=pytest.mark.mosquitto, id="mosquitto-packed-5"),
    ],
)
async def test_ten_processes_reproduce_the_memory_bus(tmp_path: Path, broker: str, per_process: int) -> None:
    # GIVEN a seeded community of ten households with a grid and a fee
    out = tmp_path / "result.json"
    # WHEN it runs as OS processes (one per peer, or five per process) over the broker
    options = RunOptions(broker=broker, out=out, peers_per_process=per_process, timeout_s=RUN_TIMEOUT)
    result = await asyncio.wait_for(run_scenario(scenario(), options), RUN_TIMEOUT + 15)
    # THEN it matches the in-memory run (checks inside)
    assert_matches_memory_bus(result, out)


def _worker_pids() -> list[int]:
    """This test's own worker processes (children running ``wattmesh.peer.worker``)."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = handle.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
        except OSError:
            continue  # exited meanwhile
        if parent == me and b"wattmesh.peer.worker" in command:
            pids.append(int(entry))
    return sorted(pids)


@pytest.mark.mosquitto
async def test_a_peer_killed_for_good_mid_market_is_excluded_and_the_rest_clears(tmp_path: Path) -> None:
    # GIVEN the ten households (complete graph) with a tight tolerance and a 3 s neighbour timeout
    text = random_community(
        10, 3, fee=0.01, name="admm-kill",
        admm="eps_rel = 1e-7\nround_timeout_s = 0.5\nneighbour_timeout_s = 3.0",
    )  # fmt: skip
    killed: dict[str, float] = {}
    went_offline: set[str] = set()

    def watch(monitor: MonitorState, now: float) -> None:
        # WHEN the market is past round 3, one worker process is killed for good (SIGKILL:
        # no goodbye, only the broker's Last Will says it went offline)
        if not killed and monitor.iteration >= 3:
            victim = _worker_pids()[4]
            os.kill(victim, signal.SIGKILL)
            killed["at"] = time.monotonic()
        went_offline.update(p for p, s in monitor.peers.items() if killed and not s.online and not s.finished)

    out = tmp_path / "result.json"
    options = RunOptions(broker="mosquitto", out=out, timeout_s=RUN_TIMEOUT, watch=watch)
    with pytest.raises(RunError) as caught:
        await asyncio.wait_for(run_scenario(parse_scenario(text), options), RUN_TIMEOUT + 15)
    # THEN the run ends soon after the neighbour timeout (3 s + the rest of the market + reports)
    assert killed, "the market never reached round 3"
    assert time.monotonic() - killed["at"] < 3.0 + 20.0
    assert len(went_offline) == 1
    victim = went_offline.pop()
    # AND the error names the dead peer and says the others cleared without it
    message = str(caught.value)
    assert f"1 peer(s) failed, e.g. {victim}:" in message and "the other 9 cleared without them" in message
    # AND the result file holds the nine survivors' market: converged on one round,
    # every one of them excluded the dead peer, no trade or contract with it
    result = json.loads(out.read_text())
    assert result["missing_peers"] == [victim] and victim in result["failed_peers"]
    assert result["converged"] is False and result["disputes"] == []
    assert len(result["peers"]) == 9
    assert all(p["excluded"] == [victim] for p in result["peers"].values())
    assert result["trades"] and all(victim not in (t["buyer"], t["seller"]) for t in result["trades"])
    assert all(t["signed"] for t in result["trades"])
    # AND its social cost is the optimum of the community without the dead peer
    optimum = social_optimum(parse_scenario(without_peer(text, victim))).social_cost
    assert result["social_cost"] == pytest.approx(optimum, rel=1e-3, abs=1e-3)


@pytest.mark.mosquitto
@pytest.mark.parametrize(
    ("example", "name"), [("ten-homes.toml", "ten-homes"), ("producers-consumers.toml", "producers-consumers")]
)
def test_the_command_line_runs_the_examples(tmp_path: Path, example: str, name: str) -> None:
    # GIVEN a shipped example (ten homes; producers and consumers with linear costs)
    out = tmp_path / "result.json"
    # WHEN `wattmesh run` runs it, packed four peers per process
    done = subprocess.run(
        [sys.executable, "-m", "wattmesh.peer.cli", "run", str(EXAMPLES / example),
         "--broker", "mosquitto", "--out", str(out), "--peers-per-process", "4", "--timeout", str(RUN_TIMEOUT)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT + 15,
    )  # fmt: skip
    # THEN it converges, says so, and writes the result file
    assert done.returncode == 0, done.stderr
    assert "converged in" in done.stdout
    result = json.loads(out.read_text())
    assert result["converged"] is True and result["scenario"] == name
    assert result["disputes"] == [] and result["social_cost"] <= result["grid_only_cost"]
