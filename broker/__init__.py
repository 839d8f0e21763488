"""Start and configure the MQTT brokers a wattmesh community talks through.

Two kinds, each run as a child process: the embedded amqtt broker (needs nothing
installed) and Mosquitto with a generated configuration (faster; the one to deploy)::

    async with start_broker("auto") as broker:   # Mosquitto if installed, else embedded
        print(broker.kind, broker.url)

    files = write_security(Path("secure"), "demo", roster)   # per-peer passwords + ACL
    security = MosquittoSecurity(files.acl, password_path=files.password_file)
    async with start_broker("mosquitto", security=security) as broker: ...

:class:`BrokerProcess` is the same without asyncio. The broker relays messages; it is
never trusted with their correctness (peers sign and verify every message). Its access
control keeps peers off each other's topics and inboxes (docs/security.md).
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
    MosquittoSecurity,
    find_mosquitto,
    mosquitto_available,
    mosquitto_config_text,
)
from wattmesh.broker.security import (
    DEFAULT_MONITOR,
    SecurityFiles,
    TlsFiles,
    acl_text,
    read_password,
    write_security,
)

__all__ = [
    "DEFAULT_MONITOR",
    "KINDS",
    "BrokerHandle",
    "BrokerKind",
    "BrokerProcess",
    "BrokerUnavailable",
    "MosquittoConfig",
    "MosquittoSecurity",
    "SecurityFiles",
    "TlsFiles",
    "acl_text",
    "find_mosquitto",
    "free_port",
    "mosquitto_available",
    "mosquitto_config_text",
    "read_password",
    "resolve_kind",
    "start_broker",
    "write_security",
]
