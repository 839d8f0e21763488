"""Both broker kinds, started through ``wattmesh.broker``, do what the peers rely on.

Raw aiomqtt clients only (no wattmesh peer code): delivery at QoS 1, retained presence,
Last Will on a dropped connection, loopback-only listeners, no Nagle stall, and clean
start/stop/error behaviour of the launcher and its command line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from benchmarks.raw_pingpong import raw_round_trip_ms

from wattmesh.broker import (
    BrokerHandle,
    BrokerProcess,
    BrokerUnavailable,
    MosquittoConfig,
    mosquitto_config_text,
    start_broker,
)
from wattmesh.broker.command import main

TIMEOUT = 5.0  # [s] for any single network event; they take milliseconds


async def _next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(client.messages), TIMEOUT)


def _connect_with_will(client_id: str, will_topic: str, will_payload: bytes) -> bytes:
    """An MQTT 3.1.1 CONNECT carrying a QoS 1 Last Will, built by hand.

    A raw socket lets the test drop the connection the way a crashed peer or a pulled
    cable does, which no MQTT client library offers.
    """

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(2, "big") + data

    flags = 0x02 | 0x04 | 0x08  # clean session, will flag, will QoS 1
    body = (
        field(b"MQTT")
        + bytes([4, flags])
        + (60).to_bytes(2, "big")  # keep-alive [s]
        + field(client_id.encode())
        + field(will_topic.encode())
        + field(will_payload)
    )
    assert len(body) < 128, "one-byte remaining length"
    return bytes([0x10, len(body)]) + body


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets listening on ``port`` (Linux ``/proc/net/tcp*``)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            columns = row.split()
            address, hex_port = columns[1].split(":")
            if columns[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)
                # The kernel prints addresses as host-order 32-bit words.
                host_order = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(host_order)))
    return found


async def test_client_receives_its_own_qos1_publish(
    any_broker: BrokerHandle, broker_kind: str, topic_prefix: str
) -> None:
    assert any_broker.kind == broker_kind
    assert any_broker.url == f"mqtt://127.0.0.1:{any_broker.port}"
    async with aiomqtt.Client(any_broker.host, any_broker.port) as client:
        await client.subscribe(f"{topic_prefix}/echo", qos=1)
        await client.publish(f"{topic_prefix}/echo", b"hello", qos=1)
        message = await _next_message(client)
    assert (message.topic.value, message.payload, message.qos) == (
        f"{topic_prefix}/echo",
        b"hello",
        1,
    )


async def test_retained_message_reaches_a_late_subscriber(
    any_broker: BrokerHandle, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/presence/h001"
    async with aiomqtt.Client(any_broker.host, any_broker.port) as publisher:
        await publisher.publish(topic, b"online", qos=1, retain=True)  # returns after PUBACK
    async with aiomqtt.Client(any_broker.host, any_broker.port) as late:
        await late.subscribe(topic, qos=1)
        message = await _next_message(late)
    assert (message.payload, message.retain) == (b"online", True)


async def test_last_will_is_published_when_a_connection_drops(
    any_broker: BrokerHandle, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/presence/h002"
    async with aiomqtt.Client(any_broker.host, any_broker.port) as watcher:
        await watcher.subscribe(topic, qos=1)
        reader, writer = await asyncio.open_connection(any_broker.host, any_broker.port)
        writer.write(_connect_with_will("h002", topic, b"offline"))
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"

        # Drop without DISCONNECT; linger 0 makes close() send a RST.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

        message = await _next_message(watcher)
    assert (message.topic.value, message.payload) == (topic, b"offline")


async def test_broker_listens_on_loopback_only(any_broker: BrokerHandle) -> None:
    assert _listening_addresses(any_broker.port) == {"127.0.0.1"}


async def test_request_reply_is_not_stalled_by_nagle(any_broker: BrokerHandle) -> None:
    """A QoS 1 ping-pong takes ~1 ms; with TCP_NODELAY missing on the broker's side
    Nagle's algorithm waits for a delayed ACK and it takes ≥ 40 ms
    (measured with tests/benchmarks/raw_pingpong.py, see wattmesh.broker.embedded)."""
    round_trips = await asyncio.to_thread(raw_round_trip_ms, any_broker.url, 50, 1)
    assert statistics.median(round_trips) < 20.0


async def test_stop_releases_the_port(broker_kind: str) -> None:
    async with start_broker(broker_kind) as first:
        port = first.port
    async with start_broker(broker_kind, port=port) as second:
        assert second.port == port


async def test_occupied_port_gives_a_clear_error(broker_kind: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        with pytest.raises(BrokerUnavailable) as caught:
            async with start_broker(broker_kind, port=port):
                pass
    assert str(caught.value) == (
        f"{broker_kind} broker on 127.0.0.1:{port}: cannot listen: Address already in use"
    )
    assert (caught.value.kind, caught.value.address) == (broker_kind, f"127.0.0.1:{port}")


def test_stop_with_a_client_connected_is_clean(
    broker_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM lets the broker exit by itself (no kill, no error exit) with a client on."""
    caplog.set_level(logging.WARNING, logger="wattmesh.broker")
    process = BrokerProcess(broker_kind)
    handle = process.start()
    try:
        with socket.create_connection((handle.host, handle.port), timeout=TIMEOUT) as client:
            client.sendall(_connect_with_will("h003", "test/will", b"offline"))
            assert client.recv(4) == b"\x20\x02\x00\x00"
            process.stop()
    finally:
        process.stop()
    assert caplog.records == []


@pytest.mark.mosquitto
async def test_auto_resolves_to_mosquitto_when_installed() -> None:
    async with start_broker("auto") as broker:
        assert broker.kind == "mosquitto"


def test_mosquitto_config_sets_nodelay_and_listens_on_loopback_only() -> None:
    lines = mosquitto_config_text(MosquittoConfig(port=18830)).splitlines()
    assert "set_tcp_nodelay true" in lines
    listeners = [line for line in lines if line.split()[0] in ("listener", "port", "bind_address")]
    assert listeners == ["listener 18830 127.0.0.1"]


@pytest.mark.mosquitto
def test_running_mosquitto_uses_the_generated_config() -> None:
    process = BrokerProcess("mosquitto")
    with process as handle:
        assert process.config_path is not None
        text = process.config_path.read_text()
    assert f"listener {handle.port} 127.0.0.1\n" in text
    assert "set_tcp_nodelay true\n" in text


def test_command_rejects_a_bad_argument_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kind", "rabbitmq"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("wattmesh broker: argument --kind: invalid choice: 'rabbitmq'")


def test_command_reports_an_occupied_port_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        assert main(["--kind", "embedded", "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"wattmesh broker: embedded broker on 127.0.0.1:{port}: "
        "cannot listen: Address already in use\n"
    )


def test_embedded_child_reports_an_occupied_port_without_traceback() -> None:
    """The child's own check, for a port taken after the launcher looked."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        argv = ["-m", "wattmesh.broker", "embedded", "--host", "127.0.0.1", "--port", str(port)]
        child = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert child.returncode == 2
    assert "Traceback" not in child.stderr
    assert child.stderr.splitlines()[-1] == (
        f"wattmesh broker: embedded broker on 127.0.0.1:{port}: cannot listen: "
        f"error while attempting to bind on address ('127.0.0.1', {port}): address already in use"
    )
