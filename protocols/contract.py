"""Two-party energy contracts: terms signed by the seller and countersigned by the buyer.

Format (version 1, specified byte for byte in docs/contracts.md)::

    terms     = msgpack map {version, community, session, buyer, seller,
                             kwh, price, time_ms, expires_ms}
    signature = Ed25519(party_key, CONTRACT_DOMAIN + terms)

Both parties sign the *same* terms bytes; nobody re-encodes. A contract is final only
when both signatures verify under the roster keys of ``buyer`` and ``seller``: anyone
holding the three byte strings and the public keys can check it, without the market
messages that led to it. The domain prefix differs from the wire envelope's, so a
signed market message can never pass as a contract signature or the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.errors import DecodeError, SignatureError, UnknownSenderError
from wattmesh.protocols.identity import Roster, check_peer_id
from wattmesh.protocols.wire import unpack_strict

__all__ = ["CONTRACT_DOMAIN", "CONTRACT_VERSION", "Contract", "Terms", "sign_terms", "verify_signature"]

CONTRACT_VERSION = 1
CONTRACT_DOMAIN = b"wattmesh/contract/v1\x00"
_KEYS = ("version", "community", "session", "buyer", "seller", "kwh", "price", "time_ms", "expires_ms")
_MAX_TERMS_BYTES = 1024
_TYPES = {
    "community": str, "session": str, "buyer": str, "seller": str,
    "kwh": float, "price": float, "time_ms": int, "expires_ms": int,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Terms:
    """What buyer and seller agree on: ``kwh`` [kWh] delivered from seller to buyer at
    ``price`` [currency/kWh]. ``time_ms`` is when the seller proposed it and
    ``expires_ms`` the last moment the buyer may countersign [ms since the Unix epoch]."""

    community: str
    session: str
    buyer: str
    seller: str
    kwh: float
    price: float
    time_ms: int
    expires_ms: int

    def __post_init__(self) -> None:
        check_peer_id(self.buyer, what="buyer")
        check_peer_id(self.seller, what="seller")
        check_peer_id(self.community, what="community")
        if self.buyer == self.seller:
            raise ValueError("buyer and seller must differ")
        if not (isinstance(self.kwh, float) and math.isfinite(self.kwh) and self.kwh > 0):
            raise ValueError("kwh must be a positive finite float")
        if not (isinstance(self.price, float) and math.isfinite(self.price)):
            raise ValueError("price must be a finite float")
        if not (isinstance(self.session, str) and 0 < len(self.session) <= 128):
            raise ValueError("session must be a non-empty string of at most 128 characters")
        for name in ("time_ms", "expires_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
                raise ValueError(f"{name} must be an integer in 0 .. 2**63-1")
        if self.expires_ms < self.time_ms:
            raise ValueError("expires_ms must not be before time_ms")

    @property
    def payment(self) -> float:
        """What the buyer pays the seller [currency]."""
        return self.kwh * self.price

    def encode(self) -> bytes:
        """The terms bytes both parties sign (a map in the order of docs/contracts.md)."""
        values = {"version": CONTRACT_VERSION, **{k: getattr(self, k) for k in _KEYS[1:]}}
        packed: bytes = msgpack.packb(values, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> Terms:
        """Parse terms bytes strictly.

        Raises:
            DecodeError: not exactly the version-1 terms map.
        """
        if not isinstance(data, bytes) or len(data) > _MAX_TERMS_BYTES:
            raise DecodeError("contract terms must be at most 1 KiB of bytes")
        values = unpack_strict(data, "contract terms")
        if not isinstance(values, dict) or set(values) != set(_KEYS):
            raise DecodeError(f"contract terms must be a map with exactly the keys {', '.join(_KEYS)}")
        if type(values["version"]) is not int or values["version"] != CONTRACT_VERSION:
            raise DecodeError("unsupported contract version")
        # exact types first: a hostile value (deeply nested arrays) must never reach a
        # repr() in an error message, which could exhaust the stack
        for key, kind in _TYPES.items():
            if type(values[key]) is not kind:
                raise DecodeError(f"contract terms: {key} must be {kind.__name__}, not {type(values[key]).__name__}")
        try:
            return cls(**{k: values[k] for k in _KEYS[1:]})
        except ValueError as exc:
            raise DecodeError(f"contract terms: {exc}") from None


def sign_terms(terms_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """One party's signature over the exact terms bytes."""
    return key.sign(CONTRACT_DOMAIN + terms_bytes)


def verify_signature(terms_bytes: bytes, signature: bytes, signer: str, roster: Roster) -> None:
    """Check ``signer``'s signature over ``terms_bytes``.

    Raises:
        UnknownSenderError: ``signer`` is not in the roster.
        SignatureError: the signature does not verify.
    """
    if signer not in roster:
        raise UnknownSenderError("contract party not in roster", peer_id=signer)
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise SignatureError("contract signature must be 64 bytes", peer_id=signer)
    try:
        roster[signer].verify(signature, CONTRACT_DOMAIN + terms_bytes)
    except InvalidSignature:
        raise SignatureError("contract signature does not verify", peer_id=signer) from None


@dataclass(frozen=True, slots=True)
class Contract:
    """A final contract: the terms bytes and both parties' signatures over them."""

    terms_bytes: bytes
    seller_signature: bytes
    buyer_signature: bytes

    @property
    def terms(self) -> Terms:
        return Terms.decode(self.terms_bytes)

    def verify(self, roster: Roster) -> Terms:
        """Both signatures under the roster; returns the terms.

        Raises:
            DecodeError, UnknownSenderError, SignatureError: the contract is not valid.
        """
        terms = Terms.decode(self.terms_bytes)
        verify_signature(self.terms_bytes, self.seller_signature, terms.seller, roster)
        verify_signature(self.terms_bytes, self.buyer_signature, terms.buyer, roster)
        return terms

    def to_dict(self) -> dict[str, Any]:
        """Hex strings plus the decoded terms, for JSON export."""
        terms = Terms.decode(self.terms_bytes)
        return {
            "buyer": terms.buyer, "seller": terms.seller, "kwh": terms.kwh, "price": terms.price,
            "session": terms.session, "community": terms.community,
            "time_ms": terms.time_ms, "expires_ms": terms.expires_ms,
            "terms": self.terms_bytes.hex(), "seller_signature": self.seller_signature.hex(),
            "buyer_signature": self.buyer_signature.hex(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Contract:
        return cls(bytes.fromhex(d["terms"]), bytes.fromhex(d["seller_signature"]), bytes.fromhex(d["buyer_signature"]))
