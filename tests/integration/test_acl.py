"""Attacks on a secured Mosquitto: every cross-peer case of the ACL, TLS identities, logins.

Each test starts a real Mosquitto (free loopback port) with the configuration
``wattmesh broker --secure`` writes for community ``acl``: peers ``a``, ``b``, ``c``,
monitors ``monitor`` and ``watch``. The attacker is a raw aiomqtt client logged in with
its *own* credentials, i.e. a community member misbehaving (outsiders are the login
tests). Mosquitto refuses silently (a denied PUBLISH still gets its PUBACK, a denied
subscription still gets "granted"), so every denial is checked on delivery: the
forbidden message is followed by a *positive control* that the observer may receive,
and the observer's next message must be the control. Mosquitto handles one client at a
time and answers a QoS 1 PUBLISH only after queueing it for every subscriber, so had
the forbidden message been let through, it would have arrived first. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.broker import (
    BrokerHandle,
    BrokerProcess,
    MosquittoConfig,
    MosquittoSecurity,
    SecurityFiles,
    TlsFiles,
    acl_text,
    mosquitto_config_text,
    read_password,
    start_broker,
    write_security,
)
from wattmesh.broker.ca import init_ca, issue_peer, peer_files
from wattmesh.broker.command import main as broker_main
from wattmesh.broker.security import password_file_line
from wattmesh.peer.cli import main as cli_main
from wattmesh.peer.connection import BrokerConnectionError, PeerConnection
from wattmesh.protocols.identity import Roster

pytestmark = pytest.mark.mosquitto

TIMEOUT = 5.0  # [s] for any single network event; they take milliseconds
COMMUNITY = "acl"
PEERS = ("a", "b", "c")
MONITORS = ("monitor", "watch")
ROOT = f"wattmesh/v1/{COMMUNITY}"
OWN_CHANNELS = ("presence", "market", "report", "telemetry", "state")  # docs/security.md §3


def topic(channel: str, peer: str | None = None) -> str:
    return f"{ROOT}/{channel}" if peer is None else f"{ROOT}/{channel}/{peer}"


@dataclass(frozen=True)
class Secured:
    """A running secured broker and what a client needs to log in."""

    broker: BrokerHandle
    files: SecurityFiles
    ca: Path | None = None  # the CA directory when identities come from certificates

    def client(
        self,
        identity: str,
        *,
        password: str | None = None,
        identifier: str | None = None,
        will: aiomqtt.Will | None = None,
    ) -> aiomqtt.Client:
        """An aiomqtt client logged in as ``identity`` (its own password or certificate)."""
        if self.ca is not None:
            login: dict[str, object] = {"tls_context": peer_files(self.ca, identity).client_context()}
        else:
            login = {"username": identity, "password": password or read_password(self.files.directory, identity)}
        return aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=identifier, will=will, timeout=TIMEOUT, **login
        )  # type: ignore[arg-type]


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    """Mosquitto with per-peer passwords and the community's ACL."""
    files = write_security(tmp_path / "secure", COMMUNITY, PEERS, MONITORS)
    assert files.password_file is not None
    security = MosquittoSecurity(files.acl, password_path=files.password_file)
    async with start_broker("mosquitto", security=security) as broker:
        yield Secured(broker, files)


@pytest.fixture
async def secured_tls(tmp_path: Path) -> AsyncIterator[Secured]:
    """Mosquitto with a TLS listener taking each identity from its client certificate."""
    ca = tmp_path / "ca"
    server = init_ca(ca)
    for identity in (*PEERS, *MONITORS):
        issue_peer(ca, identity)
    files = write_security(tmp_path / "secure", COMMUNITY, PEERS, MONITORS, passwords=False)
    async with start_broker("mosquitto", security=MosquittoSecurity(files.acl, tls=server)) as broker:
        yield Secured(broker, files, ca)


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(client.messages), TIMEOUT)


async def expect(client: aiomqtt.Client, topic_name: str, payload: bytes) -> None:
    """The client's next message is ``payload`` on ``topic_name`` (nothing came before it)."""
    message = await next_message(client)
    assert (message.topic.value, message.payload) == (topic_name, payload)


async def messages_until(client: aiomqtt.Client, marker: bytes) -> dict[str, bytes]:
    """Topic -> payload of everything the client receives before the ``marker`` payload."""
    seen: dict[str, bytes] = {}
    while (message := await next_message(client)).payload != marker:
        assert isinstance(message.payload, bytes)
        seen[message.topic.value] = message.payload
    return seen


