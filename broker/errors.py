"""The one error the broker package raises on purpose.

It sits under :class:`~wattmesh.protocols.errors.WattmeshError`, so the CLI turns it into
one clear line, but beside :class:`~wattmesh.protocols.errors.ProtocolError`: it is an
I/O failure on this host, not something a peer sent.
"""

from __future__ import annotations

from wattmesh.protocols.errors import WattmeshError

__all__ = ["BrokerUnavailable"]


class BrokerUnavailable(WattmeshError):
    """A broker could not be started on this host, or died while starting.

    Attributes:
        kind: ``"embedded"`` or ``"mosquitto"``.
        address: ``host:port`` it was to listen on (empty if no port was chosen yet).
        reason: why, in words, e.g. ``"127.0.0.1:1883 is already in use"``.
        output: the broker's last lines of stderr and log joined by `` | `` (may be
            empty), so the one-line message still shows what the broker itself said.
    """

    def __init__(self, reason: str, *, kind: str, address: str = "", output: str = "") -> None:
        self.kind = kind
        self.address = address
        self.reason = reason
        self.output = output
        where = f"{kind} broker on {address}" if address else f"{kind} broker"
        super().__init__(f"{where}: {reason}" + (f" (broker output: {output})" if output else ""))
