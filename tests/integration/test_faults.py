"""Faults over real Mosquitto: message drops and delays, a peer killed mid-market, a broker restart.

Six households run as worker processes (``python -m wattmesh.peer.worker``, several
peers per process where nobody dies). TCP hides loss, so drops and delays are injected
in each peer's transport adapter (``FaultPlan`` in its job). The ADMM arithmetic does
not depend on timing, and lost round messages are recovered by re-sends, so every
faulty run must end *exactly* where the clean in-memory run ends: same stopping
round, same figures (the acceptance asks for 1e-3 of the social cost; we check 1e-9).

Small re-send timers ([market.admm] round_timeout_s = 0.3 s) keep recovery fast here;
a deployment keeps the default 10 s (docs/faults.md). Every wait below has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.testing import assert_allclose

from wattmesh.broker import BrokerHandle, BrokerProcess
from wattmesh.peer.connection import PeerConnection
from wattmesh.peer.faults import NO_FAULTS, FaultPlan
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.ledger import Ledger
from wattmesh.peer.market import FAILED_TYPE, PeerJob
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter

ADMM = "round_timeout_s = 0.3\nneighbour_timeout_s = 30.0"
RUN_DEADLINE_S = 75.0  # one run, start to last exit; they take 5-25 s on two busy cores
START_TIMEOUT_S = 30.0


def community(name: str) -> Scenario:
    """Six households with a grid and a fee; the clean market stops at round 42."""
    return parse_scenario(random_community(6, 4, fee=0.01, name=name, admm=ADMM), source=name)


def in_memory(scenario: Scenario) -> dict[str, Any]:
    ids = scenario.public.peer_ids
    keys = {pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest()) for pid in ids}
    return dict(run_in_memory(scenario, keys).outcomes)


class Community:
    """Keys, roster and jobs of one scenario run as worker processes in ``tmp``."""

    def __init__(self, scenario: Scenario, url: str, tmp: Path) -> None:
        self.scenario, self.url, self.tmp = scenario, url, tmp
        self.ids = list(scenario.public.peer_ids)
        keys = {pid: generate_key(tmp / "keys" / f"{pid}.key") for pid in self.ids}
        self.roster = write_roster(tmp / "roster.toml", keys)
        self.session = f"{scenario.public.name}-{uuid.uuid4().hex[:6]}"
        self.state = tmp / "state"
        self.processes: dict[str, asyncio.subprocess.Process] = {}  # first peer of a group -> process

    def job(self, pid: str, faults: FaultPlan = NO_FAULTS) -> PeerJob:
        public = self.scenario.public
        return PeerJob(
            self.scenario.peers[pid], public, diameter(public.links), self.tmp / "keys" / f"{pid}.key",
            self.roster.to_toml(), self.url, self.session, self.state, START_TIMEOUT_S, faults,
        )  # fmt: skip

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    async def spawn(self, name: str, jobs: Iterable[PeerJob]) -> asyncio.subprocess.Process:
        with open(self.log(name), "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wattmesh.peer.worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        assert process.stdin is not None
        process.stdin.write(json.dumps([job.to_dict() for job in jobs]).encode())
        await process.stdin.drain()
        process.stdin.close()
        self.processes[name] = process
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name).read_text()}" for name in self.processes)

    async def exit_codes(self, deadline: float) -> dict[str, int]:
        loop = asyncio.get_running_loop()
        try:
            return {
                name: await asyncio.wait_for(p.wait(), max(0.1, deadline - loop.time()))
                for name, p in self.processes.items()
            }
        except TimeoutError:
            for p in self.processes.values():
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            raise AssertionError(f"a run hung past its deadline\n{self.logs()}") from None

    def outcome(self, pid: str) -> dict[str, Any] | None:
        with Ledger(self.state / f"{pid}.ledger.sqlite") as ledger:
            return ledger.session_report(self.session)


@contextlib.asynccontextmanager
async def observer(run: Community, *, telemetry: bool = False) -> AsyncIterator[PeerConnection]:
    """A read-only connection following the peers' reports (and telemetry); it reconnects."""
    key = Ed25519PrivateKey.generate()
    roster = Roster({**{pid: run.roster[pid] for pid in run.ids}, "watcher": key.public_key()})
    connection = PeerConnection(
        "watcher", key, roster, community=run.scenario.public.name, session=run.session, url=run.url,
        read_only=True, reconnect_s=30.0,
    )  # fmt: skip
    async with connection as conn:
        await conn.subscribe_all("report")
        if telemetry:
            await conn.subscribe_all("telemetry")
        yield conn


async def reports(conn: PeerConnection, run: Community, deadline: float) -> dict[str, dict[str, Any]]:
    """Every peer's signed report; a failed session or the deadline fails the test."""
    loop = asyncio.get_running_loop()
    got: dict[str, dict[str, Any]] = {}
    while len(got) < len(run.ids):
        try:
            incoming = await conn.receive(deadline - loop.time())
        except TimeoutError:
            raise AssertionError(f"reports missing from {sorted(set(run.ids) - set(got))}\n{run.logs()}") from None
        if incoming.channel == "report":
            envelope = incoming.envelope
            assert envelope.type != FAILED_TYPE, f"{envelope.sender} failed: {envelope.body}\n{run.logs()}"
            got[envelope.sender] = dict(envelope.body)
    return got