def drop_abruptly(client: aiomqtt.Client) -> None:
    """Cut the TCP connection without DISCONNECT, as a crash does (the Will fires)."""
    sock = client._client.socket()
    assert isinstance(sock, socket.socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    # aiomqtt sets an exception on a private future nobody awaits once the connection
    # is gone; mark it retrieved (as PeerConnection does) to keep the test log clean.
    disconnected = getattr(client, "_disconnected", None)
    if isinstance(disconnected, asyncio.Future):
        disconnected.add_done_callback(lambda f: f.cancelled() or f.exception())


# ----------------------------------------------------------------------------- allowed
async def test_a_peer_reaches_everyone_it_should(secured: Secured) -> None:
    """Positive controls: own topics, broadcast and another peer's inbox are delivered."""
    async with secured.client("a") as a, secured.client("b") as b, secured.client("watch") as watch:
        for channel in OWN_CHANNELS:
            await b.subscribe(f"{topic(channel)}/+", qos=1)
        await b.subscribe(topic("broadcast"), qos=1)
        await b.subscribe(topic("inbox", "b"), qos=1)
        await watch.subscribe("#", qos=1)

        sent = [topic(channel, "a") for channel in OWN_CHANNELS] + [topic("broadcast"), topic("inbox", "b")]
        for name in sent:
            await a.publish(name, name.encode(), qos=1)

        for name in sent:
            if "/telemetry/" not in name:  # telemetry is for monitors only
                await expect(b, name, name.encode())
            if "/inbox/" not in name:  # a monitor reads everything public, no inbox
                await expect(watch, name, name.encode())


async def test_retained_presence_and_own_will_reach_late_subscribers(secured: Secured) -> None:
    async with secured.client("b") as b:
        await b.subscribe(f"{topic('presence')}/+", qos=1)
        a = secured.client("a", will=aiomqtt.Will(topic("presence", "a"), b"a offline", qos=1, retain=True))
        await a.__aenter__()
        await a.publish(topic("presence", "a"), b"a online", qos=1, retain=True)
        await expect(b, topic("presence", "a"), b"a online")
        drop_abruptly(a)
        await expect(b, topic("presence", "a"), b"a offline")
    async with secured.client("c") as late:
        await late.subscribe(f"{topic('presence')}/+", qos=1)
        message = await next_message(late)
    assert (message.topic.value, message.payload, message.retain) == (topic("presence", "a"), b"a offline", True)


# ------------------------------------------------------------------- forged publications
@pytest.mark.parametrize("channel", OWN_CHANNELS)
async def test_a_peer_cannot_publish_on_another_peers_topic(secured: Secured, channel: str) -> None:
    async with (
        secured.client("a") as attacker,
        secured.client("b") as victim,
        secured.client("watch") as watch,
    ):
        await victim.subscribe(f"{topic(channel)}/+", qos=1)  # a peer reads no telemetry: sees only the control
        await watch.subscribe(f"{topic(channel)}/+", qos=1)

        await attacker.publish(topic(channel, "b"), b"forged", qos=1)  # PUBACKed, then dropped
        await attacker.publish(topic(channel, "c"), b"forged", qos=1)
        await attacker.publish(topic(channel, "a"), b"control", qos=1)

        await expect(watch, topic(channel, "a"), b"control")
        if channel != "telemetry":
            await expect(victim, topic(channel, "a"), b"control")


async def test_a_peer_cannot_retain_state_on_another_peers_presence(secured: Secured) -> None:
    async with secured.client("b") as victim, secured.client("a") as attacker:
        await victim.subscribe(f"{topic('presence')}/+", qos=1)
        await victim.publish(topic("presence", "b"), b"b online", qos=1, retain=True)
        await expect(victim, topic("presence", "b"), b"b online")

        await attacker.publish(topic("presence", "b"), b"b offline (forged)", qos=1, retain=True)
        await attacker.publish(topic("presence", "a"), b"a online", qos=1, retain=True)
        await expect(victim, topic("presence", "a"), b"a online")  # nothing forged live

        async with secured.client("watch") as late:
            await late.subscribe(f"{topic('presence')}/+", qos=1)
            await late.subscribe(topic("market", "a"), qos=1)
            await attacker.publish(topic("market", "a"), b"marker", qos=1)  # queued after the retained ones
            retained = await messages_until(late, b"marker")
    assert retained == {topic("presence", "a"): b"a online", topic("presence", "b"): b"b online"}


async def test_a_will_on_another_peers_presence_is_never_published(secured: Secured) -> None:
    """The Will is accepted at CONNECT but checked against the ACL when it fires."""
    forged = aiomqtt.Will(topic("presence", "b"), b"b offline (forged)", qos=1, retain=True)
    control = aiomqtt.Will(topic("presence", "a"), b"a offline", qos=1, retain=True)
    async with secured.client("watch") as watch:
        await watch.subscribe(f"{topic('presence')}/+", qos=1)
        attacker = secured.client("a", will=forged)
        await attacker.__aenter__()
        drop_abruptly(attacker)
        # The next "a" session exists only once the broker is done with the first one
        # (gone, or taken over while connecting): the forged Will was decided before
        # this CONNACK, so it would arrive before the control Will.
        second = secured.client("a", will=control)
        await second.__aenter__()
        drop_abruptly(second)
        await expect(watch, topic("presence", "a"), b"a offline")

        async with secured.client("c") as late:
            await late.subscribe(f"{topic('presence')}/+", qos=1)
            await late.subscribe(topic("market", "c"), qos=1)
            await late.publish(topic("market", "c"), b"marker", qos=1)
            retained = await messages_until(late, b"marker")
    assert retained == {topic("presence", "a"): b"a offline"}


@pytest.mark.parametrize("identifier", ["b", f"wm-{COMMUNITY}-b"])
async def test_client_id_takeover_does_not_kick_the_legitimate_session(secured: Secured, identifier: str) -> None:
    """The client id is forced to the username, so claiming b's id hits only a's own session."""
    b_will = aiomqtt.Will(topic("presence", "b"), b"b offline", qos=1, retain=True)
    async with (
        secured.client("b", identifier=f"wm-{COMMUNITY}-b", will=b_will) as victim,
        secured.client("watch") as watch,
        secured.client("c") as c,
    ):
        await victim.subscribe(topic("inbox", "b"), qos=1)
        await watch.subscribe(f"{topic('presence')}/+", qos=1)

        async with secured.client("a", identifier=identifier) as attacker:
            # Had b been kicked, its Will would have been sent before this CONNACK.
            await attacker.publish(topic("presence", "a"), b"control", qos=1)
            await expect(watch, topic("presence", "a"), b"control")

        await c.publish(topic("inbox", "b"), b"still connected?", qos=1)
        await expect(victim, topic("inbox", "b"), b"still connected?")
        await victim.publish(topic("market", "b"), b"yes", qos=1)  # its session still works both ways


# ------------------------------------------------------------------ eavesdropping
@pytest.mark.parametrize(
    "pattern",
    ["#", f"{ROOT}/#", f"{ROOT}/+/+", "+/+/+/+/+", f"{ROOT}/inbox/+", f"{ROOT}/inbox/b", f"{ROOT}/telemetry/+"],
)
async def test_a_peer_cannot_read_another_inbox_or_telemetry(secured: Secured, pattern: str) -> None:
    async with (
        secured.client("a") as eavesdropper,
        secured.client("b") as b,
        secured.client("c") as c,
    ):
        await b.subscribe(topic("inbox", "b"), qos=1)
        await eavesdropper.subscribe(topic("inbox", "a"), qos=1)
        granted = await eavesdropper.subscribe(pattern, qos=1)
        assert granted  # Mosquitto grants any subscription; it filters every delivery

        await c.publish(topic("inbox", "b"), b"for b only", qos=1)
        await b.publish(topic("telemetry", "b"), b"b telemetry", qos=1)
        await c.publish(topic("inbox", "a"), b"control", qos=1)

        await expect(b, topic("inbox", "b"), b"for b only")  # it was published and allowed
        await expect(eavesdropper, topic("inbox", "a"), b"control")


async def test_a_peer_cannot_read_broker_internals(secured: Secured) -> None:
    async with secured.client("a") as a, secured.client("c") as c:
        await a.subscribe(topic("inbox", "a"), qos=1)
        await a.subscribe("$SYS/#", qos=1)  # would at once deliver the retained $SYS/broker/version
        await c.publish(topic("inbox", "a"), b"control", qos=1)
        await expect(a, topic("inbox", "a"), b"control")


# ------------------------------------------------------------------ monitors
async def test_a_monitor_publishes_nothing(secured: Secured) -> None:
    targets = [topic(channel, peer) for channel in (*OWN_CHANNELS, "inbox") for peer in ("a", "monitor")]
    targets.append(topic("broadcast"))
    will = aiomqtt.Will(topic("broadcast"), b"the monitor's Will", qos=1, retain=True)
    async with (
        secured.client("watch") as watch,
        secured.client("a") as a,
        secured.client("b") as b,
    ):
        await watch.subscribe("#", qos=1)
        await a.subscribe("#", qos=1)
        monitor = secured.client("monitor", will=will)
        await monitor.__aenter__()
        for name in targets:
            await monitor.publish(name, b"from the monitor", qos=1)
            await monitor.publish(name, b"retained from the monitor", qos=1, retain=True)
        drop_abruptly(monitor)
        async with secured.client("monitor"):  # connected: the first session and its Will are done with
            pass
        await b.publish(topic("broadcast"), b"control", qos=1)

        await expect(watch, topic("broadcast"), b"control")
        await expect(a, topic("broadcast"), b"control")


async def test_a_monitor_reads_every_public_topic_but_no_inbox(secured: Secured) -> None:
    async with secured.client("monitor") as monitor, secured.client("a") as a:
        await monitor.subscribe(f"{ROOT}/#", qos=1)
        await a.publish(topic("inbox", "b"), b"private", qos=1)
        for channel in OWN_CHANNELS:
            await a.publish(topic(channel, "a"), channel.encode(), qos=1)
        for channel in OWN_CHANNELS:
            await expect(monitor, topic(channel, "a"), channel.encode())


# ------------------------------------------------------------------ revocation
async def test_revoking_a_peer_refuses_it_and_silences_its_retained_state(tmp_path: Path) -> None:
    """A peer leaves the roster: new files, a reload, and it is gone, retained state too
    (``check_retain_source``: a retained message is re-checked against its publisher)."""
    directory = tmp_path / "secure"
    files = write_security(directory, COMMUNITY, PEERS, MONITORS)
    assert files.password_file is not None
    process = BrokerProcess("mosquitto", security=MosquittoSecurity(files.acl, password_path=files.password_file))
    secured = Secured(await asyncio.to_thread(process.start), files)
    try:
        revoked_password = read_password(directory, "a")
        async with secured.client("a") as a, secured.client("b") as b:
            await a.publish(topic("presence", "a"), b"a online", qos=1, retain=True)
            await b.publish(topic("presence", "b"), b"b online", qos=1, retain=True)

        write_security(directory, COMMUNITY, ["b", "c"], MONITORS)  # a leaves the community
        process.reload()
        assert not (directory / "credentials" / "a.password").exists()
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while True:  # the reload is asynchronous: wait until it shows
            try:
                async with secured.client("a", password=revoked_password):
                    pass
            except aiomqtt.MqttCodeError:
                break
            # each attempt is a CONNECT answered by the broker: no pause needed between them
            assert asyncio.get_running_loop().time() < deadline, "a can still log in after the reload"

        async with secured.client("c") as late:
            await late.subscribe(f"{topic('presence')}/+", qos=1)
            await late.subscribe(topic("market", "c"), qos=1)
            await late.publish(topic("market", "c"), b"marker", qos=1)
            assert await messages_until(late, b"marker") == {topic("presence", "b"): b"b online"}
    finally:
        await asyncio.to_thread(process.stop)


# ------------------------------------------------------------------ known limitation
async def test_limitation_a_peer_can_leave_a_retained_message_in_another_inbox(secured: Secured) -> None:
    """Mosquitto's ACL has no separate right for the retain flag: who may write a topic
    may retain on it. Inboxes are writable by every peer, so a peer can park one signed
    message in b's inbox for b's next connection. It is the sender's own signed message,
    verified like any other (session, sequence); only b can read it; and the pattern
    grants keep it to roster inboxes (no unbounded made-up topics). docs/security.md."""
    async with secured.client("c") as c:
        await c.publish(topic("inbox", "b"), b"parked", qos=1, retain=True)
        await c.publish(topic("inbox", "nobody"), b"parked", qos=1, retain=True)  # not a roster inbox
    async with secured.client("a") as eavesdropper:
        await eavesdropper.subscribe("#", qos=1)
        await eavesdropper.subscribe(topic("market", "a"), qos=1)
        await eavesdropper.publish(topic("market", "a"), b"marker", qos=1)
        assert await messages_until(eavesdropper, b"marker") == {}
    async with secured.client("b") as b:
        await b.subscribe(f"{ROOT}/inbox/+", qos=1)
        await b.subscribe(topic("market", "b"), qos=1)
        await b.publish(topic("market", "b"), b"marker", qos=1)
        assert await messages_until(b, b"marker") == {topic("inbox", "b"): b"parked"}


# ------------------------------------------------------------------ logins
@pytest.mark.parametrize(
    ("username", "password"),
    [("a", "wrong password"), ("a", ""), ("nobody", "x"), (None, None)],
)
async def test_a_bad_login_is_refused(secured: Secured, username: str | None, password: str | None) -> None:
    client = aiomqtt.Client(
        secured.broker.host, secured.broker.port, username=username, password=password, timeout=TIMEOUT
    )
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with client:
            pass
    assert str(refused.value.rc) in ("Not authorized", "Bad user name or password")


async def test_another_peers_password_does_not_work(secured: Secured) -> None:
    with pytest.raises(aiomqtt.MqttCodeError):
        async with secured.client("a", password=read_password(secured.files.directory, "b")):
            pass


async def test_peer_connections_work_with_credentials(secured: Secured) -> None:
    """The real peer shell under the ACL: presence, Will, market, inbox, a monitor."""
    keys = {peer: Ed25519PrivateKey.generate() for peer in ("a", "b")}
    roster = Roster({peer: key.public_key() for peer, key in keys.items()})

    def connection(peer: str, **options: object) -> PeerConnection:
        password = read_password(secured.files.directory, peer)
        key = keys.get(peer) or Ed25519PrivateKey.generate()
        return PeerConnection(
            peer, key, roster, community=COMMUNITY, url=secured.broker.url, password=password, **options
        )  # type: ignore[arg-type]

    async with (
        connection("monitor", session=None, read_only=True) as monitor,
        connection("a", session="s1") as a,
        connection("b", session="s1") as b,
    ):
        await monitor.subscribe_all("presence")
        await monitor.subscribe_all("telemetry")
        await b.subscribe_all("presence")
        await b.subscribe("market", ["a"])
        await a.announce()
        await b.wait_online(["a"], TIMEOUT)
        await monitor.wait_online(["a"], TIMEOUT)
        await a.publish("market", "admm.round", {"k": 1})
        await a.publish("inbox", "negotiation.offer", {"kwh": 1.0}, to="b")
        await a.publish("telemetry", "admm.telemetry", {"k": 1})
        received = [await b.receive(TIMEOUT), await b.receive(TIMEOUT)]
        telemetry = await monitor.receive(TIMEOUT)
        assert [(m.channel, m.envelope.sender) for m in received] == [("market", "a"), ("inbox", "a")]
        assert (telemetry.channel, telemetry.envelope.body) == ("telemetry", {"k": 1})
        assert a.drops == b.drops == monitor.drops == {}


async def test_a_peer_connection_with_a_wrong_password_fails_cleanly(secured: Secured) -> None:
    key = Ed25519PrivateKey.generate()
    connection = PeerConnection(
        "a", key, Roster({"a": key.public_key()}), community=COMMUNITY, session="s1",
        url=secured.broker.url, password="wrong",
    )  # fmt: skip
    with pytest.raises(BrokerConnectionError, match="cannot connect to mqtt://"):
        async with connection:
            pass


# ------------------------------------------------------------------ TLS
async def _tls_connect_answer(broker: BrokerHandle, context: ssl.SSLContext | None) -> bytes:
    """What the broker answers a bare MQTT CONNECT on a (TLS) connection: b"" = nothing.

    A raw socket, because with TLS 1.3 the broker rejects a missing or foreign client
    certificate *after* the client's handshake completes; a client library only
    notices when its CONNECT goes unanswered (after its whole timeout).
    """
    connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # MQTT 3.1.1, clean, empty id
    try:
        server_name = broker.host if context is not None else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(broker.host, broker.port, ssl=context, server_hostname=server_name), TIMEOUT
        )
        writer.write(connect)
        answer = await asyncio.wait_for(reader.read(4), TIMEOUT)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except (ssl.SSLError, ConnectionError):
        return b""
    return answer


