"""Raw MQTT ping-pong round trip through each broker kind: the transport's floor.

No wattmesh message code and no signatures: plain paho-mqtt clients with TCP_NODELAY,
so the figure is what the broker and loopback TCP cost. The signed-message benchmark
imports :func:`raw_round_trip_ms` to print its round trip next to this one.

One client publishes a ping on topic A; an echo client answers each ping on topic B;
the pinger sends the next ping from its receive callback, so no thread handoff sits
inside the measured loop.

Run: ``python tests/benchmarks/raw_pingpong.py [--count 2000] [--kind embedded ...]``
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from wattmesh.broker import BrokerProcess

__all__ = ["raw_round_trip_ms"]

_WARMUP = 50


def _connected_client(host: str, port: int, name: str) -> mqtt.Client:
    """A paho client with TCP_NODELAY, connected and running its network thread."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)

    def set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # Called before CONNECT is sent. paho never sets it; Nagle's algorithm would
        # hold each small publish until the previous one is acknowledged (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    connected = threading.Event()
    client.on_socket_open = set_nodelay
    client.on_connect = lambda *_: connected.set()
    client.connect(host, port)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise TimeoutError(f"{name}: no CONNACK from {host}:{port} within 10 s")
    return client


def _subscribe(client: mqtt.Client, topic: str, qos: int) -> None:
    """Subscribe and wait for the SUBACK, so no early ping goes unheard."""
    granted = threading.Event()
    client.on_subscribe = lambda *_: granted.set()
    client.subscribe(topic, qos)
    if not granted.wait(10):
        raise TimeoutError(f"no SUBACK for {topic} within 10 s")


def raw_round_trip_ms(url: str, count: int, qos: int) -> list[float]:
    """Round trips of ``count`` pings through the broker at ``url``, in milliseconds.

    Args:
        url: ``mqtt://host:port`` of a running broker.
        count: measured pings (50 more are sent first to warm up and not reported).
        qos: MQTT QoS of pings and pongs, 0 or 1 (a QoS 1 round trip also carries
            two PUBACKs).

    Returns:
        One round trip per ping [ms], in sending order.

    Raises:
        TimeoutError: the broker did not answer (connection, SUBACK or the pings).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    prefix = f"bench/{uuid.uuid4().hex}"
    ping_topic, pong_topic = f"{prefix}/ping", f"{prefix}/pong"
    total = _WARMUP + count
    round_trips: list[float] = []
    done = threading.Event()
    sent_at = 0.0

    echo = _connected_client(host, port, f"{prefix}-echo".replace("/", "-"))
    pinger = _connected_client(host, port, f"{prefix}-ping".replace("/", "-"))
    try:
        echo.on_message = lambda client, _u, msg: client.publish(pong_topic, msg.payload, qos)
        _subscribe(echo, ping_topic, qos)

        def send_ping() -> None:
            nonlocal sent_at
            sent_at = time.perf_counter()
            pinger.publish(ping_topic, b"ping", qos)

        def on_pong(_client: mqtt.Client, _userdata: Any, _msg: mqtt.MQTTMessage) -> None:
            round_trips.append((time.perf_counter() - sent_at) * 1000.0)
            if len(round_trips) < total:
                send_ping()
            else:
                done.set()

        pinger.on_message = on_pong
        _subscribe(pinger, pong_topic, qos)
        send_ping()
        timeout = 30.0 + total * 0.1
        if not done.wait(timeout):
            raise TimeoutError(f"{len(round_trips)} of {total} pongs within {timeout:.0f} s")
    finally:
        for client in (pinger, echo):
            client.disconnect()
            client.loop_stop()
    return round_trips[_WARMUP:]


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[94]


def main() -> None:
    """Measure every requested broker kind at QoS 0 and 1 and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="pings per cell (default 2000)")
    parser.add_argument(
        "--kind",
        action="append",
        choices=["embedded", "mosquitto"],
        help="broker kind, repeatable (default: both)",
    )
    options = parser.parse_args()
    print(f"raw paho ping-pong, TCP_NODELAY on, {options.count} pings per row")
    print(f"{'broker':<10} {'qos':>3} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for kind in options.kind or ["embedded", "mosquitto"]:
        with BrokerProcess(kind) as broker:
            for qos in (0, 1):
                samples = raw_round_trip_ms(broker.url, options.count, qos)
                print(
                    f"{kind:<10} {qos:>3} {statistics.median(samples):>10.3f}"
                    f" {_p95(samples):>8.3f} {max(samples):>8.2f}"
                )


if __name__ == "__main__":
    main()
