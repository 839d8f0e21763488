"""Shared helpers for the peer shell's tests: keys, connections, raw frames, raw clients.

Imported as ``from _helpers import ...`` (pytest puts each test directory on
``sys.path``; a ``peer.`` package path would collide with the source folder ``peer/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgpack
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.peer.connection import PeerConnection
from wattmesh.peer.sequence import SequenceStore
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import DOMAIN

TIMEOUT = 5.0
"""[s] bound on any single network event; they take milliseconds on loopback."""

SESSION = "s1"
ROUND_BODY = {"k": 3, "t": {"b": 0.5, "c": -1.25}, "v0": 1, "votes": [True, False]}


def unique_community() -> str:
    """A community id (hence topic root) no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


def make_keys(*peer_ids: str) -> tuple[dict[str, Ed25519PrivateKey], Roster]:
    """Fresh keys for ``peer_ids`` and the roster binding them."""
    keys = {pid: Ed25519PrivateKey.generate() for pid in peer_ids}
    return keys, Roster({pid: key.public_key() for pid, key in keys.items()})


def connect(
    peer_id: str,
    keys: Mapping[str, Ed25519PrivateKey],
    roster: Roster,
    community: str,
    url: str,
    *,
    session: str = SESSION,
    sequence: SequenceStore | None = None,
) -> PeerConnection:
    """A PeerConnection (not yet entered) of ``peer_id`` with its own key."""
    return PeerConnection(
        peer_id,
        keys[peer_id],
        roster,
        community=community,
        session=session,
        url=url,
        sequence=sequence,
    )


@contextlib.asynccontextmanager
async def connected_pair(community: str, url: str) -> AsyncIterator[tuple[PeerConnection, PeerConnection]]:
    """Peers "a" and "b" of ``community``, each with its own key, both connected."""
    keys, roster = make_keys("a", "b")
    async with connect("a", keys, roster, community, url) as a, connect("b", keys, roster, community, url) as b:
        yield a, b


async def wait_presence(
    conn: PeerConnection, peer_id: str, online: bool, timeout: float = TIMEOUT
) -> None:
    """Wait until ``conn`` believes ``peer_id`` is ``online`` (or offline).

    ``PeerConnection`` only offers ``wait_online``; going offline is waited for on the
    same event it sets for every verified presence frame.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while conn.online(peer_id) != online:
        conn._presence.changed.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(
                f"{peer_id} still {'offline' if online else 'online'} after {timeout} s"
            )
        try:
            await asyncio.wait_for(conn._presence.changed.wait(), remaining)
        except TimeoutError:
            pass


def client_socket(conn: PeerConnection) -> socket.socket:
    """The TCP socket under the connection's MQTT client (paho inside aiomqtt)."""
    assert conn._client is not None, "connection not entered"
    sock = conn._client._client.socket()
    assert isinstance(sock, socket.socket)
    return sock


def drop_abruptly(conn: PeerConnection) -> None:
    """Cut the connection the way a crash or a pulled cable does: no MQTT DISCONNECT.

    ``shutdown`` ends both directions at the TCP level and leaves the descriptor to
    paho, which then sees end-of-file, closes it and unregisters it from the event
    loop itself (closing the descriptor under the loop would confuse the selector).
    """
    sock = client_socket(conn)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- raw frames
def payload_fields(
    sender: str, community: str, seq: int, *, session: str = SESSION, **changes: Any
) -> dict[str, Any]:
    """A valid payload map in wire order (docs/wire.md §5), fields replaceable."""
    fields: dict[str, Any] = {
        "version": 1,
        "type": "admm.round",
        "sender": sender,
        "community": community,
        "session": session,
        "seq": seq,
        "time_ms": 1_700_000_000_000,
        "body": dict(ROUND_BODY),
    }
    fields.update(changes)
    return fields


def pack(fields: Mapping[str, Any]) -> bytes:
    """msgpack bytes of a payload map."""
    data: bytes = msgpack.packb(dict(fields), use_bin_type=True)
    return data


def sign(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """A frame built from docs/wire.md alone: ``[payload, Ed25519(DOMAIN + payload)]``."""
    frame: bytes = msgpack.packb([payload, key.sign(DOMAIN + payload)], use_bin_type=True)
    return frame


def with_duplicate_key(fields: Mapping[str, Any]) -> bytes:
    """Payload bytes whose top-level map repeats the key ``type`` (same value)."""
    items = list(fields.items())
    head = bytes([0x80 | (len(items) + 1)])  # fixmap with one extra entry
    parts = [
        msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in items
    ]
    parts.append(msgpack.packb("type") + msgpack.packb(fields["type"]))
    return head + b"".join(parts)


# --------------------------------------------------------------------------- raw client
class RawPublisher:
    """A bare paho-mqtt client: publishes whatever bytes it is given, QoS 1, in order.

    No wattmesh code on its path: it stands for anyone who can reach the broker.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 1883
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}"
        )
        self._connected = threading.Event()

    def _start(self) -> None:
        self._client.on_connect = lambda *_: self._connected.set()
        self._client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self._client.connect(self._host, self._port)
        self._client.loop_start()
        if not self._connected.wait(TIMEOUT):
            self._client.loop_stop()
            raise TimeoutError(f"raw client: no CONNACK from {self._host}:{self._port}")

    def _stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    async def __aenter__(self) -> RawPublisher:
        await asyncio.to_thread(self._start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._stop)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue one QoS 1 publish; returns at once (``wait_for_publish`` on the result)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        return info

    async def publish_acked(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish and wait for the broker's PUBACK (it holds the message now)."""
        info = self.publish(topic, payload, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, TIMEOUT)
        assert info.is_published(), f"no PUBACK for {topic} within {TIMEOUT} s"

    def publish_all(self, topic: str, payloads: Iterable[bytes]) -> None:
        for payload in payloads:
            self.publish(topic, payload)
