"""Peer identities: ids, Ed25519 keys and the community roster that binds them.

A roster is the public list everyone in a community agrees on: peer id -> public key.
Its text form is TOML (``[peers]`` table of id = hex-encoded 32-byte raw public key).
Reading and writing files is the caller's business (``wattmesh.peer.keys``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from wattmesh.protocols.errors import ScenarioError

__all__ = ["PEER_ID_PATTERN", "Roster", "check_peer_id", "public_key_hex"]

_KEY_HEX_PATTERN = re.compile(r"^[0-9a-fA-F]{64}\Z")  # bytes.fromhex alone also skips spaces

PEER_ID_PATTERN = re.compile(r"^[a-z0-9-]{1,64}\Z")  # \Z: "$" would accept a final "\n"
"""Peer and community ids: lowercase letters, digits and '-', 1-64 characters.

Kept this narrow on purpose: ids appear inside MQTT topics and broker ACL patterns,
where '+', '#' and '/' have meaning (CVE-2017-7650).
"""


def check_peer_id(peer_id: object, *, what: str = "peer id") -> str:
    """Return ``peer_id`` if it is a valid id, else raise ``ValueError``."""
    if not isinstance(peer_id, str) or not PEER_ID_PATTERN.match(peer_id):
        raise ValueError(f"{what} {peer_id!r} must match [a-z0-9-]{{1,64}}")
    return peer_id


def public_key_hex(key: Ed25519PublicKey) -> str:
    """The 32-byte raw public key as 64 lowercase hex digits (the roster's text form)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@dataclass(frozen=True, slots=True)
class Roster(Mapping[str, Ed25519PublicKey]):
    """The community's public directory: peer id -> Ed25519 public key."""

    # Not named ``keys``: that would shadow Mapping.keys() and break dict(roster).
    public_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for peer_id in self.public_keys:
            check_peer_id(peer_id)

    def __getitem__(self, peer_id: str) -> Ed25519PublicKey:
        return self.public_keys[peer_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.public_keys)

    def __len__(self) -> int:
        return len(self.public_keys)

    def to_toml(self) -> str:
        """Text form, stable order: ``[peers]`` then ``id = "hex"`` lines."""
        lines = ["# wattmesh community roster: peer id = Ed25519 public key (raw, hex)", "[peers]"]
        lines += [f'{pid} = "{public_key_hex(self[pid])}"' for pid in sorted(self)]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, *, source: str = "roster") -> Roster:
        """Parse the text form; every problem is a :class:`ScenarioError` naming the key."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(source, "", f"not valid TOML ({exc})") from None
        unknown = set(data) - {"peers"}
        if unknown:
            raise ScenarioError(source, sorted(unknown)[0], "unknown key (a roster has [peers])")
        peers = data.get("peers")
        if not isinstance(peers, dict) or not peers:
            raise ScenarioError(source, "peers", "missing or empty [peers] table")
        keys: dict[str, Ed25519PublicKey] = {}
        for peer_id, hex_key in peers.items():
            if not PEER_ID_PATTERN.match(peer_id):
                raise ScenarioError(source, f"peers.{peer_id}", "peer id must match [a-z0-9-]")
            try:
                if not isinstance(hex_key, str) or not _KEY_HEX_PATTERN.match(hex_key):
                    raise ValueError
                raw = bytes.fromhex(hex_key)
                keys[peer_id] = Ed25519PublicKey.from_public_bytes(raw)
            except ValueError:
                raise ScenarioError(
                    source, f"peers.{peer_id}", "expected 64 hex digits (raw Ed25519 public key)"
                ) from None
        return cls(keys)
