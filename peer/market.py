"""Run one peer's market session: the asyncio shell around a mechanism core.

The shell owns time (``loop.time()`` is passed to the core as ``now``), the MQTT
connection and the report; the core owns every decision. Every wait has a deadline:
neighbours not heard from by ``start_timeout_s``, a silent neighbour (the core's
``neighbour_timeout_s``), neighbours' reports after we finish (the same bound).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattmesh.peer.connection import Incoming, PeerConnection
from wattmesh.peer.keys import load_private_key
from wattmesh.peer.sequence import SequenceStore
from wattmesh.protocols.errors import ProtocolError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import MarketCore, Outgoing, create_core
from wattmesh.protocols.scenario import PeerSpec, PublicScenario

__all__ = ["PeerJob", "run_peer"]

logger = logging.getLogger(__name__)
READY_TYPE = "market.ready"
READY_INTERVAL_S = 1.0
READY_MAX_INTERVAL_S = 8.0
FAILED_TYPE = "session.failed"


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(), "public": self.public.to_dict(), "horizon": self.horizon,
            "key_path": str(self.key_path), "roster_toml": self.roster_toml, "url": self.url,
            "session": self.session, "state_dir": None if self.state_dir is None else str(self.state_dir),
            "start_timeout_s": self.start_timeout_s,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeerJob:
        return cls(
            PeerSpec.from_dict(d["spec"]), PublicScenario.from_dict(d["public"]), d["horizon"],
            Path(d["key_path"]), d["roster_toml"], d["url"], d["session"],
            None if d["state_dir"] is None else Path(d["state_dir"]), d["start_timeout_s"],
        )  # fmt: skip


async def run_peer(job: PeerJob) -> dict[str, Any]:
    """Connect, wait for the neighbours, run the market to its end, publish the report.

    Returns:
        The report body this peer signed and published.
    """
    core = create_core(job.spec, job.public, job.horizon)
    roster = Roster.from_toml(job.roster_toml)
    sequence = SequenceStore(None if job.state_dir is None else job.state_dir / f"{job.spec.id}.seq")
    loop = asyncio.get_running_loop()
    connection = PeerConnection(
        job.spec.id, load_private_key(job.key_path), roster,
        community=job.public.name, session=job.session, url=job.url, sequence=sequence,
    )  # fmt: skip
    async with connection as conn:
        for channel in ("market", "report"):
            await conn.subscribe(channel, core.neighbours)
        await conn.announce()
        try:
            early = await _start_barrier(conn, core.neighbours, job.start_timeout_s)
        except TimeoutError as exc:
            return await _fail(conn, f"start: {exc}")
        await _send(conn, core.start(loop.time(), start_grace_s=job.start_timeout_s))
        finished: set[str] = set()
        while not core.done:
            deadline = core.next_deadline()
            assert deadline is not None
            if early:
                incoming = early.pop(0)
            else:
                try:
                    incoming = await conn.receive(max(0.0, deadline - loop.time()))
                except TimeoutError:
                    await _send(conn, core.on_timer(loop.time()))
                    continue
            if incoming.envelope.type == READY_TYPE:
                continue  # a neighbour still waiting at the start barrier; it hears our rounds
            if incoming.channel == "report":
                finished.add(incoming.envelope.sender)
                continue
            await _feed(conn, core, incoming, loop.time())
        if core.failure is not None:
            return await _fail(conn, core.failure)
        assert core.outcome is not None
        report = core.outcome.to_body()
        report["messages"] = conn.published + 1  # + this report
        report["bytes"] = conn.bytes_published
        report["drops"] = dict(conn.drops)
        await conn.publish("report", f"{job.public.mechanism}.report", report)
        # Linger until every neighbour has reported too: one of them may still need a
        # re-send of our last round. Bounded by the neighbour timeout.
        linger_until = loop.time() + core.linger_s
        while finished < set(core.neighbours) and loop.time() < linger_until:
            try:
                incoming = await conn.receive(linger_until - loop.time())
            except TimeoutError:
                break
            if incoming.channel == "report":
                finished.add(incoming.envelope.sender)
            elif incoming.channel in ("market", "inbox"):
                await _feed(conn, core, incoming, loop.time())
        return report


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
        if item.channel in ("market", "telemetry"):
            await conn.publish(item.channel, item.type, item.body)
        elif item.channel == "inbox":
            await conn.publish("inbox", item.type, item.body, to=item.to)
        # the core's own report is published by run_peer with the traffic counters


async def _fail(conn: PeerConnection, reason: str) -> dict[str, Any]:
    logger.error("%s: session failed: %s", conn.peer_id, reason)
    body = {"reason": reason, "drops": dict(conn.drops)}
    await conn.publish("report", FAILED_TYPE, body)
    return body
