"""The monitor peer: a fixed-width rendering, and watching a real run from outside."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from wattmesh.peer.keys import load_roster
from wattmesh.peer.launcher import RunOptions, run_scenario
from wattmesh.peer.monitor import render_text, watch
from wattmesh.protocols.monitoring import MonitorState
from wattmesh.protocols.scenario import parse_scenario
from wattmesh.protocols.wire import Envelope

sys.path.insert(0, str(Path(__file__).parents[1]))
from communities import random_community


def _status(sender: str, k: int, primal: float, converged: bool, seq: int) -> Envelope:
    body = {"k": k, "primal": primal, "dual": primal / 10, "converged": converged, "price_min": 0.1,
            "price_max": 0.2, "community_import": 0.0, "traded": 1.0, "cost": 1.5}  # fmt: skip
    return Envelope("admm.status", sender, "street", "s1", seq, 0, body)


def test_view_renders_every_figure_at_a_fixed_width() -> None:
    # GIVEN a monitor that has seen two peers' telemetry for two iterations and both reports
    state = MonitorState(expected_peers=2)
    for k in (1, 2):
        for i, peer in enumerate(("a", "b")):
            state.observe("telemetry", _status(peer, k, 10.0**-k, k == 2, 10 * k + i), now=float(k))
    for i, peer in enumerate(("a", "b")):
        report = {"converged": True, "iterations": 2, "cost": 1.25}
        state.observe(
            "report", Envelope("admm.report", peer, "street", "s1", 100 + i, 0, report), now=3.0
        )
    # WHEN it is drawn 80 columns wide
    text = render_text(state.snapshot(now=3.0), width=80)
    # THEN a person reads iteration, residuals, prices, cost, peers, progress and the settled line
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "iteration" in text and " 2" in text
    assert "primal residual" in text and "0.02 kWh" in text  # 2 peers × 1e-2
    assert "0.1000 / 0.1500 / 0.2000" in text
    assert "social cost estimate" in text and "3.0000" in text
    assert "2 finished" in text
    assert "100 %" in text
    assert "market settled: converged at iteration 2, social cost 2.5000" in text


def test_a_malformed_status_is_ignored_not_trusted() -> None:
    state = MonitorState()
    state.observe(
        "telemetry", Envelope("admm.status", "a", "street", "s1", 1, 0, {"k": "x"}), now=0.0
    )
    assert state.history() == []


async def test_monitor_follows_a_real_run_from_outside(tmp_path: Path) -> None:
    # GIVEN a 6-peer community run as processes over Mosquitto
    scenario = parse_scenario(random_community(6, seed=4, name="watched"))
    ready: asyncio.Future[tuple[str, Path]] = asyncio.get_running_loop().create_future()
    options = RunOptions(
        broker="mosquitto", out=tmp_path / "result.json", telemetry=False,
        on_ready=lambda url, roster: ready.set_result((url, roster)),
    )  # fmt: skip
    run = asyncio.create_task(run_scenario(scenario, options))
    url, roster_path = await asyncio.wait_for(ready, 30)
    # WHEN a monitor with its own (throw-away, read-only) key attaches
    screen = io.StringIO()
    state = await watch(
        url, "watched", load_roster(roster_path), Ed25519PrivateKey.generate(),
        expected_peers=6, timeout_s=60, console=Console(file=screen, width=100),
    )  # fmt: skip
    result = await asyncio.wait_for(run, 60)
    # THEN it saw every peer, every iteration up to the end, and the settlement
    snapshot = state.snapshot(now=0.0)
    assert snapshot.settled and snapshot.finished == 6
    assert result["converged"]
    assert state.iteration == result["iterations"]
    history = state.history()
    assert [h.iteration for h in history] == list(range(1, result["iterations"] + 1))
    assert all(h.peers == 6 for h in history)
    assert history[-1].converged_share == pytest.approx(1.0)
    assert history[-1].social_cost == pytest.approx(result["social_cost"], rel=1e-6, abs=1e-9)
    assert "market settled" in screen.getvalue()


def test_the_market_settles_without_a_peer_its_neighbours_excluded() -> None:
    # GIVEN three peers of which c died: a and b report, each having excluded c
    state = MonitorState(expected_peers=3)
    for i, peer in enumerate(("a", "b", "c")):
        state.observe("telemetry", _status(peer, 1, 0.1, False, 10 + i), now=1.0)
    for i, peer in enumerate(("a", "b")):
        report = {"converged": True, "iterations": 9, "cost": 1.0, "excluded": ["c"]}
        state.observe("report", Envelope("admm.report", peer, "street", "s1", 100 + i, 0, report), now=5.0)
    # WHEN the monitor looks
    snapshot = state.snapshot(now=5.0)
    # THEN the market is settled, without c, and the line says so
    assert snapshot.settled and snapshot.finished == 2
    assert snapshot.settled_line == "market settled: converged at iteration 9, social cost 2.0000, without c"


def test_the_market_is_not_settled_while_a_peer_is_neither_reported_nor_excluded() -> None:
    # GIVEN three peers, two reported and excluded nobody
    state = MonitorState(expected_peers=3)
    for i, peer in enumerate(("a", "b")):
        report = {"converged": True, "iterations": 9, "cost": 1.0, "excluded": []}
        state.observe("report", Envelope("admm.report", peer, "street", "s1", 100 + i, 0, report), now=5.0)
    # THEN the third is still awaited
    snapshot = state.snapshot(now=5.0)
    assert not snapshot.settled and snapshot.settled_line is None