async def test_tls_peer_with_a_certificate_from_the_ca_connects(secured_tls: Secured) -> None:
    assert secured_tls.broker.url.startswith("mqtts://")
    assert secured_tls.ca is not None
    answer = await _tls_connect_answer(secured_tls.broker, peer_files(secured_tls.ca, "a").client_context())
    assert answer == b"\x20\x02\x00\x00"  # CONNACK, accepted: the identity came from the certificate


async def test_tls_identity_comes_from_the_certificate_and_the_acl_applies(secured_tls: Secured) -> None:
    async with secured_tls.client("a") as a, secured_tls.client("b") as b:
        await b.subscribe(f"{topic('presence')}/+", qos=1)
        await a.publish(topic("presence", "b"), b"forged", qos=1)
        await a.publish(topic("presence", "a"), b"control", qos=1)
        await expect(b, topic("presence", "a"), b"control")
    async with secured_tls.client("a", identifier=f"wm-{COMMUNITY}-a") as a:
        await a.subscribe(topic("inbox", "a"), qos=1)
        async with secured_tls.client("b", identifier=f"wm-{COMMUNITY}-a") as b:  # b's certificate, a's client id
            await b.publish(topic("inbox", "a"), b"hello a", qos=1)
        await expect(a, topic("inbox", "a"), b"hello a")  # a's session survived


