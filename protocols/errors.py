"""One error hierarchy for everything the protocol cores reject.

The CLI turns every :class:`WattmeshError` into one clear line and a non-zero exit.
Data travels as attributes (``peer_id``, ``reason``), never only inside the message.
"""

from __future__ import annotations

__all__ = [
    "DecodeError",
    "ProtocolError",
    "ReplayError",
    "ScenarioError",
    "SignatureError",
    "StaleRoundError",
    "UnknownSenderError",
    "WattmeshError",
    "WrongContextError",
]


class WattmeshError(Exception):
    """Base of every error wattmesh raises on purpose."""


class ScenarioError(WattmeshError):
    """A scenario or configuration file is invalid.

    Attributes:
        source: file name (or other origin) of the text.
        key: dotted path of the offending key, e.g. ``peers[3].flex``.
        reason: why it is rejected, in words.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {reason}")


class ProtocolError(WattmeshError):
    """An incoming message was refused. ``reason`` is a short stable tag for counters."""

    reason = "protocol"

    def __init__(self, detail: str, *, peer_id: str | None = None) -> None:
        self.peer_id = peer_id
        self.detail = detail
        super().__init__(f"{self.reason}: {detail}" + (f" (sender {peer_id})" if peer_id else ""))


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed wattmesh envelope (size, msgpack, fields, types)."""

    reason = "malformed"


class UnknownSenderError(ProtocolError):
    """The sender id is not in the community roster."""

    reason = "unknown_sender"


class SignatureError(ProtocolError):
    """The Ed25519 signature does not verify under the sender's roster key."""

    reason = "bad_signature"


class WrongContextError(ProtocolError):
    """Valid signature, but for another community or market session."""

    reason = "wrong_context"


class ReplayError(ProtocolError):
    """The per-sender sequence number did not increase: a replay or a stale copy."""

    reason = "replay"


class StaleRoundError(ProtocolError):
    """A market message for a round the receiver has already left behind.

    Attributes:
        round: the round the message was for.
    """

    reason = "stale_round"

    def __init__(self, detail: str, *, peer_id: str | None = None, round: int = -1) -> None:
        self.round = round
        super().__init__(detail, peer_id=peer_id)
