"""Uniform-price double auction with no auctioneer, one sans-IO core per peer.

Theory of operation
-------------------
A call market (Friedman & Rust, *The Double Auction Market*, 1993; the uniform-price
"k-double auction" of Satterthwaite & Williams, J. Econ. Theory 48, 1989, with k = ½)
run by every peer on the same book instead of by an auctioneer.

1. **Order.** Peer i turns its private cost into ONE step curve inside the grid tariff
   band [sell, buy] and broadcasts it, signed (``auction.order``). With h_i the half fee
   it may pay on any pair (max_j w_ij/2) and MV(y) = −b − a·y its marginal value of
   energy [currency/kWh]:

       bid block  (Q_{k−1}, Q_k] kWh at limit  min(MV(Q_k), buy) − h_i        (buying)
       ask block  (Q_{k−1}, Q_k] kWh at limit  max(MV(−Q_k), sell) + h_i      (selling)

   The first block is what it would buy (sell) from the grid anyway, at buy − h_i
   (sell + h_i); the flexible rest, up to what it would trade at the other end of the
   band, is cut into ``steps`` equal blocks priced at their *last* kWh. So at any price
   p the curve asks for no more than the peer's true demand D(p + h_i) (supply
   −D(p − h_i)), which makes every fill individually rational (below).

2. **Agree on the book.** A peer holding an order from every other peer (or after
   ``round_timeout_s``) broadcasts ``auction.digest`` round k: SHA-256 over the list
   sender → sorted SHA-256 identities of the canonical orders it holds (at most two per
   sender); from round 2 on with that list itself. When it has the round-k digest of
   every participant:

       round 1: all digests equal   → clear on the orders held (minus any sender with two)
                else                → round 2, now with the lists
       round k ≥ 2:
       equivocators  E ← E ∪ {s : the round's lists name ≥ 2 orders of s}
       view_p        = {(s, id) in p's list : s ∉ E}        for each participant p ∉ E
       all views equal          → clear on that book (converged)
       else, k < digest_rounds  → round k+1: a sender whose order some view lacks
                                   re-broadcasts it; digests again
       else                     → clear on ∩_p view_p, the orders everyone holds
                                   (reported as not converged)

   Every participant decides from the same digests, so all reach the same book on the
   same round. A sender that signed two different orders (to different peers, or both
   to all) is caught as soon as both appear in one round's lists; both signed orders
   (identities and sequence numbers, ``evidence``) are the evidence, and the sender is
   excluded from the book. An order first seen after the peer's digest of the agreeing
   round is ignored (kept as evidence only): the book is what the digests agreed.

3. **Clear.** Bids sorted by (price ↓, sender, block), asks by (price ↑, sender, block),
   matched greedily while bid ≥ ask. With b_m, a_m the last matched bid/ask prices and
   b_u, a_u the first bid/ask with unmatched energy (−∞/+∞ if none), every p in

       [lo, hi] = [max(a_m, b_u), min(b_m, a_u)]

   is a competitive (Walrasian) price of the book; the uniform price is the midpoint
   p* = (lo + hi)/2. Volume Q* = min(B_≥, S_≤) at p*; blocks strictly in the money fill
   completely, blocks priced exactly p* share the rest pro rata to their size. A peer
   filled on both sides (only at p* itself) is netted. Bilateral trades, all at p*:
   (buyer, seller) pairs sorted by (fee w_ij, buyer id, seller id) each take what both
   still have (one fee for all: buyers and sellers in id order, at most
   n_buyers + n_sellers − 1 contracts); with differing fees, two trades are then
   crossed whenever that lowers the fees paid (2-exchange), until none does.

Individual rationality: a buyer's fill q at p* satisfies 0 ≤ q ≤ D(p* + h_i) and
sell ≤ p* + h_i ≤ buy. Since grid(y) ≥ (p* + h_i)·y for every y, its grid-only cost
C(y_g) + grid(y_g) ≥ C(y_g) + (p*+h_i)·y_g ≥ C(q) + (p*+h_i)·q when y_g ≤ q (the
convex C(y) + (p*+h_i)·y decreases up to D(p*+h_i)), and when y_g > q it buys the rest
from the grid and saves (buy − p* − h_i)·q. Sellers likewise. The fee it pays on any
pair is at most h_i per kWh. Budget balance is exact: both ends of a trade compute it
from the same book with the same float operations.

Late messages: as in :mod:`wattmesh.protocols.admm`, a peer re-publishes its order and
last two digests after ``round_timeout_s`` without progress (doubling the wait each
time), answers a neighbour that sends an older digest round, and fails after
``neighbour_timeout_s`` naming the silent peers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeGuard

import msgpack

from wattmesh.protocols.admm import standalone_cost
from wattmesh.protocols.demand import best_net_demand_at_tariff, demand_bounds
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import CoreLifecycle, Outgoing, PeerOutcome, settings_from_mapping
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.wire import Envelope

__all__ = [
    "DIGEST_TYPE",
    "EVIDENCE_TYPE",
    "ORDER_TYPE",
    "REPORT_TYPE",
    "STATUS_TYPE",
    "AuctionPeer",
    "AuctionSettings",
    "Clearing",
    "Order",
    "build_order",
    "clear_book",
    "create",
    "digest_of",
    "validate_settings",
]

ORDER_TYPE = "auction.order"
DIGEST_TYPE = "auction.digest"
STATUS_TYPE = "auction.status"
"""Per digest round: disagreement, crossing interval, own position; no cost parameters."""
REPORT_TYPE = "auction.report"
EVIDENCE_TYPE = "auction.equivocation"
"""Telemetry naming a sender caught signing two orders, with the identities as evidence."""

_ORDER_DOMAIN = b"wattmesh/auction/order\x00"
_DIGEST_DOMAIN = b"wattmesh/auction/digest\x00"
_MAX_BLOCK_KWH = 1e9
_MAX_ORDERS_PER_SENDER = 2  # two different signed orders prove equivocation; more add nothing
_DUST_KWH = 1e-12  # trades below this are rounding remainders, not contracts
_MAX_EXCHANGE_PASSES = 50

Block = tuple[float, float]
"""(limit price [currency/kWh], energy [kWh])."""


@dataclass(frozen=True, slots=True)
class AuctionSettings:
    """``[market.auction]`` of a scenario."""

    steps: int = 16  # flexible blocks per side of an order
    digest_rounds: int = 3  # digest rounds before clearing on the orders everyone holds
    round_timeout_s: float = 10.0
    neighbour_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 256:
            raise ValueError("steps must be in 1 .. 256")
        if not 2 <= self.digest_rounds <= 100:
            raise ValueError("digest_rounds must be in 2 .. 100 (round 1 only compares hashes)")
        for name in ("round_timeout_s", "neighbour_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AuctionSettings:
        """Build from a TOML table; unknown keys and wrong types raise ``ValueError``."""
        return settings_from_mapping(cls, values)


# ---------------------------------------------------------------------- orders


@dataclass(frozen=True, slots=True)
class Order:
    """One peer's signed step curve: bids by strictly decreasing, asks by strictly increasing price."""

    bids: tuple[Block, ...]
    asks: tuple[Block, ...]

    def to_body(self) -> dict[str, Any]:
        return {"bids": [[p, q] for p, q in self.bids], "asks": [[p, q] for p, q in self.asks]}

    @property
    def identity(self) -> bytes:
        """SHA-256 of the canonical order: msgpack [[bids], [asks]] of float64 pairs."""
        canonical = msgpack.packb([[[p, q] for p, q in self.bids], [[p, q] for p, q in self.asks]])
        return hashlib.sha256(_ORDER_DOMAIN + canonical).digest()

    @classmethod
    def from_body(cls, body: Mapping[str, Any], *, sell: float, buy: float, max_blocks: int) -> Order:
        """Strictly parse an ``auction.order`` body.

        Raises:
            ValueError: naming what is wrong.
        """
        if set(body) != {"bids", "asks"}:
            raise ValueError("an order has exactly the keys bids, asks")
        return cls(
            _parse_blocks(body["bids"], sell, buy, max_blocks, descending=True),
            _parse_blocks(body["asks"], sell, buy, max_blocks, descending=False),
        )


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_blocks(value: object, sell: float, buy: float, max_blocks: int, *, descending: bool) -> tuple[Block, ...]:
    if not isinstance(value, list) or len(value) > max_blocks:
        raise ValueError(f"a side is a list of at most {max_blocks} [price, kWh] blocks")
    blocks: list[Block] = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2 or not all(_is_number(x) for x in item):
            raise ValueError("a block is [price, kWh]")
        try:
            price, kwh = float(item[0]), float(item[1])
        except OverflowError:  # an integer beyond float range
            raise ValueError("block number out of range") from None
        if not sell <= price <= buy:
            raise ValueError(f"price {price!r} outside the tariff band [{sell}, {buy}]")
        if not 0.0 < kwh <= _MAX_BLOCK_KWH:
            raise ValueError(f"block energy {kwh!r} not in (0, {_MAX_BLOCK_KWH:g}]")
        blocks.append((price, kwh))
    for (p0, _), (p1, _) in pairwise(blocks):
        if (p1 >= p0) if descending else (p1 <= p0):
            raise ValueError("block prices must be strictly monotone (bids falling, asks rising)")
    return tuple(blocks)