async def test_tls_without_a_client_certificate_is_refused(secured_tls: Secured) -> None:
    assert secured_tls.ca is not None
    context = ssl.create_default_context(cafile=str(secured_tls.ca / "ca.crt"))  # trusts the broker, no cert
    assert await _tls_connect_answer(secured_tls.broker, context) == b""


async def test_tls_with_a_certificate_from_another_ca_is_refused(secured_tls: Secured, tmp_path: Path) -> None:
    assert secured_tls.ca is not None
    init_ca(tmp_path / "rogue")
    rogue = issue_peer(tmp_path / "rogue", "a")  # same peer id, wrong CA
    context = TlsFiles(secured_tls.ca / "ca.crt", rogue.cert, rogue.key).client_context()
    assert await _tls_connect_answer(secured_tls.broker, context) == b""


async def test_plain_mqtt_on_the_tls_listener_is_refused(secured_tls: Secured) -> None:
    assert await _tls_connect_answer(secured_tls.broker, None) == b""


async def test_peer_connection_over_tls(secured_tls: Secured) -> None:
    assert secured_tls.ca is not None
    key = Ed25519PrivateKey.generate()
    roster = Roster({"a": key.public_key()})
    tls = peer_files(secured_tls.ca, "a")
    async with PeerConnection(
        "a", key, roster, community=COMMUNITY, session="s1", url=secured_tls.broker.url, tls=tls
    ) as a:
        await a.subscribe_all("presence")
        await a.announce()
        await a.wait_online(["a"], TIMEOUT)


