"""One peer's MQTT connection: signed publish, verified receive, presence, drop counters.

Topic layout (docs/wire.md "Topics")::

    wattmesh/v1/<community>/presence/<peer>   retained birth; the Last Will says offline
    wattmesh/v1/<community>/inbox/<peer>      directed messages to <peer>
    wattmesh/v1/<community>/market/<peer>     <peer>'s round messages, read by neighbours
    wattmesh/v1/<community>/broadcast         community-wide messages
    wattmesh/v1/<community>/telemetry/<peer>  per-round status for monitors
    wattmesh/v1/<community>/report/<peer>     <peer>'s signed final report of a session

Each topic has its own :class:`~wattmesh.protocols.wire.Verifier`, because MQTT
orders messages per topic only; a sender's sequence numbers rise across all its
messages, so they also rise within each topic.

Faults (docs/faults.md): with a :class:`~wattmesh.peer.faults.FaultPlan` that drops or
delays, each verified incoming market or inbox message is dropped with the plan's
probability (``drops["injected"]``) or held for a random delay before it is queued.
Injecting here, after verification, is what a lossy network would look like to the
protocol if TCP did not retransmit.

Reconnection (``reconnect_s > 0``): a lost connection is re-established with backoff
(0.05 s doubling to 2 s) for up to ``reconnect_s`` seconds. The new connection registers
a fresh Will, re-subscribes every topic subscribed so far and re-publishes the
retained birth if the peer had announced itself. Meanwhile :meth:`receive` waits as
usual and :meth:`publish` waits for the connection (within the same deadline); a
publish cut off in flight is published again once the connection is back (at least
once: a copy the broker had already relayed is refused by the receiver as a replay).
Whatever others published while this peer was away is lost; the protocols' own
re-sends recover it. Past the deadline :meth:`receive` and :meth:`publish` raise
:class:`BrokerConnectionError`. With ``reconnect_s = 0`` (the default) a lost connection
raises at once, as a monitor or a test cutting the link wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.broker.security import TlsFiles
from wattmesh.peer.faults import FAULT_CHANNELS, FaultPlan
from wattmesh.peer.sequence import SequenceStore
from wattmesh.protocols.errors import ProtocolError, WattmeshError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import Envelope, Verifier, encode

__all__ = ["CHANNELS", "BrokerConnectionError", "Incoming", "PeerConnection", "Topics", "parse_url"]

logger = logging.getLogger(__name__)

CHANNELS = ("presence", "inbox", "market", "broadcast", "telemetry", "report", "state")
_QOS = {"presence": 1, "inbox": 1, "market": 1, "broadcast": 1, "telemetry": 0, "report": 1, "state": 1}
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle costs ~40 ms per round trip
_ACK_TIMEOUT_S = 60.0  # an operation waits this long for its ack: amqtt on a busy 2-core host took >10 s
_RECONNECT_FIRST_S = 0.05  # backoff between reconnection attempts: doubles up to _RECONNECT_MAX_S
_RECONNECT_MAX_S = 2.0


class BrokerConnectionError(WattmeshError):
    """The broker could not be reached or dropped the connection."""


_TLS_SCHEMES = ("mqtts", "ssl")


def _lie(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The equivocation drill's second version of a round body: ADMM trades (``t``) or a
    negotiation quote (``qty``) raised; None for a body it has nothing to change in."""
    if isinstance(body.get("t"), dict):
        return {**body, "t": {j: 2.0 * float(t) + 0.5 for j, t in body["t"].items()}}
    if isinstance(body.get("qty"), float):
        return {**body, "qty": 2.0 * body["qty"] + 0.5}
    return None