def assert_same_market(got: dict[str, dict[str, Any]], scenario: Scenario) -> None:
    """The reports are the clean in-memory run's: same round, same figures."""
    clean = in_memory(scenario)
    rounds = next(iter(clean.values())).iterations
    assert {r["iterations"] for r in got.values()} == {rounds}
    assert all(r["converged"] for r in got.values())
    social = sum(r["cost"] for r in got.values())
    reference = sum(o.cost for o in clean.values())
    assert abs(social - reference) <= 1e-3 * max(abs(reference), 1.0)  # the acceptance bound
    for pid, outcome in clean.items():  # and in fact the very same floats
        row = got[pid]
        keys = ("net_demand", "community_import", "grid_import", "payment", "cost")
        assert_allclose([row[k] for k in keys], [getattr(outcome, k) for k in keys], rtol=1e-9, atol=1e-12)


@pytest.mark.mosquitto
async def test_ten_percent_drops_and_delays_reach_the_clean_optimum(
    mosquitto_broker: BrokerHandle, tmp_path: Path
) -> None:
    # GIVEN six households, each peer dropping 10 % of the market and inbox messages it
    # receives and holding the rest for 0-20 ms (so some overtake each other)
    scenario = community("drops")
    run = Community(scenario, mosquitto_broker.url, tmp_path)
    plan = FaultPlan(drop_rate=0.1, delay_s=0.02, seed=7)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_DEADLINE_S
    async with observer(run) as conn:
        # WHEN they run, three peers per worker process
        await run.spawn("w0", [run.job(pid, plan) for pid in run.ids[:3]])
        await run.spawn("w1", [run.job(pid, plan) for pid in run.ids[3:]])
        got = await reports(conn, run, deadline)
    codes = await run.exit_codes(deadline)
    # THEN every peer finished, having really lost messages on the way
    assert codes == {"w0": 0, "w1": 0}, run.logs()
    assert sum(r["drops"].get("injected", 0) for r in got.values()) > 20
    # AND the market is the clean run's, and every trade became a signed contract
    assert_same_market(got, scenario)
    assert all(r["contracts"]["final"] == len(r["signed"]) for r in got.values())


@pytest.mark.mosquitto
async def test_a_peer_killed_mid_market_resumes_from_its_snapshot(
    mosquitto_broker: BrokerHandle, tmp_path: Path
) -> None:
    # GIVEN six households, one of which SIGKILLs itself on reaching round 6: its
    # snapshot is on disk, its round-6 message never left
    scenario = community("restart")
    run = Community(scenario, mosquitto_broker.url, tmp_path)
    victim, others = run.ids[2], [pid for pid in run.ids if pid != run.ids[2]]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_DEADLINE_S
    async with observer(run) as conn:
        await run.spawn("others", [run.job(pid) for pid in others])
        dying = await run.spawn(victim, [run.job(victim, FaultPlan(crash_at="market.round", crash_round=6))])
        # WHEN it dies there
        code = await asyncio.wait_for(dying.wait(), RUN_DEADLINE_S)
        assert code == -signal.SIGKILL, run.logs()
        snapshot = json.loads((run.state / f"{victim}.{run.session}.core.json").read_text())
        assert snapshot["round"] == 6 and run.outcome(victim) is None
        # AND is restarted with the same job (and no fault)
        await run.spawn(victim, [run.job(victim)])
        got = await reports(conn, run, deadline)
    codes = await run.exit_codes(deadline)
    # THEN it resumed from round 6 rather than starting over, and every peer finished
    assert codes == {"others": 0, victim: 0}, run.logs()
    assert "resuming the market" in run.log(victim).read_text() and "at round 6" in run.log(victim).read_text()
    # AND its neighbours took its new messages: its sequence numbers kept rising
    assert not any(r["drops"].get("replay") for r in got.values()), got
    # AND the market is the clean run's, bit for bit, and its snapshot is gone
    assert_same_market(got, scenario)
    assert not (run.state / f"{victim}.{run.session}.core.json").exists()


