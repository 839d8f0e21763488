"""Settlement: every cleared trade becomes a contract signed by both parties (sans-IO).

Theory of operation
-------------------
Input: the trades a mechanism cleared for this peer, counterparty -> (import kWh,
price), identical (opposite kWh, same price) at both ends. Per trade with more than
``min_kwh``:

1. **Proposal.** The seller makes the terms (docs/contracts.md) with
   ``expires_ms = time_ms + expiry_s``, signs them, *records them as ``proposed``*
   and sends ``contract.propose`` {to, terms, signature} to the buyer's inbox; it
   re-sends every ``resend_s`` until answered.
2. **Countersignature.** The buyer checks the terms against its own trade (same
   community, session, parties; kWh within ``kwh_tolerance``, same price), that the
   seller's signature verifies, that it holds no other contract with this seller for
   this session, and that it is not too late (``now ≤ expires_ms − accept_margin_s``,
   so its answer can still arrive before the seller gives up). It countersigns,
   *records the contract as ``final``* and only then sends ``contract.accept``
   {to, terms, signature}. A proposal it cannot accept gets ``contract.reject``
   {to, reason} and nothing is recorded.
3. **Finality.** The seller records ``final`` when an accept carries a valid buyer
   signature over exactly the terms it proposed. A contract is final only with both
   signatures; a buyer re-answers a repeated proposal with the same accept (Ed25519
   is deterministic), so a lost accept heals on the next re-send.
4. **Expiry.** A proposal with no accept by ``expires_ms + grace_s`` is ``expired``
   at the seller (a valid accept arriving later still makes it ``final``: the buyer
   holds both signatures); a buyer's trade with no acceptable proposal by its own start +
   ``expiry_s + grace_s`` is ``expired`` at the buyer. Expired and rejected trades
   are never acted on (no delivery, no payment).

"Records" are returned to the shell, which must make them durable *before* sending
the messages returned with them (write-ahead): an accept is sent only after the
contract is on disk, so an acknowledged contract survives a crash. A restarted peer
rebuilds its :class:`Settlement` from its ledger's records and carries on; a restarted
buyer first sends the accept of every contract it had countersigned again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.contract import Contract, Terms, sign_terms, verify_signature
from wattmesh.protocols.errors import DecodeError, ProtocolError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import Outgoing, settings_from_mapping
from wattmesh.protocols.wire import Envelope

__all__ = [
    "ACCEPT_TYPE",
    "PROPOSE_TYPE",
    "REJECT_TYPE",
    "ContractRecord",
    "Settlement",
    "SettlementSettings",
    "SettlementStep",
]

PROPOSE_TYPE = "contract.propose"
ACCEPT_TYPE = "contract.accept"
REJECT_TYPE = "contract.reject"
STATUSES = ("agreed", "proposed", "final", "expired", "rejected")
OPEN_STATUSES = ("agreed", "proposed")


@dataclass(frozen=True, slots=True)
class SettlementSettings:
    """``[market.settlement]``-style knobs [s]; defaults suit one host and home gateways."""

    expiry_s: float = 60.0
    resend_s: float = 2.0
    grace_s: float = 5.0  # clock skew between parties that the expiry rule tolerates
    accept_margin_s: float = 10.0
    min_kwh: float = 1e-6  # smaller trades are rounding, not energy: no contract
    kwh_tolerance: float = 1e-9  # relative; both ends derive a trade from the same floats

    def __post_init__(self) -> None:
        if not (self.expiry_s > self.accept_margin_s >= 0 and self.resend_s > 0 and self.grace_s >= 0):
            raise ValueError("need expiry_s > accept_margin_s >= 0, resend_s > 0, grace_s >= 0")
        if not (self.min_kwh >= 0 and self.kwh_tolerance >= 0):
            raise ValueError("min_kwh and kwh_tolerance must be >= 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SettlementSettings:
        return settings_from_mapping(cls, values)


@dataclass(frozen=True, slots=True)
class ContractRecord:
    """One trade's settlement state as the ledger stores it (one row per session and
    counterparty). ``kwh`` is the energy traded (> 0), ``role`` this peer's side."""

    session: str
    counterparty: str
    role: str  # "buyer" | "seller"
    kwh: float
    price: float
    status: str
    terms_bytes: bytes | None = None
    seller_signature: bytes | None = None
    buyer_signature: bytes | None = None
    deadline_ms: int = 0  # when an open record expires at this peer
    reason: str | None = None  # why it was rejected or expired

    @property
    def contract(self) -> Contract | None:
        """The final contract, when both signatures are present."""
        if self.status != "final" or None in (self.terms_bytes, self.seller_signature, self.buyer_signature):
            return None
        assert self.terms_bytes and self.seller_signature and self.buyer_signature
        return Contract(self.terms_bytes, self.seller_signature, self.buyer_signature)


@dataclass(frozen=True, slots=True)
class SettlementStep:
    """Persist every record, *then* publish every message."""

    records: list[ContractRecord] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)

    def __add__(self, other: SettlementStep) -> SettlementStep:
        return SettlementStep(self.records + other.records, self.outgoing + other.outgoing)


