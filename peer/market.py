"""Run one peer's market session: the asyncio shell around a mechanism core.

The shell owns time (``loop.time()`` is passed to the core as ``now``), the MQTT
connection and the report; the core owns every decision. Every wait has a deadline:
neighbours not heard from by ``start_timeout_s``, a silent neighbour (the core's
``neighbour_timeout_s``), neighbours' reports after we finish (the same bound).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.peer.connection import Incoming, PeerConnection
from wattmesh.peer.faults import NO_FAULTS, FaultPlan
from wattmesh.peer.keys import load_private_key
from wattmesh.peer.ledger import Ledger
from wattmesh.peer.sequence import SequenceStore
from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import MarketCore, Outgoing, create_core
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.settlement import Settlement, SettlementStep

__all__ = ["PeerJob", "run_peer", "run_session"]

logger = logging.getLogger(__name__)
READY_TYPE = "market.ready"
READY_INTERVAL_S = 1.0
READY_MAX_INTERVAL_S = 8.0
FAILED_TYPE = "session.failed"
CONTRACT_PREFIX = "contract."


@dataclass(frozen=True, slots=True)
class PeerJob:
    """Everything one peer needs for one session. Only its own ``spec`` is private."""

    spec: PeerSpec
    public: PublicScenario
    horizon: int
    key_path: Path
    roster_toml: str
    url: str
    session: str
    state_dir: Path | None = None
    start_timeout_s: float = 60.0
    faults: FaultPlan = NO_FAULTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(), "public": self.public.to_dict(), "horizon": self.horizon,
            "key_path": str(self.key_path), "roster_toml": self.roster_toml, "url": self.url,
            "session": self.session, "state_dir": None if self.state_dir is None else str(self.state_dir),
            "start_timeout_s": self.start_timeout_s, "faults": self.faults.to_dict(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeerJob:
        return cls(
            PeerSpec.from_dict(d["spec"]), PublicScenario.from_dict(d["public"]), d["horizon"],
            Path(d["key_path"]), d["roster_toml"], d["url"], d["session"],
            None if d["state_dir"] is None else Path(d["state_dir"]), d["start_timeout_s"],
            FaultPlan.from_dict(d.get("faults", {})),
        )  # fmt: skip


async def run_peer(job: PeerJob) -> dict[str, Any]:
    """Connect, wait for the neighbours, run the market, sign contracts, publish the report.

    A peer restarted after its market cleared (the ledger holds the session's outcome)
    skips the market and resumes settlement from its ledger.

    Returns:
        The report body this peer signed and published.
    """
    roster = Roster.from_toml(job.roster_toml)
    key = load_private_key(job.key_path)
    state = job.state_dir
    sequence = SequenceStore(None if state is None else state / f"{job.spec.id}.seq")
    connection = PeerConnection(
        job.spec.id, key, roster, community=job.public.name, session=job.session, url=job.url, sequence=sequence,
    )  # fmt: skip
    with Ledger(Path(":memory:") if state is None else state / f"{job.spec.id}.ledger.sqlite") as ledger:
        async with connection as conn:
            return await run_session(conn, job, key, roster, ledger)


async def run_session(
    conn: PeerConnection, job: PeerJob, key: Ed25519PrivateKey, roster: Roster, ledger: Ledger,
    early: list[Incoming] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One market session over an open connection: subscribe, start barrier, market,
    settlement, report, linger. ``early`` holds messages a caller already read.

    Returns:
        The report body this peer published (``reason`` in it when the session failed).
    """
    loop = asyncio.get_running_loop()
    core = create_core(job.spec, job.public, job.horizon)
    for channel in ("market", "report"):
        await conn.subscribe(channel, core.neighbours)
    await conn.announce()
    session = _Session(conn, core, ledger, job.faults)
    report = ledger.session_report(job.session)
    resumed = report is not None
    if report is None:
        try:
            early = (early or []) + await _start_barrier(conn, core.neighbours, job.start_timeout_s)
        except TimeoutError as exc:
            return await _fail(conn, f"start: {exc}")
        await _send(conn, core.start(loop.time(), start_grace_s=job.start_timeout_s))
        await session.run_market(early)
        if core.failure is not None:
            return await _fail(conn, core.failure)
        assert core.outcome is not None
        report = core.outcome.to_body()
        ledger.save_session(job.session, job.public.name, job.public.mechanism, report)
        job.faults.reached("market.cleared")
    else:
        logger.info("%s: market of %s already cleared here; resuming settlement", job.spec.id, job.session)
    trades = {j: (float(kwh), float(price)) for j, (kwh, price) in report["trades"].items()}
    settlement = Settlement(
        job.spec.id, key, roster, community=job.public.name, session=job.session, trades=trades,
        records=ledger.records(job.session),
    )  # fmt: skip
    await session.settle(settlement)
    report["contracts"] = settlement.counts()
    report["signed"] = sorted(j for j, r in settlement.records.items() if r.status == "final")
    report["messages"] = conn.published + 1  # + this report
    report["bytes"] = conn.bytes_published
    report["drops"] = dict(conn.drops)
    await conn.publish("report", f"{job.public.mechanism}.report", report)
    if not resumed:  # a resumed peer has no market state a neighbour could still need
        await session.linger(settlement)
    return report


class _Session:
    """The receive loop of one peer's session: market, settlement, then lingering.

    Every incoming message goes where it belongs whatever the phase: market rounds to
    the core (which re-sends to a neighbour that is behind), ``contract.*`` to the
    settlement (kept until it starts), neighbours' reports to the finished set.
    """

    def __init__(self, conn: PeerConnection, core: MarketCore, ledger: Ledger, faults: FaultPlan) -> None:
        self.conn = conn
        self.faults = faults
        self.core = core
        self.ledger = ledger
        self.finished: set[str] = set()
        self.settlement: Settlement | None = None
        self._contract_mail: list[Incoming] = []
        self._market_ran = False
        self._loop = asyncio.get_running_loop()

    async def run_market(self, early: list[Incoming]) -> None:
        core = self.core
        self._market_ran = True
        while not core.done:
            deadline = core.next_deadline()
            assert deadline is not None
            if early:
                incoming = early.pop(0)
            else:
                try:
                    incoming = await self.conn.receive(max(0.0, deadline - self._loop.time()))
                except TimeoutError:
                    await _send(self.conn, core.on_timer(self._loop.time()))
                    continue
            await self._dispatch(incoming)

    async def settle(self, settlement: Settlement) -> None:
        """Sign every trade's contract; ends when none is open (each has a deadline)."""
        self.settlement = settlement
        await self._apply(settlement.start(_now_ms()))
        for incoming in self._contract_mail:
            await self._dispatch(incoming)
        self._contract_mail.clear()
        while not settlement.done:
            await self._step(settlement)

    async def linger(self, settlement: Settlement) -> None:
        """Stay until every neighbour has reported (one may still need a re-send of our
        last round, or our countersignature again), bounded by the core's linger time."""
        until = self._loop.time() + self.core.linger_s
        while self.finished < set(self.core.neighbours) and self._loop.time() < until:
            if not await self._step(settlement, until):
                break

    async def _step(self, settlement: Settlement, until: float | None = None) -> bool:
        """Wait for one message or the settlement's next deadline; False on timeout."""
        deadline_ms = settlement.next_deadline()
        waits = [] if deadline_ms is None else [max(0.0, (deadline_ms - _now_ms()) / 1000)]
        if until is not None:
            waits.append(max(0.0, until - self._loop.time()))
        try:
            incoming = await self.conn.receive(min(waits, default=None))
        except TimeoutError:
            await self._apply(settlement.on_timer(_now_ms()))
            return until is None or self._loop.time() < until
        await self._dispatch(incoming)
        return True

    async def _dispatch(self, incoming: Incoming) -> None:
        envelope = incoming.envelope
        if envelope.type == READY_TYPE:
            return  # a neighbour still at the start barrier; it hears our rounds
        if incoming.channel == "report":
            self.finished.add(envelope.sender)
        elif envelope.type.startswith(CONTRACT_PREFIX):
            if self.settlement is None:
                self._contract_mail.append(incoming)
                return
            try:
                step = self.settlement.receive(envelope, _now_ms())
            except ProtocolError as exc:
                self.conn.drops[exc.reason] += 1
                logger.warning("%s: contract message refused: %s", self.conn.peer_id, exc)
                return
            await self._apply(step)
        elif incoming.channel in ("market", "inbox") and self._market_ran:
            # (a peer resumed after a restart never ran its core: nothing to answer with)
            await _feed(self.conn, self.core, incoming, self._loop.time())

    async def _apply(self, step: SettlementStep) -> None:
        """Write-ahead: records are durable before any message about them leaves."""
        self.ledger.write(step.records)
        if any(r.status == "final" for r in step.records):
            self.faults.reached("contract.recorded")
        await _send(self.conn, step.outgoing)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _start_barrier(conn: PeerConnection, neighbours: tuple[str, ...], timeout: float) -> list[Incoming]:
    """Wait until every neighbour is listening; return what arrived early, in order.

    Each peer publishes ``market.ready`` on its market topic once subscribed, and again
    after 1, 2, 4, 8, 8 … s until it has heard from every neighbour. Hearing anything from a
    neighbour on its market topic proves it subscribed to ours before sending it, so
    our round-1 message will reach it. This relies on no broker feature (retained
    births proved lossy on amqtt) and costs a few small messages while waiting.

    Raises:
        TimeoutError: naming the neighbours never heard from.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    heard: set[str] = set()
    early: list[Incoming] = []
    next_ready = loop.time()
    interval = READY_INTERVAL_S
    while missing := sorted(set(neighbours) - heard):
        now = loop.time()
        if now >= deadline:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise TimeoutError(f"{len(missing)} neighbour(s) not heard from after {timeout:g} s: {shown}")
        if now >= next_ready:
            await conn.publish("market", READY_TYPE, {})
            next_ready = now + interval
            # back off: with ~200 neighbours, one ready a second each is more signature
            # checks than two cores can do, and the backlog would only grow
            interval = min(2 * interval, READY_MAX_INTERVAL_S)
        try:
            incoming = await conn.receive(min(next_ready, deadline) - now)
        except TimeoutError:
            continue
        if incoming.channel == "market":
            heard.add(incoming.envelope.sender)
        if incoming.envelope.type != READY_TYPE:
            early.append(incoming)
    return early


async def _feed(conn: PeerConnection, core: MarketCore, incoming: Incoming, now: float) -> None:
    """Hand a verified market message to the core and publish its answer; a message the
    core refuses is counted as a drop, never fatal."""
    try:
        outgoing = core.receive(incoming.envelope, now)
    except ProtocolError as exc:
        conn.drops[exc.reason] += 1
        return
    await _send(conn, outgoing)


async def _send(conn: PeerConnection, items: list[Outgoing]) -> None:
    for item in items:
        if item.channel in ("market", "telemetry", "broadcast"):
            await conn.publish(item.channel, item.type, item.body)
        elif item.channel == "inbox":
            await conn.publish("inbox", item.type, item.body, to=item.to)
        # the core's own report is published by run_peer with the traffic counters


async def _fail(conn: PeerConnection, reason: str) -> dict[str, Any]:
    logger.error("%s: session failed: %s", conn.peer_id, reason)
    body = {"reason": reason, "drops": dict(conn.drops)}
    await conn.publish("report", FAILED_TYPE, body)
    return body
