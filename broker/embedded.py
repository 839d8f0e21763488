"""The embedded broker: amqtt serving one loopback (or given) TCP listener.

This module runs *inside* the broker child process (``python -m wattmesh.broker
embedded --host H --port P``, started by :mod:`wattmesh.broker.launch`); the caller
never imports amqtt.

TCP_NODELAY: amqtt never sets it, yet it needs no code here. amqtt accepts through
``asyncio.start_server``, and CPython's asyncio sets TCP_NODELAY on every TCP socket it
wraps in a transport, accepted ones included (``base_events._set_nodelay``, called by
the selector and the proactor transports). Verified: ``getsockopt`` on amqtt's accepted
sockets returns 1, and a QoS 1 ping-pong through this broker
(``tests/benchmarks/raw_pingpong.py``) takes ~1 ms, ~48 ms once TCP_NODELAY is cleared
on them (Nagle waiting for the client's delayed ACK).
``tests/integration/test_brokers.py`` guards that round trip.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from amqtt.broker import Broker
from amqtt.errors import BrokerError

from wattmesh.broker.errors import BrokerUnavailable
from wattmesh.broker.launch import format_address

__all__ = ["amqtt_config", "serve"]

logger = logging.getLogger(__name__)


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12 broker configuration: one TCP listener, anonymous clients.

    Only the anonymous-auth plugin is loaded. amqtt's defaults add a task publishing
    ``$SYS/`` statistics every 20 s and two logger plugins called for every event and
    packet; wattmesh uses none of them.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": format_address(host, port)}},
        "plugins": {
            # Admits every client. Fine for a local zero-setup broker; a deployment
            # uses Mosquitto with per-peer ACLs (FIELD-NOTES, "Transport").
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGINT or SIGTERM, then shut it down cleanly.

    Raises:
        BrokerUnavailable: amqtt could not start, e.g. the port is in use.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    broker = Broker(amqtt_config(host, port))
    try:
        await broker.start()
    except BrokerError as exc:
        cause = exc.__cause__
        reason = f"cannot listen: {cause.strerror}" if isinstance(cause, OSError) else str(exc)
        address = format_address(host, port)
        raise BrokerUnavailable(reason, kind="embedded", address=address) from exc
    logger.info("embedded broker listening on %s", format_address(host, port))
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