def _merge(blocks: Iterable[Block]) -> tuple[Block, ...]:
    """Join neighbouring blocks of equal price; drop empty ones."""
    merged: list[list[float]] = []
    for price, kwh in blocks:
        if not kwh > 0.0:
            continue
        if merged and merged[-1][0] == price:
            merged[-1][1] += kwh
        else:
            merged.append([price, kwh])
    return tuple((p, q) for p, q in merged)


def build_order(spec: PeerSpec, buy: float, sell: float, half_fee: float, steps: int) -> Order:
    """The step curve a peer submits (module docstring, step 1).

    Args:
        spec: the peer's private model.
        buy, sell: grid tariff [currency/kWh], sell ≤ buy.
        half_fee: the largest fee share it may pay per kWh on any pair [currency/kWh].
        steps: flexible blocks per side.
    """
    a, b = spec.cost_quadratic, spec.cost_linear
    h = half_fee

    def marginal_value(y: float) -> float:  # of consumption at y [currency/kWh]
        return -b - a * y

    bids: list[Block] = []
    if spec.role != "seller" and buy - h >= sell:
        must = max(0.0, demand_bounds(spec, buy)[1])  # bought from the grid anyway
        most = max(must, demand_bounds(spec, sell + h)[1])  # bought at the band's floor
        bids.append((buy - h, must))
        for k in range(1, steps + 1):
            lo_q = must + (most - must) * (k - 1) / steps
            hi_q = must + (most - must) * k / steps
            limit = min(max(marginal_value(hi_q) - h, sell), buy - h)
            bids.append((limit, hi_q - lo_q))
    asks: list[Block] = []
    if spec.role != "buyer" and sell + h <= buy:
        must = max(0.0, -demand_bounds(spec, sell)[0])  # sold to the grid anyway
        most = max(must, -demand_bounds(spec, buy - h)[0])  # sold at the band's ceiling
        asks.append((sell + h, must))
        for k in range(1, steps + 1):
            lo_q = must + (most - must) * (k - 1) / steps
            hi_q = must + (most - must) * k / steps
            limit = max(min(marginal_value(-hi_q) + h, buy), sell + h)
            asks.append((limit, hi_q - lo_q))
    return Order(_merge(bids), _merge(asks))


