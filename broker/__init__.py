"""Start and configure the MQTT brokers a wattmesh community talks through.

Two kinds, each run as a child process: the embedded amqtt broker (needs nothing
installed) and Mosquitto with a generated configuration (faster; the one to deploy)::

    async with start_broker("auto") as broker:   # Mosquitto if installed, else embedded
        print(broker.kind, broker.url)

:class:`BrokerProcess` is the same without asyncio. The broker relays messages; it is
never trusted with their correctness (peers sign and verify every message).
"""

from wattmesh.broker.errors import BrokerUnavailable
from wattmesh.broker.launch import (
    KINDS,
    BrokerHandle,
    BrokerKind,
    BrokerProcess,
    free_port,
    resolve_kind,
    start_broker,
)
from wattmesh.broker.mosquitto import (
    MosquittoConfig,
    find_mosquitto,
    mosquitto_available,
    mosquitto_config_text,
)

__all__ = [
    "KINDS",
    "BrokerHandle",
    "BrokerKind",
    "BrokerProcess",
    "BrokerUnavailable",
    "MosquittoConfig",
    "find_mosquitto",
    "free_port",
    "mosquitto_available",
    "mosquitto_config_text",
    "resolve_kind",
    "start_broker",
]