@pytest.mark.mosquitto
async def test_every_peer_finishes_across_a_broker_restart(tmp_path: Path) -> None:
    # GIVEN six households on a Mosquitto we can stop and start again on the same port
    broker = BrokerProcess("mosquitto")
    handle = await asyncio.to_thread(broker.start)
    scenario = community("broker")
    run = Community(scenario, handle.url, tmp_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_DEADLINE_S
    restarted = BrokerProcess("mosquitto", port=handle.port)
    try:
        async with observer(run, telemetry=True) as conn:
            await run.spawn("w0", [run.job(pid) for pid in run.ids[:3]])
            await run.spawn("w1", [run.job(pid) for pid in run.ids[3:]])
            # WHEN the market is past round 3, the broker stops (every connection drops,
            # with the messages in flight and everything retained) and starts again
            while True:
                incoming = await conn.receive(deadline - loop.time())
                if incoming.channel == "telemetry" and incoming.envelope.body.get("k", 0) >= 3:
                    stopped_at = incoming.envelope.body["k"]
                    break
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(restarted.start)
            got = await reports(conn, run, deadline)
        codes = await run.exit_codes(deadline)
    finally:
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(restarted.stop)
    # THEN every peer reconnected (re-subscribed, re-announced) and finished
    assert codes == {"w0": 0, "w1": 0}, run.logs()
    logs = run.logs()
    assert logs.count("reconnected after") >= len(run.ids), logs
    assert stopped_at < min(r["iterations"] for r in got.values()) - 5  # it really was mid-market
    # AND the market is the clean run's
    assert_same_market(got, scenario)


# ------------------------------------------------------------------ the transport adapter alone
@pytest.mark.mosquitto
async def test_injected_drops_are_counted_and_reproducible(mosquitto_broker: BrokerHandle) -> None:
    # GIVEN a receiver that drops 30 % of market messages, with a fixed seed
    key_a, key_b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    roster = Roster({"a": key_a.public_key(), "b": key_b.public_key()})
    kept: list[list[int]] = []
    for _ in range(2):
        where = {"community": f"drops-{uuid.uuid4().hex[:8]}", "session": "s", "url": mosquitto_broker.url}
        b = PeerConnection("b", key_b, roster, **where, faults=FaultPlan(drop_rate=0.3, seed=11))
        a = PeerConnection("a", key_a, roster, **where)
        async with a, b:
            await b.subscribe("market", ["a"])
            await b.subscribe("presence", ["a"])
            await a.announce()
            await b.wait_online(["a"], 5.0)  # presence is never dropped
            # WHEN a publishes 100 numbered messages, then a last one b keeps waiting for
            for k in range(100):
                await a.publish("market", "admm.round", {"k": k})
            got: list[int] = []
            while len(got) + b.drops["injected"] < 100:
                got.append((await b.receive(5.0)).envelope.body["k"])
            # THEN what b did not drop arrives in order and the rest is counted
            assert got == sorted(got) and b.drops["injected"] == 100 - len(got)
            assert 15 <= b.drops["injected"] <= 45
            kept.append(got)
    # AND the same seed drops the same messages
    assert kept[0] == kept[1]


@pytest.mark.mosquitto
async def test_a_connection_reconnects_resubscribes_and_reannounces(tmp_path: Path) -> None:
    # GIVEN two peers with reconnection on a broker that will restart on its port
    broker = BrokerProcess("mosquitto")
    handle = await asyncio.to_thread(broker.start)
    restarted = BrokerProcess("mosquitto", port=handle.port)
    key_a, key_b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    roster = Roster({"a": key_a.public_key(), "b": key_b.public_key()})
    try:
        connect = {"community": "reconnect", "session": "s", "url": handle.url, "reconnect_s": 20.0}
        async with (
            PeerConnection("a", key_a, roster, **connect) as a,
            PeerConnection("b", key_b, roster, **connect) as b,
        ):
            await b.subscribe("market", ["a"])
            await b.subscribe("presence", ["a"])
            await a.announce()
            await b.wait_online(["a"], 5.0)
            # WHEN the broker restarts (retained births gone, subscriptions gone)
            await asyncio.to_thread(broker.stop)
            publishing = asyncio.create_task(a.publish("market", "admm.round", {"k": 1}))
            await asyncio.to_thread(restarted.start)
            # THEN a's publish waited for the new connection and b, re-subscribed, gets it
            await asyncio.wait_for(publishing, 20.0)
            incoming = await b.receive(20.0)
            assert incoming.envelope.body == {"k": 1}
            # AND a announced itself again: a newcomer finds its birth retained on the new broker
            async with PeerConnection("c", key_b, roster, **connect, read_only=True) as c:
                await c.subscribe("presence", ["a"])
                await c.wait_online(["a"], 20.0)
            assert a.reconnects == b.reconnects == 1
            assert not b.drops.get("replay")
    finally:
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(restarted.stop)


def test_a_fault_plan_travels_in_the_job_and_validates() -> None:
    plan = FaultPlan(crash_at="market.round", crash_round=4, drop_rate=0.1, delay_s=0.05, seed=3)
    assert FaultPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert FaultPlan.from_dict({"crash_at": "market.cleared"}) == FaultPlan(crash_at="market.cleared")
    assert replace(plan, crash_at=None, crash_round=None).disturbs_messages
    assert not NO_FAULTS.disturbs_messages
    for bad in (
        {"crash_at": "market.round"}, {"crash_round": 2}, {"drop_rate": 1.0}, {"drop_rate": -0.1},
        {"delay_s": -1.0}, {"crash_at": "nowhere"}, {"crash_at": "market.round", "crash_round": 0},
    ):  # fmt: skip
        with pytest.raises(ValueError):
            FaultPlan(**bad)
    # two peers sharing a plan draw different streams; one peer always the same
    assert plan.random("a").random() != plan.random("b").random()
    assert plan.random("a").random() == plan.random("a").random()