# -------------------------------------------------------------------- clearing


@dataclass(frozen=True, slots=True)
class Clearing:
    """The uniform-price clearing of one book, identical at every peer.

    Attributes:
        price: the uniform price p* [currency/kWh].
        price_low, price_high: the crossing interval [lo, hi], clipped to the band.
        volume: energy matched Q* [kWh].
        fills: peer id -> net community import after netting [kWh] (buyers > 0).
        trades: (buyer, seller, kWh), in matching order, every one at ``price``.
    """

    price: float
    price_low: float
    price_high: float
    volume: float
    fills: Mapping[str, float]
    trades: tuple[tuple[str, str, float], ...]


def clear_book(
    book: Mapping[str, Order], sell: float, buy: float, fee: Callable[[str, str], float] | None = None
) -> Clearing:
    """Clear a book at one uniform price (module docstring, step 3). Pure and deterministic.

    Args:
        book: sender -> order.
        sell, buy: the tariff band [currency/kWh].
        fee: w_ij of a pair [currency/kWh] (public), for routing trades over cheap pairs;
            None: all pairs cost the same.
    """
    bids = sorted(
        ((-p, sender, k, q) for sender in sorted(book) for k, (p, q) in enumerate(book[sender].bids)),
    )
    asks = sorted((p, sender, k, q) for sender in sorted(book) for k, (p, q) in enumerate(book[sender].asks))
    i = j = 0
    left_bid = bids[0][3] if bids else 0.0
    left_ask = asks[0][3] if asks else 0.0
    last_bid = last_ask = None
    while i < len(bids) and j < len(asks) and -bids[i][0] >= asks[j][0]:
        last_bid, last_ask = -bids[i][0], asks[j][0]
        x = min(left_bid, left_ask)
        left_bid -= x
        left_ask -= x
        if left_bid == 0.0:  # x was this block's remainder: exactly zero, no epsilon needed
            i += 1
            left_bid = bids[i][3] if i < len(bids) else 0.0
        if left_ask == 0.0:
            j += 1
            left_ask = asks[j][3] if j < len(asks) else 0.0
    next_bid = -bids[i][0] if i < len(bids) else -math.inf  # first bid with energy left
    next_ask = asks[j][0] if j < len(asks) else math.inf
    if last_bid is None or last_ask is None:  # nothing crosses
        lo, hi = next_bid, next_ask
    else:
        lo, hi = max(last_ask, next_bid), min(last_bid, next_ask)
    lo_c, hi_c = min(max(lo, sell), buy), min(max(hi, sell), buy)
    if math.isfinite(lo) and math.isfinite(hi):
        price = 0.5 * (lo + hi)
    elif math.isfinite(lo) or math.isfinite(hi):
        price = lo if math.isfinite(lo) else hi
    else:
        price = 0.5 * (sell + buy)
    if last_bid is None:
        return Clearing(price, lo_c, hi_c, 0.0, {}, ())

    # Fills at p*: strictly in the money in full, exactly at p* pro rata.
    bid_strict = sum(q for p, _, _, q in bids if -p > price)
    bid_at = sum(q for p, _, _, q in bids if -p == price)
    ask_strict = sum(q for p, _, _, q in asks if p < price)
    ask_at = sum(q for p, _, _, q in asks if p == price)
    volume = min(bid_strict + bid_at, ask_strict + ask_at)
    bid_ratio = min(max((volume - bid_strict) / bid_at, 0.0), 1.0) if bid_at > 0 else 0.0
    ask_ratio = min(max((volume - ask_strict) / ask_at, 0.0), 1.0) if ask_at > 0 else 0.0
    net: dict[str, float] = {}
    for p, sender, _, q in bids:
        if -p > price or (-p == price and bid_ratio > 0):
            net[sender] = net.get(sender, 0.0) + (q if -p > price else q * bid_ratio)
    for p, sender, _, q in asks:
        if p < price or (p == price and ask_ratio > 0):
            net[sender] = net.get(sender, 0.0) - (q if p < price else q * ask_ratio)
    fills = {s: v for s, v in sorted(net.items()) if v != 0.0}
    trades = _route({s: v for s, v in fills.items() if v > 0}, {s: -v for s, v in fills.items() if v < 0}, fee)
    return Clearing(price, lo_c, hi_c, volume, fills, tuple(trades))