# ------------------------------------------------------------------ generated files
def test_password_file_line_matches_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    path.write_text("h001:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True, capture_output=True, timeout=30)
    line = path.read_text().strip()
    salt = base64.b64decode(line.split("$")[3])
    assert password_file_line("h001", "s3cret", salt=salt) == line


def test_acl_rejects_ids_that_would_break_the_patterns() -> None:
    with pytest.raises(ValueError, match="must match"):
        acl_text(COMMUNITY, ["a", "b/#"])
    with pytest.raises(ValueError, match="must match"):
        acl_text("c+", ["a"])
    with pytest.raises(ValueError, match="both a peer and a monitor"):
        acl_text(COMMUNITY, ["a", "monitor"], ["monitor"])


def test_acl_grants_inbox_writes_per_roster_peer_only() -> None:
    lines = acl_text(COMMUNITY, PEERS, MONITORS).splitlines()
    grants = [line for line in lines if line.startswith(("topic", "pattern")) and "deny" not in line]
    assert not [line for line in grants if "write" in line and ("+" in line or "#" in line)]
    assert [line for line in lines if line.startswith("pattern")] == [
        f"pattern write {topic('inbox', peer)}" for peer in PEERS
    ]
    monitor_block = lines[lines.index("user monitor") : lines.index("user watch")]
    assert f"topic deny {ROOT}/inbox/#" in monitor_block
    assert not [line for line in monitor_block if "write" in line]


def test_secure_config_text() -> None:
    security = MosquittoSecurity(Path("/s/acl"), password_path=Path("/s/passwords"))
    lines = mosquitto_config_text(MosquittoConfig(18830, security=security)).splitlines()
    for line in (
        "per_listener_settings true",
        "allow_anonymous false",
        "use_username_as_clientid true",
        "check_retain_source true",
        "acl_file /s/acl",
        "password_file /s/passwords",
    ):
        assert line in lines
    assert "allow_anonymous true" not in lines
    assert lines.index("per_listener_settings true") < lines.index("listener 18830 127.0.0.1")


def test_credentials_are_private_and_kept_across_runs(tmp_path: Path) -> None:
    first = write_security(tmp_path, COMMUNITY, ["a", "b"])
    password = read_password(tmp_path, "a")
    second = write_security(tmp_path, COMMUNITY, ["a", "b", "c"])
    assert read_password(tmp_path, "a") == password
    assert set(second.credentials) == {"a", "b", "c", "monitor"}
    assert first.password_file is not None
    for path in (first.password_file, first.acl, *second.credentials.values()):
        assert path.stat().st_mode & 0o077 == 0


# ------------------------------------------------------------------ command line
def test_ca_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert cli_main(["ca", "init", str(ca), "--name", "broker.example", "--name", "10.0.0.2"]) == 0
    assert cli_main(["ca", "issue", str(ca), "h001", "h002"]) == 0
    assert cli_main(["ca", "init", str(ca)]) == 2  # would revoke every certificate
    assert cli_main(["ca", "issue", str(ca), "H001"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0].startswith("wattmesh: ") and "exists" in captured.err.splitlines()[0]
    assert "must match" in captured.err.splitlines()[1]
    assert (ca / "peers" / "h002.crt").is_file() and (ca / "peers" / "h002.key").stat().st_mode & 0o077 == 0


def test_secure_broker_command_needs_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert broker_main(["--secure", "--community", "c"]) == 2
    assert broker_main(["--roster", "r.toml"]) == 2
    assert broker_main(["--secure", "--kind", "embedded", "--roster", "r", "--community", "c", "--out", "o"]) == 2
    assert cli_main(["broker", "--secure", "--community", "c"]) == 2  # the same through `wattmesh broker`
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        "wattmesh broker: --secure needs --roster, --out (see --help)",
        "wattmesh broker: --roster needs --secure (see --help)",
        "wattmesh broker: --secure needs Mosquitto (per-peer ACLs); the embedded broker has none (see --help)",
        "wattmesh broker: --secure needs --roster, --out (see --help)",
    ]


async def test_secure_broker_command_runs_and_says_where_the_credentials_are(tmp_path: Path) -> None:
    roster = Roster({peer: Ed25519PrivateKey.generate().public_key() for peer in PEERS})
    (tmp_path / "roster.toml").write_text(roster.to_toml())
    out = tmp_path / "out"
    argv = ["--secure", "--roster", str(tmp_path / "roster.toml"), "--community", COMMUNITY]
    argv += ["--out", str(out), "--port", "0"]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattmesh.broker", *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert child.stdout is not None
        lines = []
        while not (lines and "listening on" in lines[-1]):
            lines.append((await asyncio.wait_for(child.stdout.readline(), 3 * TIMEOUT)).decode())
            assert lines[-1], f"the command ended early: {lines}"
        url = lines[-1].split("listening on ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        assert f"credentials: {out.resolve() / 'credentials'}/<id>.password" in "".join(lines)
        assert (out / "mosquitto.conf").is_file()
        async with aiomqtt.Client("127.0.0.1", port, username="b", password=read_password(out, "b")) as b:
            await b.subscribe(topic("inbox", "b"), qos=1)
            await b.publish(topic("inbox", "b"), b"hello", qos=1)
            await expect(b, topic("inbox", "b"), b"hello")

        # the roster changes: "b" leaves; SIGHUP rewrites the files and reloads the broker
        (tmp_path / "roster.toml").write_text(Roster({"a": roster["a"], "c": roster["c"]}).to_toml())
        child.send_signal(signal.SIGHUP)
        line = (await asyncio.wait_for(child.stdout.readline(), 3 * TIMEOUT)).decode()
        assert line == f"reloaded: 2 peer(s) of community {COMMUNITY}\n"
        assert not (out / "credentials" / "b.password").exists()
    finally:
        child.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(child.wait(), 3 * TIMEOUT) == 0
