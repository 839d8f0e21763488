"""Run one peer's market session: the asyncio shell around a mechanism core.

The shell owns time (``loop.time()`` is passed to the core as ``now``), the MQTT
connection and the report; the core owns every decision. Every wait has a deadline:
neighbours not heard from by ``start_timeout_s``, a silent neighbour (the core's
``neighbour_timeout_s``), neighbours' reports after we finish (the same bound), a lost
broker connection (:data:`RECONNECT_S`).

A core that can snapshot itself (ADMM) is journaled write-ahead: after each round it
advances to and before that round's message leaves, its snapshot replaces
``<state_dir>/<peer>.<session>.core.json``. A peer restarted mid-market (no outcome in
its ledger yet) restores the core from it and re-sends its last two rounds instead of
running the start barrier again (docs/faults.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
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
from wattmesh.protocols.evidence import EVIDENCE_TYPE, Equivocation, EquivocationDetector
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
PRESENCE_WAIT_S = 5.0
"""How long a peer waits for a silent neighbour's retained presence before taking it
for never announced (offline) [s]."""
RECONNECT_S = 60.0
"""How long a peer keeps reconnecting to a lost broker [s]. Its market fails anyway once
neighbours are silent for ``neighbour_timeout_s``; this bounds the other waits."""


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
        faults=job.faults, reconnect_s=RECONNECT_S,
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
    journal = _Journal(job.state_dir, job.spec.id, job.session, job.faults)
    report = ledger.session_report(job.session)
    snapshot = journal.load() if report is None else None
    if snapshot is not None:
        core = journal.restore(core, job, snapshot, loop.time())
    for channel in ("market", "report"):
        await conn.subscribe(channel, core.neighbours)
    await conn.announce()
    session = _Session(conn, core, ledger, job.faults, journal)
    resumed = report is not None
    if report is None:
        if journal.restored:
            # neighbours are mid-market: no barrier; re-send what they may be waiting for
            resume = getattr(core, "resume", None)
            assert resume is not None  # a core that restores itself also resumes
            await _send(conn, resume(loop.time()))
        else:
            try:
                early = (early or []) + await _start_barrier(conn, core.neighbours, job.start_timeout_s)
            except TimeoutError as exc:
                return await _fail(conn, f"start: {exc}")
            first = core.start(loop.time(), start_grace_s=job.start_timeout_s)
            journal.record(core)
            await _send(conn, first)
        await session.run_market(early or [])
        if core.failure is not None:
            journal.discard()  # neighbours gave up or we did: nothing left to resume
            return await _fail(conn, core.failure)
        assert core.outcome is not None
        report = core.outcome.to_body()
        ledger.save_session(job.session, job.public.name, job.public.mechanism, report)
        journal.discard()  # the ledger's outcome supersedes it
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

    def __init__(
        self, conn: PeerConnection, core: MarketCore, ledger: Ledger, faults: FaultPlan, journal: _Journal | None = None
    ) -> None:
        self.conn = conn
        self.faults = faults
        self.journal = journal
        self.core = core
        self.ledger = ledger
        self.finished: set[str] = set()
        self.settlement: Settlement | None = None
        self._contract_mail: list[Incoming] = []
        self._market_ran = False
        self.detector = EquivocationDetector()
        self.liars: set[str] = set()
        self._ready_answered: dict[str, float] = {}  # neighbour -> when we last answered its ready
        self._watched: set[str] = set()  # neighbours whose presence topic we subscribed
        self._loop = asyncio.get_running_loop()

    async def run_market(self, early: list[Incoming]) -> None:
        core = self.core
        self._market_ran = True
        while not core.done:
            deadline = core.next_deadline()
            assert deadline is not None
            if self._loop.time() >= deadline:
                # due even while messages keep arriving: receive() only times out on an
                # empty inbox, and a backlog of re-sends (lossy links) never empties it
                await self._tick()
                continue
            if early:
                incoming = early.pop(0)
            else:
                try:
                    incoming = await self.conn.receive(max(0.0, deadline - self._loop.time()))
                except TimeoutError:
                    await self._tick()
                    continue
            await self._dispatch(incoming)

    async def _tick(self) -> None:
        """The core's timer: re-sends, or giving up neighbours gone for good (a round
        completed without them is journaled before its message leaves).

        What is already queued is read first (bounded by the queue's length now): a
        neighbour whose message waits in our own backlog is not silent.
        """
        for _ in range(self.conn.pending):
            if self.core.done:
                return  # the rest is for the settlement and the linger
            queued = self.conn.receive_nowait()
            if queued is None:
                break
            await self._dispatch(queued)
        if self.core.done:
            return
        deaf_until = getattr(self.core, "deaf_until", None)
        if deaf_until is not None:
            # while our own connection was down we heard nobody: not their silence
            deaf_until(self._loop.time() if not self.conn.connected else self.conn.connected_at)
            await self._look_up_presence()
        before = set(getattr(self.core, "excluded", ()))
        outgoing = self.core.on_timer(self._loop.time())
        if gone := sorted(set(getattr(self.core, "excluded", ())) - before):
            logger.warning("%s: %s silent too long, gone for good: going on without them", self.conn.peer_id, gone)
        if self.journal is not None:
            self.journal.record(self.core)
        await _send(self.conn, outgoing)

    async def _look_up_presence(self) -> None:
        """Tell the core which of its long-silent neighbours are offline. Their presence
        topics are subscribed only now, when one falls silent (the retained birth or Will
        answers at once): watching every neighbour from the start costs a subscription
        and a verified birth per link, which a busy broker makes people wait for."""
        silent = self.core.silent_neighbours(self._loop.time())  # type: ignore[attr-defined]
        if new := [j for j in silent if j not in self._watched]:
            self._watched.update(new)
            await self.conn.subscribe("presence", new)
            await self.conn.wait_presence_known(new, PRESENCE_WAIT_S)
        self.core.neighbours_offline({j for j in self._watched if not self.conn.online(j)})  # type: ignore[attr-defined]

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
            if envelope.body.get("answer") is True:
                return  # an answer to someone's barrier ready; answering it would ping-pong
            # A neighbour still at the start barrier. It hears our rounds, unless one was
            # lost (an injected drop, or it restarted before it had a snapshot): a
            # resumable core re-sends them. It may not have heard us at all: our ready can
            # leave before it subscribed, and a peer that only ever answers (a stackelberg
            # follower) sends nothing else on its market topic: answer with a ready of
            # our own, marked as an answer. Both go to its inbox alone, at most once per
            # READY_INTERVAL_S per neighbour: broadcast on our market topic, each answer
            # cost every neighbour a signature check, and at N = 200 on a complete graph
            # the answers to the peers still starting outgrew what two cores can verify.
            sender = envelope.sender
            now = self._loop.time()
            if now - self._ready_answered.get(sender, -READY_INTERVAL_S) < READY_INTERVAL_S:
                return
            self._ready_answered[sender] = now
            resume = getattr(self.core, "resume", None)
            if self._market_ran and incoming.channel == "market" and resume is not None:
                await _send(self.conn, [Outgoing("inbox", o.type, o.body, to=sender) for o in resume(now)])
            await self.conn.publish("inbox", READY_TYPE, {"answer": True}, to=sender)
            return
        if envelope.sender in self.liars:
            self.conn.drops["excluded"] += 1
            return
        if incoming.channel == "market" and incoming.frame:
            proof = self.detector.observe(envelope, incoming.frame)
            if proof is not None:
                await self._expose(proof)
                if envelope.sender in self.liars:
                    return
        if incoming.channel == "report":
            self.finished.add(envelope.sender)
            if self._market_ran and not self.core.done:
                # a core that can go on without gone neighbours must know who left for good
                ended = "neighbour_failed" if envelope.type == FAILED_TYPE else "neighbour_finished"
                notify = getattr(self.core, ended, None)
                if notify is not None:
                    notify(envelope.sender)
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
            await _feed(self.conn, self.core, incoming, self._loop.time(), self.journal)

    async def _expose(self, proof: Equivocation) -> None:
        """A neighbour signed two different messages for one round: publish the proof
        (any roster holder can check it) and, if the core can, stop trading with it."""
        logger.warning(
            "%s: %s equivocated (two signed round messages differ); excluding it", self.conn.peer_id, proof.accused
        )
        await self.conn.publish("telemetry", EVIDENCE_TYPE, proof.to_body())
        exclude = getattr(self.core, "exclude", None)
        if exclude is not None and self._market_ran and not self.core.done:
            self.liars.add(proof.accused)
            await _send(self.conn, exclude(proof.accused, self._loop.time()))

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
    neighbour on its market topic or in our inbox (a started peer answers there) proves
    it subscribed to ours before sending it, so our round-1 message will reach it. This
    relies on no broker feature (retained births proved lossy on amqtt) and costs a few
    small messages while waiting.

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
        if incoming.channel in ("market", "inbox"):
            heard.add(incoming.envelope.sender)
        if incoming.envelope.type != READY_TYPE:
            early.append(incoming)
    return early


async def _feed(
    conn: PeerConnection, core: MarketCore, incoming: Incoming, now: float, journal: _Journal | None = None
) -> None:
    """Hand a verified market message to the core and publish its answer; a message the
    core refuses is counted as a drop, never fatal. A new round is journaled first."""
    try:
        outgoing = core.receive(incoming.envelope, now)
    except ProtocolError as exc:
        conn.drops[exc.reason] += 1
        return
    if journal is not None:
        journal.record(core)
    await _send(conn, outgoing)


class _Journal:
    """Write-ahead snapshots of a resumable core (one with ``snapshot()``, ``restore()``
    and ``resume()``, e.g. :class:`~wattmesh.protocols.admm.AdmmPeer`): one file per peer
    and session, ``<state_dir>/<peer>.<session>.core.json``, replaced at every new round.
    Without a state directory, or for other cores, it only marks the ``market.round``
    crash point.
    """

    def __init__(self, state_dir: Path | None, peer_id: str, session: str, faults: FaultPlan) -> None:
        self.path = None if state_dir is None else state_dir / f"{peer_id}.{session}.core.json"
        self.faults = faults
        self.restored = False
        self._round: int | None = None

    def load(self) -> dict[str, Any] | None:
        """The snapshot left by an earlier run of this session, if any."""
        if self.path is None or not self.path.exists():
            return None
        try:
            snapshot = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:  # atomic replace makes this a foreign file
            logger.warning("%s: ignoring unreadable core snapshot: %s", self.path, exc)
            return None
        if not isinstance(snapshot, dict):
            return None
        return snapshot

    def restore(self, core: MarketCore, job: PeerJob, snapshot: dict[str, Any], now: float) -> MarketCore:
        """``core`` restored from ``snapshot``, or ``core`` itself when it cannot be."""
        restore = getattr(type(core), "restore", None)
        if restore is None:
            return core
        try:
            restored: MarketCore = restore(job.spec, job.public, job.horizon, snapshot, now)
        except ValueError as exc:
            logger.warning("%s: not resuming from %s: %s", job.spec.id, self.path, exc)
            return core
        self.restored = True
        self._round = getattr(restored, "round", None)
        logger.warning(
            "%s: resuming the market of %s at round %s from its snapshot", job.spec.id, job.session, self._round
        )
        return restored

    def record(self, core: MarketCore) -> None:
        """Call after the core ran and before its messages are sent: a core that advanced
        to a new round is snapshotted (write-ahead), then the crash point is passed."""
        round_ = getattr(core, "round", None)
        if round_ is None or round_ == self._round or core.done:
            return
        self._round = round_
        snapshot = getattr(core, "snapshot", None)
        if self.path is not None and snapshot is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(snapshot()))
            # Atomic: a reader sees the old snapshot or the new one, never half of one.
            # No fsync: the crash this guards against is the process dying (kill -9, OOM);
            # the page cache survives that, so the restarted peer reads the complete file.
            # A power cut may lose the latest snapshots: the peer resumes from an older
            # round, catches up if its neighbours are at most one round ahead, and otherwise
            # the session fails on the neighbours' timeouts; never with other trades.
            os.replace(tmp, self.path)
        self.faults.reached("market.round", round=round_)

    def discard(self) -> None:
        """The market ended: its snapshot is of no further use."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


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
