"""``wattmesh peer CONFIG``: one home's long-running peer, trading every interval.

Every interval (``community.interval_s``, aligned to the epoch) the peer reads this
home's net demand for the interval, connects, agrees with whoever is online on the
session's members (:mod:`wattmesh.protocols.membership`), runs the market and the
settlement (:func:`wattmesh.peer.market.run_session`), keeps the contracts in its ledger
and publishes the outcome as a retained, signed ``home.state`` message on its ``state``
topic, so the home's energy manager (or anyone with the roster) can read the agreed
import/export and price. Then it disconnects until the next interval.

A service, not a script: a broker that is down is retried with backoff until the
interval's join window closes (the home then sits this interval out); sequence numbers
and contracts are on disk, so a crash or reboot costs at most the current interval;
SIGTERM ends the current session cleanly (presence says offline, the ledger is closed).
Log lines are plain sentences without timestamps: journald adds its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.peer.connection import BrokerConnectionError, Incoming, PeerConnection, parse_url
from wattmesh.peer.gateway_config import DemandSource, GatewayConfig
from wattmesh.peer.keys import load_private_key, load_roster
from wattmesh.peer.ledger import Ledger
from wattmesh.peer.market import PeerJob, run_session
from wattmesh.peer.sequence import SequenceStore
from wattmesh.protocols.errors import ProtocolError, ScenarioError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.membership import Membership, interval_start, public_digest, session_id
from wattmesh.protocols.scenario import PublicScenario
from wattmesh.protocols.topology import diameter

__all__ = ["STATE_TYPE", "Gateway", "IntervalResult"]

logger = logging.getLogger(__name__)
STATE_TYPE = "home.state"
_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
_START_BARRIER_S = 15.0  # members are all connected already: the barrier only waits for subscriptions


@dataclass(frozen=True, slots=True)
class IntervalResult:
    """What one interval came to for this home."""

    session: str
    status: str  # "traded" | "alone" | "skipped" | "failed"
    detail: str
    report: dict[str, Any] | None = None


class Gateway:
    """The long-running peer of one home."""

    def __init__(self, config: GatewayConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.key: Ed25519PrivateKey = load_private_key(config.key_path)
        self.roster: Roster = load_roster(config.roster_path)
        if config.peer_id not in self.roster:
            raise ScenarioError(config.source, "peer.id", f"{config.peer_id!r} is not in the roster {config.roster_path}")
        if self.roster[config.peer_id].public_bytes_raw() != self.key.public_key().public_bytes_raw():
            raise ScenarioError(config.source, "peer.key", "this key is not the one the roster lists for this peer")
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.sequence = SequenceStore(config.state_dir / f"{config.peer_id}.seq")
        self.ledger = Ledger(config.state_dir / f"{config.peer_id}.ledger.sqlite")
        self.digest = public_digest(config.community_terms)
        self.password = None
        if config.password_file is not None:
            self.password = config.password_file.read_text().strip()
        self._meter: tuple[float, float] | None = None  # (kWh, received at) from the MQTT source

    def close(self) -> None:
        self.ledger.close()

    # ------------------------------------------------------------------ service loop
    async def serve(
        self, *, intervals: int | None = None, stop: asyncio.Event | None = None, not_before: float | None = None
    ) -> list[IntervalResult]:
        """Trade every interval until ``stop`` is set (or ``intervals`` have passed).

        An interval is joined only from its start: a peer that comes up in the middle
        of one waits for the next (it would miss the join window anyway).

        Args:
            not_before: first trade in the interval starting at or after this time [s
                since the epoch]: homes brought up together (a roll-out, a test) all
                start with the same session whatever their start-up times.
        """
        stop = stop or asyncio.Event()
        results: list[IntervalResult] = []
        meter = None
        if self.config.demand.kind == "mqtt":
            meter = asyncio.create_task(self._follow_meter(self.config.demand), name="meter")
        try:
            while intervals is None or len(results) < intervals:
                start = self._next_start()
                if not_before is not None and start < not_before:
                    interval = self.config.interval_s
                    start = interval_start(not_before, interval)
                    start += interval if start < not_before else 0.0
                wait = start - self._clock()
                logger.info("%s: next session %s in %.0f s", self.config.peer_id, session_id(self.config.community, start), wait)
                if not await _wait_until(start, stop, self._clock):
                    break
                result = await self.run_interval(start)
                results.append(result)
                log = logger.warning if result.status == "failed" else logger.info
                log("%s: %s: %s, %s", self.config.peer_id, result.session, result.status, result.detail)
        finally:
            if meter is not None:
                meter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await meter
        return results

    def _next_start(self) -> float:
        now = self._clock()
        interval = self.config.interval_s
        start = interval_start(now, interval)
        # too late for this one's join window (half of it, to leave time for the others' views)
        return start if now <= start + self.config.timing.join_window_s / 2 else start + interval

    # ------------------------------------------------------------------ one interval
    async def run_interval(self, start: float) -> IntervalResult:
        config = self.config
        session = session_id(config.community, start)
        try:
            demand = self._demand(start)
            spec = config.peer_spec(demand)
        except (ScenarioError, ValueError) as exc:
            return IntervalResult(session, "skipped", f"no demand for this interval: {exc}")
        conn = await self._connect(session, start + config.timing.join_window_s)
        if conn is None:
            return IntervalResult(session, "skipped", "broker unreachable during the join window")
        try:
            await conn.subscribe("broadcast", [None])
            members, links, early = await self._membership(conn, start)
            if config.peer_id not in members or len(members) < 2:
                return IntervalResult(session, "alone", f"members agreed: {', '.join(members) or 'none'}")
            public = self._public(spec_public=config.scenario_data(demand).public, members=members, links=links)
            job = PeerJob(
                spec, public, diameter(public.links), config.key_path, self.roster.to_toml(),
                config.url, session, config.state_dir, _START_BARRIER_S,
            )  # fmt: skip
            report = await run_session(conn, job, self.key, self.roster, self.ledger, early)
            if "reason" in report:
                return IntervalResult(session, "failed", str(report["reason"]), report)
            await conn.publish("state", STATE_TYPE, _home_state(session, start, config.interval_s, report), retain=True)
            detail = (
                f"{len(members)} members, net {report['net_demand']:.3f} kWh = community "
                f"{report['community_import']:.3f} + grid {report['grid_import']:.3f}, "
                f"{report['contracts']['final']} contract(s) signed, cost {report['cost']:.4f} "
                f"(grid only {report['grid_only_cost']:.4f})"
            )
            return IntervalResult(session, "traded", detail, report)
        except (BrokerConnectionError, aiomqtt.MqttError) as exc:
            return IntervalResult(session, "failed", f"connection lost: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await conn.__aexit__(None, None, None)

    def _public(
        self, *, spec_public: PublicScenario, members: tuple[str, ...], links: dict[str, tuple[str, ...]]
    ) -> PublicScenario:
        """The session's public scenario: the community terms over the agreed members."""
        fee = float(self.config.community_terms.get("market", {}).get("fee", 0.0))
        fees = {(a, b): fee for a in members for b in links[a] if a < b}
        return PublicScenario(
            spec_public.name, spec_public.mechanism, members, links, fees, spec_public.grid, spec_public.settings
        )

    async def _connect(self, session: str, give_up_at: float) -> PeerConnection | None:
        """An open connection for ``session``, retrying with backoff until ``give_up_at``."""
        config = self.config
        attempt = 0
        while True:
            connection = PeerConnection(
                config.peer_id, self.key, self.roster, community=config.community, session=session, url=config.url,
                sequence=self.sequence, username=config.username, password=self.password, tls=self._tls(),
            )  # fmt: skip
            try:
                await connection.__aenter__()
            except BrokerConnectionError as exc:
                delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                attempt += 1
                if self._clock() + delay > give_up_at:
                    logger.warning("%s: %s; giving up on %s", config.peer_id, exc, session)
                    return None
                logger.warning("%s: %s; retrying in %.0f s", config.peer_id, exc, delay)
                await asyncio.sleep(delay)
                continue
            return connection  # entered: the caller exits it

    def _tls(self) -> Any:
        from wattmesh.broker.security import TlsFiles

        c = self.config
        if c.tls_ca is None:
            return None
        return TlsFiles(c.tls_ca, c.tls_cert, c.tls_key)  # type: ignore[arg-type]

    async def _membership(
        self, conn: PeerConnection, start: float
    ) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]], list[Incoming]]:
        """Run the join/view phase; returns the members and messages that came early."""
        config = self.config
        membership = Membership(config.peer_id, start, self.digest, config.neighbours, config.timing)
        early: list[Incoming] = []
        for item in membership.start(self._clock()):
            await conn.publish(item.channel, item.type, item.body)
        while not membership.done:
            deadline = membership.next_deadline()
            assert deadline is not None
            try:
                incoming = await conn.receive(max(0.0, deadline - self._clock()))
            except TimeoutError:
                for item in membership.on_timer(self._clock()):
                    await conn.publish(item.channel, item.type, item.body)
                continue
            if incoming.envelope.type.startswith("session."):
                try:
                    membership.receive(incoming.envelope, self._clock())
                except ProtocolError as exc:
                    conn.drops[exc.reason] += 1
            else:
                early.append(incoming)
        if membership.foreign:
            logger.warning(
                "%s: %s joined with other community terms (config differs) and cannot trade with us",
                config.peer_id, ", ".join(sorted(membership.foreign)),
            )  # fmt: skip
        assert membership.participants is not None
        return membership.participants, membership.links(), early

    # ------------------------------------------------------------------ inputs
    def _demand(self, start: float) -> float:
        source = self.config.demand
        if source.kind == "value":
            assert source.value is not None
            return source.value
        if source.kind == "csv":
            return source.from_csv(start)
        if self._meter is None:
            raise ValueError(f"nothing received on {source.topic} yet")
        value, received = self._meter
        if self._clock() - received > source.max_age_s:
            raise ValueError(f"the last value on {source.topic} is older than {source.max_age_s:g} s")
        return value

    async def _follow_meter(self, source: DemandSource) -> None:
        """Keep the latest value of the home's MQTT topic (reconnecting with backoff)."""
        own = source.broker is None  # the community broker: log in as this peer
        host, port = parse_url(source.broker or self.config.url)
        attempt = 0
        while True:
            try:
                async with aiomqtt.Client(
                    host, port, username=self.config.username if own else None,
                    password=self.password if own else None,
                    identifier=f"wm-{self.config.community}-{self.config.peer_id}-meter",
                ) as client:  # fmt: skip
                    attempt = 0
                    assert source.topic is not None
                    await client.subscribe(source.topic, qos=1)
                    async for message in client.messages:
                        payload = message.payload
                        try:
                            value = source.parse_mqtt(bytes(payload) if isinstance(payload, bytes | bytearray) else str(payload).encode())
                        except ValueError as exc:
                            logger.warning("%s: ignored a reading on %s: %s", self.config.peer_id, source.topic, exc)
                            continue
                        self._meter = (value, self._clock())
            except aiomqtt.MqttError as exc:
                delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                attempt += 1
                logger.warning("%s: meter topic %s: %s; retrying in %.0f s", self.config.peer_id, source.topic, exc, delay)
                await asyncio.sleep(delay)


def _home_state(session: str, start: float, interval_s: float, report: dict[str, Any]) -> dict[str, Any]:
    """The retained per-home outcome: what the home's energy manager acts on."""
    trades = report["trades"]
    traded = sum(abs(kwh) for kwh, _ in trades.values())
    paid = sum(kwh * price for kwh, price in trades.values())
    return {
        "session": session,
        "interval_start_ms": int(start * 1000),
        "interval_s": interval_s,
        "net_demand_kwh": report["net_demand"],
        "community_import_kwh": report["community_import"],
        "grid_import_kwh": report["grid_import"],
        "payment": report["payment"],
        "average_price": paid / report["community_import"] if abs(report["community_import"]) > 1e-12 else None,
        "traded_kwh": traded,
        "contracts": report["contracts"]["final"],
    }


async def _wait_until(when: float, stop: asyncio.Event, clock: Callable[[], float]) -> bool:
    """Sleep until ``when`` (wall clock) unless ``stop`` is set first; False if stopped."""
    while (remaining := when - clock()) > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(remaining, 60.0))
        if stop.is_set():
            return False
    return not stop.is_set()