def _route(
    want: dict[str, float], have: dict[str, float], fee: Callable[[str, str], float] | None
) -> list[tuple[str, str, float]]:
    """Bilateral trades from net fills: (buyer, seller, kWh), deterministic.

    Greedy: pairs by (fee, buyer id, seller id), each taking what both still have (with
    one fee for all: buyers and sellers in id order, at most n_b + n_s − 1 contracts).
    Then, with differing fees, 2-exchanges: trades (b, s) and (b′, s′) become (b, s′)
    and (b′, s) by min(t_bs, t_b′s′) whenever w_bs′ + w_b′s < w_bs + w_b′s′, scanning in
    sorted order until none helps (at most ``_MAX_EXCHANGE_PASSES`` passes).
    """
    cost = fee if fee is not None else (lambda b, s: 0.0)
    pairs = sorted((cost(b, s), b, s) for b in want for s in have)
    flows: dict[tuple[str, str], float] = {}
    for _, b, s in pairs:
        x = min(want[b], have[s])
        if x > 0.0:
            flows[(b, s)] = x
            want[b] -= x
            have[s] -= x
    if len({w for w, _, _ in pairs}) > 1:
        for _ in range(_MAX_EXCHANGE_PASSES):
            improved = False
            keys = sorted(flows)
            for b, s in keys:
                for b2, s2 in keys:
                    t, t2 = flows.get((b, s), 0.0), flows.get((b2, s2), 0.0)
                    if b2 == b or s2 == s or t <= 0.0 or t2 <= 0.0:
                        continue
                    if cost(b, s2) + cost(b2, s) < cost(b, s) + cost(b2, s2):
                        x = min(t, t2)
                        flows[(b, s)], flows[(b2, s2)] = t - x, t2 - x
                        flows[(b, s2)] = flows.get((b, s2), 0.0) + x
                        flows[(b2, s)] = flows.get((b2, s), 0.0) + x
                        improved = True
            if not improved:
                break
    return [(b, s, x) for (b, s), x in sorted(flows.items()) if x > _DUST_KWH]