class Settlement:
    """One peer's contract signing for one session."""

    def __init__(
        self,
        peer_id: str,
        key: Ed25519PrivateKey,
        roster: Roster,
        *,
        community: str,
        session: str,
        trades: Mapping[str, tuple[float, float]],
        settings: SettlementSettings | None = None,
        records: Iterable[ContractRecord] = (),
    ) -> None:
        """
        Args:
            trades: counterparty -> (import kWh, price) as the mechanism cleared them
                (ignored for counterparties that already have a record).
            records: this session's records from the ledger, after a restart.
        """
        self.peer_id = peer_id
        self.community = community
        self.session = session
        self.settings = settings or SettlementSettings()
        self._key = key
        self._roster = roster
        self._trades = dict(trades)
        self.records: dict[str, ContractRecord] = {r.counterparty: r for r in records if r.session == session}
        self._last_sent: dict[str, int] = {}
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def done(self) -> bool:
        return self._started and all(r.status not in OPEN_STATUSES for r in self.records.values())

    def counts(self) -> dict[str, int]:
        """Records per status, e.g. {"final": 3, "expired": 0, …}."""
        result = dict.fromkeys(STATUSES, 0)
        for record in self.records.values():
            result[record.status] += 1
        return result

    def start(self, now_ms: int) -> SettlementStep:
        """Record every trade to sign and send the proposals this peer owes.

        After a restart, the accept of every contract this peer countersigned is sent
        again: it may have died between recording the contract and sending the accept,
        and the seller's proposal may not come again before its deadline.
        """
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        step = SettlementStep()
        for other, record in sorted(self.records.items()):
            if record.role == "buyer" and record.status == "final":
                assert record.terms_bytes is not None and record.buyer_signature is not None
                step.outgoing.append(self._accept(other, record.terms_bytes, record.buyer_signature))
        deadline = now_ms + self._ms(self.settings.expiry_s + self.settings.grace_s)
        for other, (kwh, price) in sorted(self._trades.items()):
            if other in self.records or not math.isfinite(kwh) or abs(kwh) <= self.settings.min_kwh:
                continue
            role = "buyer" if kwh > 0 else "seller"
            record = ContractRecord(self.session, other, role, abs(kwh), price, "agreed", deadline_ms=deadline)
            if role == "seller":
                record = self._propose(record, now_ms)
            self.records[other] = record
            step.records.append(record)
        return step + self._send_due(now_ms)

    def next_deadline(self) -> int | None:
        """Epoch ms at which :meth:`on_timer` has something to do, or None."""
        times = []
        for other, record in self.records.items():
            if record.status in OPEN_STATUSES:
                times.append(record.deadline_ms)
            if record.status == "proposed":
                times.append(self._last_sent.get(other, 0) + self._ms(self.settings.resend_s))
        return min(times, default=None)

    def on_timer(self, now_ms: int) -> SettlementStep:
        """Expire what is overdue, re-send proposals that are still open."""
        step = SettlementStep()
        for other, record in list(self.records.items()):
            if record.status in OPEN_STATUSES and now_ms >= record.deadline_ms:
                why = "no countersignature" if record.status == "proposed" else "no acceptable proposal"
                expired = replace(record, status="expired", reason=f"{why} before the deadline")
                self.records[other] = expired
                step.records.append(expired)
        return step + self._send_due(now_ms)

    def receive(self, envelope: Envelope, now_ms: int) -> SettlementStep:
        """Handle a verified ``contract.*`` message from the inbox.

        Raises:
            ProtocolError: malformed, misaddressed, or about a trade that does not exist.
        """
        body = envelope.body
        if body.get("to") != self.peer_id:
            raise ProtocolError("contract message addressed to another peer", peer_id=envelope.sender)
        if envelope.session != self.session:
            raise ProtocolError("contract message of another session", peer_id=envelope.sender)
        if envelope.type == PROPOSE_TYPE:
            return self._on_proposal(envelope.sender, body, now_ms)
        if envelope.type == ACCEPT_TYPE:
            return self._on_accept(envelope.sender, body)
        if envelope.type == REJECT_TYPE:
            return self._on_reject(envelope.sender, body)
        raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=envelope.sender)

    # ------------------------------------------------------------------ seller side
    def _propose(self, record: ContractRecord, now_ms: int) -> ContractRecord:
        terms = Terms(
            self.community, self.session, buyer=record.counterparty, seller=self.peer_id, kwh=record.kwh,
            price=record.price, time_ms=now_ms, expires_ms=now_ms + self._ms(self.settings.expiry_s),
        )  # fmt: skip
        terms_bytes = terms.encode()
        return replace(
            record, status="proposed", terms_bytes=terms_bytes, seller_signature=sign_terms(terms_bytes, self._key),
            deadline_ms=terms.expires_ms + self._ms(self.settings.grace_s),
        )  # fmt: skip

    def _send_due(self, now_ms: int) -> SettlementStep:
        out = []
        for other, record in sorted(self.records.items()):
            if record.status != "proposed":
                continue
            if now_ms - self._last_sent.get(other, -(2**62)) < self._ms(self.settings.resend_s):
                continue
            self._last_sent[other] = now_ms
            assert record.terms_bytes is not None and record.seller_signature is not None
            body = {"to": other, "terms": record.terms_bytes, "signature": record.seller_signature}
            out.append(Outgoing("inbox", PROPOSE_TYPE, body, to=other))
        return SettlementStep(outgoing=out)

    def _on_accept(self, sender: str, body: Mapping[str, Any]) -> SettlementStep:
        record = self.records.get(sender)
        terms_bytes, signature = _bytes_field(body, "terms", sender), _bytes_field(body, "signature", sender)
        if record is None or record.role != "seller" or record.terms_bytes != terms_bytes:
            raise ProtocolError("accept for terms this peer did not propose", peer_id=sender)
        if record.status == "final":
            return SettlementStep()  # a repeated accept
        if record.status not in ("proposed", "expired"):
            raise ProtocolError(f"accept for a contract already {record.status}", peer_id=sender)
        # An accept arriving after our deadline still completes the contract: the buyer
        # countersigned in time (it checks the margin) and holds both signatures, so
        # refusing would leave the two ledgers disagreeing about a valid contract.
        verify_signature(terms_bytes, signature, sender, self._roster)
        final = replace(record, status="final", buyer_signature=signature, reason=None)
        self.records[sender] = final
        return SettlementStep(records=[final])

    def _on_reject(self, sender: str, body: Mapping[str, Any]) -> SettlementStep:
        record = self.records.get(sender)
        reason = body.get("reason")
        if record is None or record.role != "seller" or not isinstance(reason, str):
            raise ProtocolError("reject for no proposal of this peer", peer_id=sender)
        if record.status != "proposed":
            return SettlementStep()  # late: a final contract stays final
        rejected = replace(record, status="rejected", reason=f"buyer refused: {reason[:200]}")
        self.records[sender] = rejected
        return SettlementStep(records=[rejected])

    # ------------------------------------------------------------------ buyer side
    def _on_proposal(self, sender: str, body: Mapping[str, Any], now_ms: int) -> SettlementStep:
        terms_bytes, signature = _bytes_field(body, "terms", sender), _bytes_field(body, "signature", sender)
        try:
            terms = Terms.decode(terms_bytes)
        except DecodeError as exc:
            raise ProtocolError(f"proposal: {exc}", peer_id=sender) from None
        record = self.records.get(sender)
        if record is not None and record.status == "final" and record.terms_bytes == terms_bytes:
            assert record.buyer_signature is not None
            return SettlementStep(outgoing=[self._accept(sender, terms_bytes, record.buyer_signature)])
        verify_signature(terms_bytes, signature, sender, self._roster)
        problem = self._check_proposal(sender, terms, record, now_ms)
        if problem is not None:
            reject = Outgoing("inbox", REJECT_TYPE, {"to": sender, "reason": problem}, to=sender)
            return SettlementStep(outgoing=[reject])
        assert record is not None
        my_signature = sign_terms(terms_bytes, self._key)
        final = replace(
            record, status="final", kwh=terms.kwh, price=terms.price, terms_bytes=terms_bytes,
            seller_signature=signature, buyer_signature=my_signature, reason=None,
        )  # fmt: skip
        self.records[sender] = final
        return SettlementStep(records=[final], outgoing=[self._accept(sender, terms_bytes, my_signature)])

    def _check_proposal(self, sender: str, terms: Terms, record: ContractRecord | None, now_ms: int) -> str | None:
        """Why this proposal cannot be countersigned, or None."""
        if (terms.community, terms.session, terms.buyer, terms.seller) != (
            self.community, self.session, self.peer_id, sender,
        ):  # fmt: skip
            return "terms name another community, session or parties"
        if record is None or record.role != "buyer":
            return "no trade to buy from this seller in this session"
        if record.status != "agreed":
            return f"the trade is already {record.status}"
        tolerance = self.settings.kwh_tolerance * max(1.0, record.kwh)
        if abs(terms.kwh - record.kwh) > tolerance or abs(terms.price - record.price) > tolerance:
            return f"terms {terms.kwh:.9g} kWh at {terms.price:.9g} differ from the cleared {record.kwh:.9g} at {record.price:.9g}"
        if now_ms > terms.expires_ms - self._ms(self.settings.accept_margin_s):
            return "proposal too close to its expiry"
        return None

    def _accept(self, seller: str, terms_bytes: bytes, signature: bytes) -> Outgoing:
        return Outgoing("inbox", ACCEPT_TYPE, {"to": seller, "terms": terms_bytes, "signature": signature}, to=seller)

    @staticmethod
    def _ms(seconds: float) -> int:
        return round(seconds * 1000)


def _bytes_field(body: Mapping[str, Any], name: str, sender: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, bytes):
        raise ProtocolError(f"contract message without {name!r} bytes", peer_id=sender)
    return value