def parse_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (or ``host:port``, or ``mqtts://host:port`` for TLS) -> (host, port).

    The port defaults to 1883, or 8883 for ``mqtts``.
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp", *_TLS_SCHEMES) or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    return parts.hostname, parts.port or (8883 if parts.scheme in _TLS_SCHEMES else 1883)


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one community."""

    community: str

    @property
    def root(self) -> str:
        return f"wattmesh/v1/{self.community}"

    def of(self, channel: str, peer_id: str | None = None) -> str:
        if channel == "broadcast":
            return f"{self.root}/broadcast"
        if channel not in CHANNELS or peer_id is None:
            raise ValueError(f"channel {channel!r} needs a peer id")
        return f"{self.root}/{channel}/{peer_id}"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """topic -> (channel, peer id in the topic or None for broadcast)."""
        parts = topic.split("/")
        if parts[:3] != ["wattmesh", "v1", self.community]:
            raise ValueError(topic)
        if parts[3:] == ["broadcast"]:
            return "broadcast", None
        if len(parts) == 5 and parts[3] in CHANNELS:
            return parts[3], parts[4]
        raise ValueError(topic)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A verified message, the channel it arrived on, and its signed frame (evidence)."""

    channel: str
    envelope: Envelope
    frame: bytes = b""


@dataclass(slots=True)
class _Presence:
    online: dict[str, bool] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class PeerConnection:
    """An async context manager owning one MQTT connection of one peer.

    On enter it connects with a signed Last Will (offline) registered and
    subscribes to its own inbox; :meth:`announce` publishes the retained birth once
    every other subscription is in place, so whoever sees a peer online knows it is
    listening. Incoming frames are verified per channel; every refused frame is
    counted in :attr:`drops` by reason and logged once per (reason, sender).
    """

    def __init__(
        self,
        peer_id: str,
        key: Ed25519PrivateKey,
        roster: Roster,
        *,
        community: str,
        session: str | None,
        url: str,
        sequence: SequenceStore | None = None,
        clock: Any = time.time,
        read_only: bool = False,
        max_pending: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | TlsFiles | None = None,
        faults: FaultPlan | None = None,
        reconnect_s: float = 0.0,
    ) -> None:
        """
        Args:
            session: the market session whose messages are accepted; ``None`` accepts
                any session (monitors). A read-only connection needs no session.
            read_only: an observer (launcher, monitor): no Last Will, no presence,
                :meth:`publish` refuses.
            max_pending: bound on verified messages waiting to be read (0: unbounded);
                beyond it new ones are dropped and counted as ``overflow``, so a slow
                consumer (a terminal) never makes the connection fall behind.
            username: broker login (docs/security.md); defaults to ``peer_id`` when a
                ``password`` is given. A secured Mosquitto also makes it the MQTT
                client id, whatever this connection asks for.
            password: broker password (``wattmesh broker --secure`` writes one per peer).
            tls: connect over TLS: an ``SSLContext``, or the CA, certificate and key
                files of this peer (``wattmesh ca issue``); a broker that takes the
                identity from the certificate needs no password. An ``mqtts://`` URL
                without ``tls`` uses the system's trusted CAs.
            faults: drops and delays to inject into incoming market and inbox messages
                (tests, benchmarks and drills; ``None`` injects nothing).
            reconnect_s: how long to keep reconnecting after the connection is lost [s];
                0 = never (a lost connection raises :class:`BrokerConnectionError`).
        """
        if session is None and not read_only:
            raise ValueError("a connection that publishes needs a session")
        if username is None and password is not None:
            username = peer_id
        if not reconnect_s >= 0:
            raise ValueError("reconnect_s must be >= 0")
        self.peer_id = peer_id
        self.session = session
        self.community = community
        self.topics = Topics(community)
        self._key = key
        self._roster = roster
        self._host, self._port = parse_url(url)
        self._username, self._password = username, password
        if isinstance(tls, TlsFiles):
            tls = tls.client_context()
        elif tls is None and urlsplit(url).scheme in _TLS_SCHEMES:
            tls = ssl.create_default_context()
        self._tls = tls
        self._sequence = sequence or SequenceStore(None)
        self._clock = clock
        self._verifiers: dict[tuple[str, str | None], Verifier] = {}  # see _verifier()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        # what a new connection must restore: topic -> QoS (in subscription order), the birth
        self._subscriptions: dict[str, int] = {self.topics.of("inbox", peer_id): _QOS["inbox"]}
        self._announced = False
        self._reconnect_s = reconnect_s
        self._up = asyncio.Event()  # set while a connection is established
        self._lost = asyncio.Event()  # set when the current connection is gone (one per connection)
        self._closing = False
        self._faults = faults if faults is not None and faults.disturbs_messages else None
        self._lie_round = None if faults is None else faults.equivocate_round
        self._fault_random = None if self._faults is None else self._faults.random(peer_id)
        self._held: set[asyncio.TimerHandle] = set()  # delayed deliveries
        self._inbox: asyncio.Queue[Incoming] = asyncio.Queue(max_pending)
        self._read_only = read_only
        self._presence = _Presence()
        self._logged: set[tuple[str, str | None]] = set()
        self.drops: Counter[str] = Counter()
        self.published = 0
        self.bytes_published = 0
        self.received = 0
        self.reconnects = 0
        self.connected_at = 0.0  # loop time of the latest (re)connection

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> PeerConnection:
        await self._open(_ACK_TIMEOUT_S)
        self._reader = asyncio.create_task(self._read(), name=f"reader-{self.peer_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True  # no reconnection, no re-publishing from here on
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for handle in self._held:
            handle.cancel()
        self._held.clear()
        if self._client is not None and not self._read_only:
            with contextlib.suppress(Exception):
                # a clean goodbye: the broker discards the Will, so say offline ourselves
                await self.publish("presence", "presence", {"online": False}, retain=True)
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)

    async def _open(self, timeout: float) -> None:
        """Connect a new MQTT client: Will registered, every subscription so far in place,
        the birth re-published if this peer had announced itself.

        Raises:
            BrokerConnectionError: the broker refused or did not answer within ``timeout``.
        """
        # The birth is published after connecting but takes the lower number, so on the
        # presence topic birth < will < any later goodbye, as replay protection needs;
        # a reconnection takes two new numbers, above every frame sent before.
        will = None
        if not self._read_only:
            self._birth_seq = self._sequence.next()
            will_frame = self._frame("presence", {"online": False}, seq=self._sequence.next())
            will = aiomqtt.Will(self.topics.of("presence", self.peer_id), will_frame, qos=1, retain=True)
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=f"wm-{self.community}-{self.peer_id}",
            username=self._username,
            password=self._password,
            tls_context=self._tls,
            will=will,
            clean_session=True,
            socket_options=[_NODELAY],
            keepalive=30,
            timeout=min(timeout, _ACK_TIMEOUT_S),
        )
        scheme = "mqtt" if self._tls is None else "mqtts"
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise BrokerConnectionError(f"cannot connect to {scheme}://{self._host}:{self._port}: {exc}") from None
        client.timeout = _ACK_TIMEOUT_S
        # aiomqtt 2.5 can set "Unexpected disconnection" (code 128) on its private
        # disconnect future after a clean DISCONNECT, when nobody awaits it any more;
        # mark it retrieved so asyncio does not log "Future exception was never retrieved".
        disconnected = getattr(client, "_disconnected", None)
        if isinstance(disconnected, asyncio.Future):
            disconnected.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            # one SUBSCRIBE per topic (see subscribe())
            for topic, qos in list(self._subscriptions.items()):
                await client.subscribe(topic, qos=qos)
            if self._announced:
                birth = self._frame("presence", {"online": True}, seq=self._birth_seq)
                await client.publish(self.topics.of("presence", self.peer_id), birth, qos=1, retain=True)
                self.published += 1
                self.bytes_published += len(birth)
        except aiomqtt.MqttError as exc:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
            raise BrokerConnectionError(
                f"connected to {scheme}://{self._host}:{self._port} but could not restore subscriptions: {exc}"
            ) from None
        self._client = client
        self._lost = asyncio.Event()
        self.connected_at = asyncio.get_running_loop().time()
        self._up.set()

    async def _reconnect(self, reason: str) -> None:
        """Re-establish the lost connection with backoff, within ``reconnect_s``.

        Raises:
            BrokerConnectionError: still no connection at the deadline.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._reconnect_s
        logger.warning(
            "%s: connection to the broker lost (%s); reconnecting for up to %g s", self.peer_id, reason,
            self._reconnect_s,
        )  # fmt: skip
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)  # already disconnected: releases it
        delay = _RECONNECT_FIRST_S
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._open(max(1.0, deadline - loop.time()))
                break
            except BrokerConnectionError as exc:
                if loop.time() + delay >= deadline:
                    raise BrokerConnectionError(
                        f"connection to the broker lost ({reason}) and not back within {self._reconnect_s:g} s "
                        f"({attempts} attempts; last: {exc})"
                    ) from None
            await asyncio.sleep(delay)  # backoff between attempts, bounded by the deadline above
            delay = min(2 * delay, _RECONNECT_MAX_S)
        self.reconnects += 1
        logger.warning(
            "%s: reconnected after %.2f s (%d attempt(s)); subscriptions and presence restored",
            self.peer_id, loop.time() - started, attempts,
        )  # fmt: skip

    async def _live(self, deadline: float) -> tuple[aiomqtt.Client, asyncio.Event]:
        """The established client and its "lost" event; waits while reconnecting.

        Raises:
            BrokerConnectionError: no connection by ``deadline`` (loop time), or the
                connection is gone for good.
        """
        loop = asyncio.get_running_loop()
        while not self._up.is_set():
            reader = self._reader
            if self._closing or not self._reconnect_s or reader is None or reader.done():
                raise BrokerConnectionError("connection to the broker was lost")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerConnectionError(f"no connection to the broker for {self._reconnect_s:g} s")
            up = asyncio.ensure_future(self._up.wait())
            try:
                await asyncio.wait({up, reader}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
        assert self._client is not None
        return self._client, self._lost

    async def _after_failure(self, lost: asyncio.Event, deadline: float, what: str, error: object) -> None:
        """An operation failed on a connection: wait until it is known lost, or raise.

        Raises:
            BrokerConnectionError: no reconnection configured, closing, or the connection
                still looks established at ``deadline`` (the failure was not a lost link).
        """
        if not self._reconnect_s or self._closing:
            raise BrokerConnectionError(f"{what} failed: {error}")
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(lost.wait(), max(0.0, remaining))
        except TimeoutError:
            raise BrokerConnectionError(f"{what} failed: {error}") from None

    # ------------------------------------------------------------------ sending
    def _frame(self, type: str, body: Mapping[str, Any], *, seq: int) -> bytes:
        assert self.session is not None
        envelope = Envelope(
            type, self.peer_id, self.community, self.session, seq, int(self._clock() * 1000), body
        )
        return encode(envelope, self._key)

    async def publish(
        self, channel: str, type: str, body: Mapping[str, Any], *, retain: bool = False, to: str | None = None
    ) -> None:
        """Sign and publish a message on one of this peer's channels.

        Args:
            channel: one of :data:`CHANNELS`; ``inbox`` needs ``to``.
            type: message type, e.g. ``admm.round``.
            body: the mechanism's map.
            retain: ask the broker to keep it for late subscribers.
            to: recipient peer id, for ``inbox`` only.
        """
        if self._read_only:
            raise RuntimeError("a read-only connection does not publish")
        assert self._client is not None, "publish() outside the context manager"
        frame = self._frame(type, body, seq=self._sequence.next())
        topic = self.topics.of(channel, to if channel == "inbox" else self.peer_id)
        await self._publish_frame(topic, frame, _QOS[channel], retain)
        lie_at = self._lie_round
        if lie_at is not None and channel == "market" and body.get("k") == lie_at and (lie := _lie(body)):
            # the drill: the same round signed again, saying something else
            await self._publish_frame(topic, self._frame(type, lie, seq=self._sequence.next()), _QOS[channel], retain)

    async def announce(self) -> None:
        """Publish the retained birth; call after every subscription is in place."""
        if self._read_only:
            raise RuntimeError("a read-only connection does not announce itself")
        assert self._client is not None
        self._announced = True  # a reconnection re-publishes the birth
        frame = self._frame("presence", {"online": True}, seq=self._birth_seq)
        await self._publish_frame(self.topics.of("presence", self.peer_id), frame, 1, True)

    async def _publish_frame(self, topic: str, frame: bytes, qos: int, retain: bool) -> None:
        """Publish signed bytes; across a reconnection, at least once (see the module doc).

        Raises:
            BrokerConnectionError: the broker refused, or no connection within ``reconnect_s``.
        """
        assert self._client is not None, "publish() outside the context manager"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_s
        while True:
            client, lost = await self._live(deadline) if self._reconnect_s else (self._client, self._lost)
            try:
                if self._reconnect_s:
                    # a QoS 1 publish on a dead link waits for an ack that never comes:
                    # stop waiting as soon as the reader sees the link gone
                    await _unless_set(client.publish(topic, frame, qos=qos, retain=retain), lost)
                else:
                    await client.publish(topic, frame, qos=qos, retain=retain)
            except aiomqtt.MqttError as exc:
                await self._after_failure(lost, deadline, f"publish on {topic}", exc)
                continue
            except _Lost:
                continue  # lost in flight: publish it again on the new connection
            self.published += 1
            self.bytes_published += len(frame)
            return

    # ------------------------------------------------------------------ receiving
    async def subscribe_all(self, channel: str) -> None:
        """Subscribe to ``channel`` of every peer of the community (``+`` wildcard)."""
        assert self._client is not None
        await self._subscribe(f"{self.topics.root}/{channel}/+", _QOS[channel])

    async def subscribe(self, channel: str, peers: Iterable[str | None]) -> None:
        """Subscribe to ``channel`` of each peer (``None`` for broadcast)."""
        assert self._client is not None
        # One SUBSCRIBE per topic: amqtt 0.12 loses retained messages (presence births)
        # for some topics of a multi-topic SUBSCRIBE; measured 4 of 20 peers never seen
        # online, none with one topic per packet. Mosquitto is indifferent.
        for peer in peers:
            await self._subscribe(self.topics.of(channel, peer), _QOS[channel])

    async def _subscribe(self, topic: str, qos: int) -> None:
        """Subscribe to one topic and remember it for reconnections."""
        self._subscriptions[topic] = qos
        deadline = asyncio.get_running_loop().time() + self._reconnect_s
        while True:
            client, lost = await self._live(deadline) if self._reconnect_s else (self._client, self._lost)
            assert client is not None
            try:
                await client.subscribe(topic, qos=qos)
                return
            except aiomqtt.MqttError as exc:
                await self._after_failure(lost, deadline, f"subscribe to {topic}", exc)

    async def receive(self, timeout: float | None = None) -> Incoming:
        """Next verified non-presence message.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            BrokerConnectionError: the connection is gone.
        """
        if self._reader is not None and self._reader.done():
            raise BrokerConnectionError("connection to the broker was lost")
        getter = asyncio.ensure_future(self._inbox.get())
        assert self._reader is not None
        done, _ = await asyncio.wait({getter, self._reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._reader in done:
            raise BrokerConnectionError("connection to the broker was lost")
        raise TimeoutError

    def receive_nowait(self) -> Incoming | None:
        """The next verified message already queued, or None: never waits."""
        try:
            return self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            return None

    @property
    def presence(self) -> Mapping[str, bool]:
        """Peer id -> online, from the latest verified presence frame of each peer."""
        return self._presence.online

    @property
    def connected(self) -> bool:
        """A connection to the broker is established (False while reconnecting)."""
        return self._up.is_set()

    @property
    def pending(self) -> int:
        """Verified messages waiting to be read."""
        return self._inbox.qsize()

    def online(self, peer_id: str) -> bool:
        """Whether the last verified presence frame of ``peer_id`` said online."""
        return self._presence.online.get(peer_id, False)

    async def wait_online(self, peers: Iterable[str], timeout: float) -> None:
        """Wait until every peer in ``peers`` is online (their births arrived).

        Raises:
            TimeoutError: naming the peers still missing.
        """
        wanted = set(peers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while missing := sorted(p for p in wanted if not self.online(p)):
            self._presence.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
                raise TimeoutError(f"{len(missing)} peer(s) not online after {timeout:g} s: {shown}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence.changed.wait(), remaining)

    async def wait_presence_known(self, peers: Iterable[str], timeout: float) -> set[str]:
        """Wait until a presence frame (birth or Will) of each peer has arrived, at most
        ``timeout`` seconds; returns the peers still unknown (never announced: offline)."""
        wanted = set(peers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while unknown := {p for p in wanted if p not in self._presence.online}:
            self._presence.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return unknown
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence.changed.wait(), remaining)
        return set()

    async def _read(self) -> None:
        """Verify and queue every incoming frame; on a lost connection, reconnect (if
        configured) or end, which makes :meth:`receive` raise."""
        while True:
            client, lost = self._client, self._lost
            assert client is not None
            reason = "the message stream ended"
            try:
                async for message in client.messages:
                    self._handle(message)
            except aiomqtt.MqttError as exc:
                reason = str(exc)
            lost.set()
            self._up.clear()
            if not self._reconnect_s or self._closing:
                raise BrokerConnectionError(f"connection to the broker was lost: {reason}")
            await self._reconnect(reason)

    def _handle(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            self._drop("malformed", None, "non-binary payload")
            return
        self.received += 1
        try:
            channel, topic_peer = self.topics.parse(message.topic.value)
        except ValueError:
            self._drop("unexpected_topic", None, message.topic.value)
            return
        try:
            envelope = self._verifier(channel, topic_peer).verify(bytes(payload))
        except ProtocolError as exc:
            self._drop(exc.reason, exc.peer_id, str(exc))
            return
        if topic_peer is not None and channel != "inbox" and envelope.sender != topic_peer:
            self._drop("topic_mismatch", envelope.sender, f"published on {message.topic.value}")
            return
        if channel == "presence":
            self._presence.online[envelope.sender] = bool(envelope.body.get("online"))
            self._presence.changed.set()
            return
        incoming = Incoming(channel, envelope, bytes(payload))
        if self._faults is not None and channel in FAULT_CHANNELS:
            self._disturb(incoming, self._faults)
        else:
            self._queue(incoming)

    def _disturb(self, incoming: Incoming, faults: FaultPlan) -> None:
        """Injected faults: drop the message, or hold it for a random delay."""
        draw = self._fault_random
        assert draw is not None
        if draw.random() < faults.drop_rate:
            self.drops["injected"] += 1
            return
        if faults.delay_s <= 0:
            self._queue(incoming)
            return
        delay = draw.uniform(0.0, faults.delay_s)

        def release() -> None:
            self._held.discard(handle)
            self._queue(incoming)

        handle = asyncio.get_running_loop().call_later(delay, release)
        self._held.add(handle)

    def _queue(self, incoming: Incoming) -> None:
        try:
            self._inbox.put_nowait(incoming)
        except asyncio.QueueFull:
            self.drops["overflow"] += 1

    def _verifier(self, channel: str, topic_peer: str | None) -> Verifier:
        """The verifier of one topic (one per channel and roster peer, created on demand).

        Per topic, not per channel: a genuine frame of peer a copied onto b's topic
        (e.g. retained on ``presence/b``) is verified, then dropped as a topic
        mismatch; had it advanced a channel-wide ``last_seq[a]``, a's own copy on
        ``presence/a`` would then be refused as a replay. Topics naming ids outside
        the roster can never carry an acceptable frame and share one verifier, so the
        table stays bounded under a wildcard subscription.
        """
        owner = topic_peer if channel != "inbox" and topic_peer in self._roster else None
        verifier = self._verifiers.get((channel, owner))
        if verifier is None:
            session = None if channel == "presence" else self.session
            verifier = Verifier(self._roster, self.community, session)
            self._verifiers[channel, owner] = verifier
        return verifier

    def _drop(self, reason: str, sender: str | None, detail: str) -> None:
        self.drops[reason] += 1
        if (reason, sender) not in self._logged:
            self._logged.add((reason, sender))
            logger.warning("%s: dropped a frame (%s): %s", self.peer_id, reason, detail)



class _Lost(Exception):
    """The connection went away while an operation waited for its ack."""


async def _unless_set(operation: Any, lost: asyncio.Event) -> None:
    """Await ``operation`` unless ``lost`` is set first (then cancel it, raise ``_Lost``)."""
    task = asyncio.ensure_future(operation)
    watcher = asyncio.ensure_future(lost.wait())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task in done:
        task.result()  # its MqttError, if any
        return
    raise _Lost