def digest_of(held: Mapping[str, Iterable[bytes]]) -> bytes:
    """SHA-256 over the sorted list [[sender, [identity, …]], …] (msgpack)."""
    canonical = msgpack.packb([[s, sorted(held[s])] for s in sorted(held)], use_bin_type=True)
    return hashlib.sha256(_DIGEST_DOMAIN + canonical).digest()


# ------------------------------------------------------------------------ core


@dataclass(frozen=True, slots=True)
class _Digest:
    """One peer's digest of a round: the hash, and from round 2 on the identities it covers."""

    digest: bytes
    held: Mapping[str, tuple[bytes, ...]] | None


class AuctionPeer(CoreLifecycle):
    """The double-auction state machine of one peer.

    Drive it with :meth:`start`, :meth:`receive` and :meth:`on_timer`; each returns the
    messages to publish. It never reads a clock: ``now`` [s] is always an argument.

    Attributes:
        order: the order this peer submits.
        book: sender -> order the market cleared on (None until cleared).
        clearing: the clearing of ``book`` (None until cleared or when excluded).
        equivocations: sender -> the distinct order identities it was caught signing.
        evidence: sender -> identity -> sequence number of the signed envelope this
            peer received carrying that order (to find the frames in a shell's log).
    """

    def __init__(self, spec: PeerSpec, public: PublicScenario, horizon: int) -> None:
        """
        Args:
            spec: this peer's private model.
            public: the session's public scenario (tariff, fees, settings).
            horizon: unused (every peer hears every other directly).

        Raises:
            ValueError: no grid, or a peer not linked to every other.
        """
        if public.grid is None:
            raise ValueError("mechanism 'auction' needs a [grid]: its tariff bounds every order")
        others = tuple(p for p in public.peer_ids if p != spec.id)
        unlinked = sorted(set(others) - set(public.links[spec.id]))
        if unlinked:
            raise ValueError(
                f"mechanism 'auction' clears one community-wide book, but {spec.id!r} is not linked to "
                f"{', '.join(unlinked[:5])} (drop the neighbors lists)"
            )
        self.peer_id = spec.id
        self.spec = spec
        self.settings = AuctionSettings.from_mapping(public.settings)
        self.neighbours: tuple[str, ...] = others
        self._public = public
        self._buy, self._sell = public.grid.buy_price, public.grid.sell_price
        half_fee = max((0.5 * public.fee(spec.id, j) for j in others), default=0.0)
        self.order = build_order(spec, self._buy, self._sell, half_fee, self.settings.steps)
        self._order_message = Outgoing("market", ORDER_TYPE, self.order.to_body())
        self._own_id = self.order.identity
        self._held: dict[str, dict[bytes, Order]] = {spec.id: {self._own_id: self.order}}
        self.evidence: dict[str, dict[bytes, int]] = {}
        self.round = 0
        self._participants: frozenset[str] = frozenset(public.peer_ids)
        self._peer_set = frozenset(public.peer_ids)
        self._digests: dict[int, dict[str, _Digest]] = {}
        self._own_digest: dict[int, _Digest] = {}
        self._sent: dict[int, Outgoing] = {}
        self.excluded: set[str] = set()
        self.equivocations: dict[str, tuple[bytes, ...]] = {}
        self.book: dict[str, Order] | None = None
        self.clearing: Clearing | None = None
        self._grid_only = standalone_cost(spec, (self._buy, self._sell))
        self._round_started = 0.0
        self._last_progress = 0.0
        self._last_resend = -math.inf
        self._resends = 0
        self.outcome: PeerOutcome | None = None
        self.failure: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """Broadcast this peer's order.

        Args:
            now: current time [s].
            start_grace_s: extra patience for the first round [s] (peers may still be starting).
        """
        if self.round != 0:
            raise RuntimeError("start() called twice")
        self.round = 1
        self._round_started = self._last_progress = now + start_grace_s
        out = [self._order_message]
        return out + self._progress(now)

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """Take a verified order or digest from another peer.

        Raises:
            ProtocolError: not a peer of the session, wrong type, or a malformed body.
            StaleRoundError: a digest more than one round ahead.
        """
        sender = envelope.sender
        if sender not in self.neighbours:
            raise ProtocolError("sender is not a peer of this auction", peer_id=sender)
        if envelope.type == ORDER_TYPE:
            return self._receive_order(sender, envelope, now)
        if envelope.type == DIGEST_TYPE:
            return self._receive_digest(sender, envelope.body, now)
        raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=sender)

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` wants to be called next [s], or None when finished."""
        if self.done or self.round == 0:
            return None
        fail_at = self._last_progress + self.settings.neighbour_timeout_s
        if self.round not in self._sent:
            return min(fail_at, self._round_started + self.settings.round_timeout_s)
        return min(fail_at, max(self._last_progress, self._last_resend) + self._resend_interval())

    def on_timer(self, now: float) -> list[Outgoing]:
        """Send a late digest, re-publish on a slow round, or fail on silent peers."""
        if self.done or self.round == 0:
            return []
        if now >= self._last_progress + self.settings.neighbour_timeout_s:
            self.failure = self._silence_report()
            return []
        if self.round not in self._sent:
            if now >= self._round_started + self.settings.round_timeout_s:
                return self._progress(now, force=True)
            return []
        if now >= max(self._last_progress, self._last_resend) + self._resend_interval():
            return self._resend(now)
        return []

    # ------------------------------------------------------------------ messages
    def _receive_order(self, sender: str, envelope: Envelope, now: float) -> list[Outgoing]:
        try:
            order = Order.from_body(envelope.body, sell=self._sell, buy=self._buy, max_blocks=self.settings.steps + 1)
        except ValueError as exc:
            raise ProtocolError(f"malformed auction.order body: {exc}", peer_id=sender) from None
        identity = order.identity
        held = self._held.setdefault(sender, {})
        if identity in held or len(held) >= _MAX_ORDERS_PER_SENDER:
            return []  # a re-send, or a third order: two already prove equivocation
        held[identity] = order
        self.evidence.setdefault(sender, {})[identity] = envelope.seq
        if self.done:  # too late for the book; keep it as evidence only
            if len(held) > 1:
                return [self._evidence_message(sender, tuple(sorted(held)), excluded=False)]
            return []
        return self._progress(now)

    def _receive_digest(self, sender: str, body: Mapping[str, Any], now: float) -> list[Outgoing]:
        k, digest = self._parse_digest(sender, body)
        if sender not in self._participants:
            return []  # an excluded equivocator: its view no longer counts
        if self.done or k < self.round:
            return self._resend(now)  # it is behind: it may lack our digest
        if k > self.round + 1:
            raise StaleRoundError(f"digest round {k} while at {self.round}", peer_id=sender, round=k)
        stored = self._digests.setdefault(k, {})
        if sender in stored:
            if stored[sender] != digest:
                raise ProtocolError(f"two different digests for round {k}", peer_id=sender)
            return []
        stored[sender] = digest
        return self._progress(now)

    def _parse_digest(self, sender: str, body: Mapping[str, Any]) -> tuple[int, _Digest]:
        """Round 1: {k, digest}; from round 2 on: {k, digest, held}, the digest matching held."""
        k, digest, held = body.get("k"), body.get("digest"), body.get("held")
        malformed = ProtocolError("malformed auction.digest body", peer_id=sender)
        if not (_is_int(k) and 1 <= k <= self.settings.digest_rounds):
            raise malformed
        if set(body) != ({"k", "digest"} if k == 1 else {"k", "digest", "held"}):
            raise malformed
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise malformed
        if k == 1:
            return k, _Digest(digest, None)
        if not isinstance(held, dict) or not set(held) <= self._peer_set:
            raise malformed
        parsed: dict[str, tuple[bytes, ...]] = {}
        for owner, ids in held.items():
            if (
                not isinstance(ids, list) or not 1 <= len(ids) <= _MAX_ORDERS_PER_SENDER
                or not all(isinstance(x, bytes) and len(x) == 32 for x in ids)
                or any(x >= y for x, y in pairwise(ids))
            ):  # fmt: skip
                raise malformed
            parsed[owner] = tuple(ids)
        if digest_of(parsed) != digest:
            raise ProtocolError("auction.digest does not match its identity list", peer_id=sender)
        return k, _Digest(digest, parsed)

    # ------------------------------------------------------------------ rounds
    def _ready(self) -> bool:
        """Holds an order from every participant: time to send this round's digest."""
        return all(p in self._held for p in self._participants)

    def _progress(self, now: float, *, force: bool = False) -> list[Outgoing]:
        out: list[Outgoing] = []
        while not self.done:
            k = self.round
            if k not in self._sent:
                if not (force or self._ready()):
                    break
                force = False
                out.append(self._send_digest(now))
            if not self._participants - {self.peer_id} <= set(self._digests.get(k, {})):
                break
            out += self._complete_round(now)
        return out

    def _send_digest(self, now: float) -> Outgoing:
        k = self.round
        held = {s: tuple(sorted(ids)) for s, ids in self._held.items()}
        own = _Digest(digest_of(held), held)
        self._own_digest[k] = own
        body: dict[str, Any] = {"k": k, "digest": own.digest}
        if k > 1:  # the lists only after a mismatch: round 1 stays O(1) per message
            body["held"] = {s: list(v) for s, v in held.items()}
        message = Outgoing("market", DIGEST_TYPE, body)
        self._sent[k] = message
        self._sent.pop(k - 2, None)
        self._last_progress = now
        self._resends = 0
        return message

    def _complete_round(self, now: float) -> list[Outgoing]:
        """Every participant's digest of this round is here: detect, agree, clear or retry."""
        k = self.round
        received = self._digests.pop(k, {})
        own = self._own_digest[k]
        others = {p: received[p] for p in self._participants if p != self.peer_id}
        self._last_progress = now
        self._resends = 0
        assert own.held is not None
        if k == 1:
            differing = sum(d.digest != own.digest for d in others.values())
            if differing:  # who holds what is unknown yet: publish the lists next round
                self.round = 2
                self._round_started = now
                return [self._status(differing, None)]
            digests = {self.peer_id: own.held}  # every participant holds exactly this
        else:
            digests = {p: d.held for p, d in others.items() if d.held is not None}
            digests[self.peer_id] = own.held
        union: dict[str, set[bytes]] = {}
        for held in digests.values():
            for sender, ids in held.items():
                union.setdefault(sender, set()).update(ids)
        out: list[Outgoing] = []
        for sender in sorted(s for s, ids in union.items() if len(ids) > 1 and s not in self.excluded):
            self.equivocations[sender] = tuple(sorted(union[sender]))
            self.excluded.add(sender)
            out.append(self._evidence_message(sender, self.equivocations[sender], excluded=True))
        participants = sorted(p for p in digests if p not in self.excluded)
        views = {
            p: frozenset((s, i) for s, ids in digests[p].items() if s not in self.excluded for i in ids)
            for p in participants
        }
        common = frozenset.intersection(*views.values()) if views else frozenset()
        agreed = all(view == common for view in views.values())
        if agreed or k >= self.settings.digest_rounds:
            return out + self._finish(common, converged=agreed)
        mine = views.get(self.peer_id, common)
        out.append(self._status(sum(view != mine for view in views.values()), None))
        if any((self.peer_id, self._own_id) not in view for view in views.values()):
            out.append(self._order_message)  # someone lacks our order: publish it again
        self._participants = self._participants - self.excluded
        self.round = k + 1
        self._round_started = now
        return out

    def _finish(self, identities: frozenset[tuple[str, bytes]], *, converged: bool) -> list[Outgoing]:
        me = self.peer_id
        trades: dict[str, tuple[float, float]] = {}
        if me not in self.excluded:
            self.book = {s: self._held[s][i] for s, i in sorted(identities)}
            self.clearing = clear_book(self.book, self._sell, self._buy, self._public.fee)
            for buyer, seller, kwh in self.clearing.trades:
                if buyer == me:
                    trades[seller] = (kwh, self.clearing.price)
                elif seller == me:
                    trades[buyer] = (-kwh, self.clearing.price)
        trades = dict(sorted(trades.items()))
        community_import = sum(kwh for kwh, _ in trades.values())
        net = best_net_demand_at_tariff(self.spec, self._buy, self._sell, community_import)
        grid_import = net - community_import
        payment = sum(kwh * price for kwh, price in trades.values())
        fees = sum(0.5 * self._public.fee(me, j) * abs(kwh) for j, (kwh, _) in trades.items())
        grid_cost = self._buy * max(grid_import, 0.0) - self._sell * max(-grid_import, 0.0)
        cost = self.spec.cost(net) + grid_cost + payment + fees
        self.outcome = PeerOutcome(
            me, converged, self.round, net, community_import, grid_import, payment, cost, self._grid_only, trades
        )
        status = self._status(0, self.clearing, converged=converged)
        return [status, Outgoing("report", REPORT_TYPE, self.outcome.to_body())]

    def _status(self, disagreement: int, clearing: Clearing | None, *, converged: bool = False) -> Outgoing:
        """Telemetry of a finished digest round (docs/mechanisms/auction.md lists the meanings)."""
        if clearing is None or self.outcome is None:
            low, high, width, cost, position, traded = self._sell, self._buy, 0.0, self._grid_only, 0.0, 0.0
            if self.outcome is not None:  # excluded: grid only
                cost = self.outcome.cost
        else:
            low, high = clearing.price_low, clearing.price_high
            width, cost = high - low, self.outcome.cost
            position, traded = self.outcome.community_import, clearing.volume
        body = {
            "k": self.round,
            "primal": float(disagreement),
            "dual": float(width),
            "price_min": float(low),
            "price_max": float(high),
            "cost": float(cost) if cost is not None else 0.0,
            "converged": converged,
            "community_import": float(position),
            "traded": float(traded),
        }
        return Outgoing("telemetry", STATUS_TYPE, body)

    def _evidence_message(self, sender: str, identities: tuple[bytes, ...], *, excluded: bool) -> Outgoing:
        seen = self.evidence.get(sender, {})
        body = {
            "k": self.round,
            "sender": sender,
            "identities": list(identities),
            "excluded": excluded,
            "held": [[i, seen[i]] for i in identities if i in seen],
        }
        return Outgoing("telemetry", EVIDENCE_TYPE, body)

    # ------------------------------------------------------------------ timers
    def _resend_interval(self) -> float:
        """round_timeout_s · 2^(re-sends since the last progress) [s]: exponential backoff."""
        return self.settings.round_timeout_s * 2.0 ** min(self._resends, 16)

    def _resend(self, now: float) -> list[Outgoing]:
        if now - self._last_resend < self._resend_interval() / 2:
            return []  # at most one burst per half interval, however many nudges arrive
        self._last_resend = now
        self._resends += 1
        return [self._order_message, *(self._sent[k] for k in (self.round - 1, self.round) if k in self._sent)]

    def _silence_report(self) -> str:
        wait = f"within {self.settings.neighbour_timeout_s:g} s"
        if self.round not in self._sent:
            missing = sorted(p for p in self._participants if p not in self._held)
            return f"no auction.order from {', '.join(missing)} {wait}"
        missing = sorted(self._participants - {self.peer_id} - set(self._digests.get(self.round, {})))
        return f"no round-{self.round} auction.digest from {', '.join(missing)} {wait}"


def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> AuctionPeer:
    """The mechanism registry's entry point (:func:`wattmesh.protocols.mechanism.create_core`)."""
    return AuctionPeer(spec, public, horizon)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check ``[market.auction]``; raises ``ValueError`` naming the bad setting."""
    AuctionSettings.from_mapping(settings)
