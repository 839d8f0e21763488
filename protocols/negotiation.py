"""Bilateral negotiation market: peers match by quotes, requests and grants; one sans-IO core per peer.

Theory of operation
-------------------
In the spirit of Khorasany, Paudel, Razzaghi & Siano, "A new method for peer matching
and negotiation of prosumers in P2P energy markets", IEEE Trans. Smart Grid 12(3), 2021:
buyers and sellers concede on price round by round, each buyer asks its preferred
sellers for energy, each seller grants its preferred buyers, and a grant is a deal.
There is no matcher and no common price; every pair settles at its own price.
docs/mechanisms/negotiation.md is the long form, with the benchmark against the optimum.

Model (DESIGN.md §2): C_i(y) = a/2·y² + b·y + c on [min, max]; the grid tariff
σ = sell_price ≤ β = buy_price is *required* (it bounds every price); fee w_ij per kWh,
half paid by each side.

Demand curve. y*(p) = argmin_y C_i(y) + p·y on [min, max]; at price p ∈ [σ, β] a peer
wants to import D(p) = max(0, y*(p)) or to export S(p) = max(0, −y*(p)). With a linear
cost (a = 0) y*(−b) is the whole interval; D takes its largest and S its smallest
element (a trade at exactly the marginal value gains nothing and loses nothing).
Marginal value at community import q: V(q) = min_y C(y) + grid(y − q) is convex and
    mv(q) = −V'(q) = clip(−C'(q), σ, β) within [min, max]; β below min, σ above max.

Rounds k = 1, 2, …; each peer publishes one signed market message per round
(``negotiation.round``), read by its neighbours, carrying everything:
    {k, side, price, qty, req, grant, done, gone}
    side   "buy" | "sell" | "none". A role fixes it; a flexible peer picks it every round
           from the sign of y*(ref) (ref = midpoint of the best bid and best ask its
           neighbours quoted last round, or of the tariff when one side is missing)
           until its first deal, never while a request of its own is in flight, and
           keeps it for the session after: no peer both buys and sells.
    price  its quote. With c = rounds after the first that brought it no deal while no
           request of its own was in flight, δ = (β − σ)/steps,
               bid = min(σ + c·δ, mv(q + reserved))       ask = max(β − c·δ, mv(q)),
           both within [σ, β]; "none" quotes ref.
    qty    open quantity at the quote [kWh]: D(bid) − q − reserved, or S(ask) + q.
    req    a buyer's requests {seller: [kWh, price]}, answering the sellers' quotes of
           the round before: every selling neighbour with qty_j ≥ min_trade_kwh and
           bid ≥ ask_j + w_ij, in order of ask_j + w_ij, at price (bid + ask_j)/2, for
               x_j = min(qty_j, D(price + w_ij/2) − q − reserved),
           dropped below min_trade_kwh. x_j is reserved until the seller's message of the
           next round (its answer) has been taken, then granted or released.
    grant  a seller's grants {buyer: [kWh, price]}, answering the requests of the round
           before, in order of price − w_ij, each for
               x = min(requested, S(price − w_ij/2) + q)   (q after the grants before it),
           at exactly the request's price; only while it is on the sell side. A grant is
           the deal: the buyer records the same two floats, energy with opposite sign.
    done   its last message: no new requests; neighbours drop it from matching.
    gone   {peer: r}: "I use none of your messages from round r on" (failures below).
    Ties between equally priced counterparties follow a fixed pseudo-random order per
    peer, crc32("own id|other id"), not the ids: with ties by id every buyer queued at
    the same seller while the others gave up unasked (docs: 49 % of the optimal gain at
    N = 200 full, 95 % with this order and the seller patience rule below).

Individual rationality. Each deal's quantity stops where the peer's marginal value
meets the deal's price net of its half fee, counted from everything already committed
or reserved; V is convex, so each deal lowers V by at least its payment plus fee share,
and reservations released later only make that truer. Hence the final cost
V(q) + payments + fees ≤ V(0), its grid-only cost (``admm.standalone_cost``).

Stopping. A peer marks its message done when (in this order) k = ``max_rounds``; no
neighbour is left to trade with; it is *filled* (D(σ) − q, or S(β) + q, below
``min_trade_kwh`` with nothing in flight); or it has been idle for ``patience`` rounds
in a row. Idle: no deal, no request made or in flight, its quote at its bound
(bid = mv(q + reserved), ask = mv(q)), the best counter-quote it sees (lowest ask + fee,
highest bid − fee) did not improve, and, for a seller, no buyer's bid − fee exceeds its
ask (buyers may still be busy with other sellers). A request counts as activity safely:
a seller's quote promises at least its quantity at any price from its ask up, so a
request is refused only when the seller sold to someone else meanwhile, left the sell
side or stopped; refusals cannot go on without deals somewhere, and ``max_rounds``
bounds the rest. After its done message a peer waits for that round's messages of its
neighbours (the answers to its last requests) and finishes. Peers end on different
rounds; a request to a peer whose message of the same round says done is void.

Rounds are synchronous per neighbour, as in ADMM: round k completes when every
neighbour that has not stopped has sent its round-k message. After ``round_timeout_s``
without progress the last two messages are re-sent, with exponential backoff; an older
round from a neighbour is taken as "still waiting for us" and answered the same way
(rate-limited). A peer without neighbours settles with the grid at once.

Failures. After ``neighbour_timeout_s`` without progress, each neighbour whose round-r
message is missing is gone: the peer uses its messages up to round r − 1 only,
releases every request to it, and says ``gone: {j: r}`` in every later message. A peer
reading ``gone: {me: r}`` from j treats j as gone too and uses j's messages up to
round r (j's grants there answer requests j saw); its own grants to j from round r on
were never seen by j and are cancelled, its requests to j from round r on are void.
Its grants to j in the last two rounds before it gave j up are in doubt (j may not have
seen them); it finishes only once j's own notice has settled them, or after another
``neighbour_timeout_s``. Both ends therefore agree on every deal unless messages stay
lost for good. A silent neighbour costs its counterparties only the energy reserved for
it during the rounds in flight (released when it is given up) and the session one
``neighbour_timeout_s``; the session never hangs. A crashed buyer leaves the grants made
to it in its last two rounds one-sided: the result lists them under ``disputes`` (and
the buyer under ``missing_peers``).

Liars. A neighbour that signs two different round messages for one round is caught by
the peer shell (protocols/evidence.py), which publishes the proof and calls
:meth:`NegotiationPeer.exclude`. The liar is then gone, by the machinery above, from the
cut round r = min(latest round heard from it, own round, the round of an earlier
gone-notice about it): its messages from round r on are dropped (pending ones included)
and later ones ignored, its notices no longer count, every request to it is released,
it is never waited for again, and every later message says ``gone: {liar: r}``. Every
deal with it is void at this end, whatever its round: from the proof on the shell drops
all the liar sends, contract messages included, so no contract with it could be signed
(ADMM keeps no trade with a liar either). A peer that finished before the proof is not
affected: the shell does not call ``exclude`` on a finished core and still takes that
liar's contract messages for it. Voiding only frees energy the honest side had
committed: V is convex and a peer only buys or only sells, so each remaining deal is
still worth its payment plus fee share, the peer still ends no worse off than with the
grid alone, and it trades on with the others with that energy open again (a flexible
peer left without deals picks its side again). Deals between honest peers are
untouched. The outcome lists the liar under ``excluded``.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wattmesh.protocols.admm import best_net_demand, standalone_cost
from wattmesh.protocols.demand import demand_bounds
from wattmesh.protocols.errors import ProtocolError, StaleRoundError
from wattmesh.protocols.mechanism import CoreLifecycle, Outgoing, PeerOutcome, settings_from_mapping
from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.wire import Envelope

__all__ = [
    "GRID_REQUIRED",
    "REPORT_TYPE",
    "ROUND_TYPE",
    "STATUS_TYPE",
    "Deal",
    "NegotiationPeer",
    "NegotiationSettings",
    "create",
    "marginal_value",
    "validate_public",
    "validate_settings",
]

logger = logging.getLogger(__name__)

ROUND_TYPE = "negotiation.round"
STATUS_TYPE = "negotiation.status"
"""Per-round telemetry: open quantity, spread, price range, cost, community import."""
REPORT_TYPE = "negotiation.report"
_BODY_KEYS = frozenset({"k", "side", "price", "qty", "req", "grant", "done", "gone"})
_SIDES = ("buy", "sell", "none")
_IMPROVEMENT = 1e-12  # [currency/kWh]: a counter-quote must move by more to count as improving
GRID_REQUIRED = (
    "mechanism 'negotiation' needs a [grid] table: the tariff bounds every price "
    "(buyers bid up from sell_price, sellers ask down from buy_price)"
)


@dataclass(frozen=True, slots=True)
class NegotiationSettings:
    """``[market.negotiation]`` of a scenario."""

    steps: int = 20  # concession steps from one end of the tariff to the other: δ = (β − σ)/steps
    max_rounds: int = 200
    patience: int = 3  # idle rounds at the price bound before a peer stops (R)
    min_trade_kwh: float = 1e-3  # smaller requests and grants are not made [kWh]
    round_timeout_s: float = 10.0
    neighbour_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("steps", "max_rounds", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("min_trade_kwh", "round_timeout_s", "neighbour_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NegotiationSettings:
        """Build from a TOML table; unknown keys and wrong types raise ``ValueError``."""
        return settings_from_mapping(cls, values)


@dataclass(frozen=True, slots=True)
class Deal:
    """One concluded deal as this peer records it.

    ``kwh`` > 0: this peer imports from ``counterparty``; < 0: it exports. ``round`` is the
    round of the grant that concluded it. Both ends hold the same floats, sign flipped.
    """

    counterparty: str
    kwh: float
    price: float
    round: int


# ---------------------------------------------------------------------- the private model
def _wanted_import(spec: PeerSpec, price: float) -> float:
    """D(p) = max(0, largest y*(p)) [kWh]: community import worth buying at price p."""
    return max(0.0, demand_bounds(spec, price)[1])


def _offered_export(spec: PeerSpec, price: float) -> float:
    """S(p) = max(0, −smallest y*(p)) [kWh]: community export worth selling at price p."""
    return max(0.0, -demand_bounds(spec, price)[0])


def marginal_value(spec: PeerSpec, grid: tuple[float, float], community_import: float, *, selling: bool) -> float:
    """−V'(q): what one more kWh of community import is worth at import q [currency/kWh].

    V(q) = min_y C(y) + grid(y − q). Buyers use the right derivative (the next kWh in),
    sellers the left one (the next kWh out); the two differ only at the limits.

    Args:
        grid: (buy_price, sell_price).
    """
    buy, sell = grid
    q = community_import
    if q < spec.min_kwh or (selling and q == spec.min_kwh):
        return buy
    if q > spec.max_kwh or (not selling and q == spec.max_kwh):
        return sell
    return min(max(-(spec.cost_linear + spec.cost_quadratic * q), sell), buy)


# ---------------------------------------------------------------------- body validation
def _is_int(value: object) -> bool:
    """An integer msgpack can carry; bool is an int subclass and must not pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64


def _is_number(value: object) -> bool:
    return (isinstance(value, float) and math.isfinite(value)) or _is_int(value)


@dataclass(frozen=True, slots=True)
class _Round:
    """A validated ``negotiation.round`` body."""

    k: int
    side: str
    price: float
    qty: float
    req: Mapping[str, tuple[float, float]]
    grant: Mapping[str, tuple[float, float]]
    done: bool
    gone: Mapping[str, int]


@dataclass(slots=True)
class _Neighbour:
    """What this peer knows about one neighbour's session."""

    done_at: int | None = None  # round of its done message
    until: float = math.inf  # last round of its messages this peer uses (finite: gone)
    noticed: bool = False  # its gone-notice about us has been applied

    @property
    def available(self) -> bool:
        """Still a counterparty: neither stopped nor gone."""
        return self.done_at is None and self.until == math.inf

    def awaited(self, k: int) -> bool:
        return (self.done_at is None or k <= self.done_at) and k <= self.until


@dataclass(slots=True)
class _Quotes:
    """The best counter-quotes seen in one round [currency/kWh]."""

    best_bid: float | None = None  # highest bid − fee among buying neighbours
    best_ask: float | None = None  # lowest ask + fee among selling neighbours with quantity
    bids: list[float] = field(default_factory=list)  # raw bids, for the reference price
    asks: list[float] = field(default_factory=list)


class NegotiationPeer(CoreLifecycle):
    """The negotiation state machine of one peer.

    Drive it with :meth:`start`, :meth:`receive` and :meth:`on_timer`; each returns the
    messages to publish. It never reads a clock: ``now`` [s] is always an argument.
    """

    def __init__(self, spec: PeerSpec, public: PublicScenario, horizon: int) -> None:
        """
        Args:
            spec: this peer's private model.
            public: the session's public scenario (links, fees, tariff, settings).
            horizon: unused (peers stop on their own, no vote travels the graph); kept for
                the mechanism interface.

        Raises:
            ValueError: the scenario has no ``[grid]`` (message :data:`GRID_REQUIRED`), or
                a bad ``[market.negotiation]`` setting.
        """
        if public.grid is None:
            raise ValueError(GRID_REQUIRED)
        self.peer_id = spec.id
        self.spec = spec
        self.settings = NegotiationSettings.from_mapping(public.settings)
        self.neighbours: tuple[str, ...] = tuple(public.links[spec.id])
        self._links = public.links
        self._grid = (public.grid.buy_price, public.grid.sell_price)
        self._buy, self._sell = self._grid
        self._delta = (self._buy - self._sell) / self.settings.steps
        self._fee = {j: public.fee(spec.id, j) for j in self.neighbours}
        # ties among equally priced counterparties: a fixed pseudo-random order per peer,
        # so buyers facing equal asks spread over the sellers instead of queuing at one
        self._tie = {j: zlib.crc32(f"{spec.id}|{j}".encode()) for j in self.neighbours}
        self._peers = {j: _Neighbour() for j in self.neighbours}
        self.excluded: set[str] = set()  # neighbours proven to equivocate (see exclude)
        self.side = {"buyer": "buy", "seller": "sell"}.get(spec.role, "none")
        self.round = 0  # the round whose own message has been sent
        self.price = self._sell if self.side == "buy" else self._buy
        self.deals: list[Deal] = []
        self._requests: dict[int, dict[str, tuple[float, float]]] = {}  # round sent -> seller -> (kWh, price)
        self._inbox: dict[int, dict[str, _Round]] = {}
        self._missing: set[str] = set()  # awaited neighbours whose message for self.round is not here
        self._gone_notices: dict[str, int] = {}
        self._heard: dict[str, int] = {}  # neighbour -> latest round of a well-formed message from it
        self._concessions = 0  # c
        self._idle = 0
        self._last_quotes = _Quotes()
        self._quote_qty = 0.0
        self._final_round: int | None = None
        self._closing = False  # final round processed, waiting for notices on grants in doubt
        self._doubts: dict[str, float] = {}  # neighbour given up on -> until when we wait for its notice [s]
        self._stop_reason = ""
        self._sent: dict[int, Outgoing] = {}
        self._started = False
        self._last_progress = 0.0
        self._last_resend = -math.inf
        self._resends = 0
        self.outcome: PeerOutcome | None = None
        self.failure: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]:
        """Quote for round 1; with no neighbour at all, settle with the grid at once.

        Args:
            now: current time [s].
            start_grace_s: extra patience for round 1 [s] (neighbours may still be starting).
        """
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        self._last_progress = now + start_grace_s
        if not self.neighbours:
            self._stop_reason = "alone"
            return self._finish()
        out = self._advance({}, dealt=False)
        return out + self._complete_ready(now)

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]:
        """Take a verified round message from a neighbour.

        Raises:
            ProtocolError: not a neighbour, wrong type, a malformed body, a grant that
                answers no request of ours, or a message after the sender's last round.
            StaleRoundError: a round more than one ahead (an honest peer never does this).
        """
        if envelope.type != ROUND_TYPE:
            raise ProtocolError(f"unexpected message type {envelope.type!r}", peer_id=envelope.sender)
        sender = envelope.sender
        peer = self._peers.get(sender)
        if peer is None:
            raise ProtocolError("sender is not my neighbour", peer_id=sender)
        if sender in self.excluded:
            return []  # a proven liar: nothing it says counts any more
        body = self._parse(sender, envelope.body)
        k = body.k
        self._heard[sender] = max(self._heard.get(sender, 0), k)
        out: list[Outgoing] = []
        if self.peer_id in body.gone and not peer.noticed:
            self._apply_notice(sender, body.gone[self.peer_id])
            if self._closing and not self._doubts:
                out = self._finish()
        if self.done or self._closing:
            # a neighbour still at our last round or before is waiting for a message of ours
            return out + (self._resend(now) if k <= self.round and peer.until == math.inf else [])
        if k > peer.until:
            return self._complete_ready(now)  # gone: only its notices still count
        if peer.done_at is not None and k > peer.done_at:
            raise ProtocolError(f"round {k} after its final round {peer.done_at}", peer_id=sender)
        if k < self.round:
            return self._resend(now)  # it is behind us, waiting for one of our messages
        if sender in self._inbox.get(k, {}):
            return []  # a repeat: it waits for someone, maybe not us; our own timer re-sends
        if k > self.round + 1:
            raise StaleRoundError(f"round {k} while at {self.round}", peer_id=sender, round=k)
        mine = body.grant.get(self.peer_id)
        if mine is not None:
            asked = self._requests.get(k - 1, {}).get(sender)
            if asked is None or mine[0] > asked[0] or mine[1] != asked[1]:
                raise ProtocolError(f"grant {list(mine)} answers no request of ours", peer_id=sender)
        self._inbox.setdefault(k, {})[sender] = body
        if k == self.round:
            self._missing.discard(sender)
        return self._complete_ready(now)

    def exclude(self, peer_id: str, now: float) -> list[Outgoing]:
        """Stop trading with a neighbour proven to equivocate (protocols/evidence.py).

        It is gone from the cut round r = min(latest round heard from it, own round, an
        earlier gone-notice about it), as in *Failures* and *Liars* (module docstring):
        its messages from round r on are dropped and later ones ignored, every request to
        it is released, it is never waited for again, and every later message says
        ``gone: {peer_id: r}``. Every deal with it is void, whatever its round (the shell
        drops its contract messages, so none could be signed); the energy is open again.
        The outcome lists it under ``excluded``.

        Args:
            peer_id: the liar.
            now: current time [s].

        Returns:
            What the exclusion unblocks: the rounds that waited only for the liar, or
            the report when finishing waited only for it. [] for a peer that is not a
            neighbour, one already excluded, or once this peer has finished.
        """
        peer = self._peers.get(peer_id)
        if peer is None or peer_id in self.excluded or self.done:
            return []
        self.excluded.add(peer_id)
        cut = max(1, min(self._heard.get(peer_id, 0), self.round, self._gone_notices.get(peer_id, self.round)))
        peer.until = min(peer.until, cut - 1)
        peer.noticed = True  # its notices no longer count
        if self.round >= 1:  # (a notice must name an earlier round than the message carrying it)
            self._gone_notices.setdefault(peer_id, cut)
        self._doubts.pop(peer_id, None)  # our grants to it are void: nothing left in doubt
        voided = [d for d in self.deals if d.counterparty == peer_id]
        self.deals = [d for d in self.deals if d.counterparty != peer_id]
        for requests in self._requests.values():
            requests.pop(peer_id, None)
        for inbox in self._inbox.values():
            inbox.pop(peer_id, None)
        logger.warning(
            "%s: %s proven to equivocate: gone from round %d on, all %d deal(s) with it void (%+g kWh)",
            self.peer_id, peer_id, cut, len(voided), math.fsum(d.kwh for d in voided),
        )  # fmt: skip
        if not self._started:
            return []
        if self._closing:
            return [] if self._doubts else self._finish()
        self._update_missing()
        return self._complete_ready(now)

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` wants to be called next [s], or None when finished."""
        if self.done or not self._started:
            return None
        if self._closing:
            return max(self._doubts.values())
        return min(
            self._last_progress + self.settings.neighbour_timeout_s,
            max(self._last_progress, self._last_resend) + self._resend_interval(),
        )

    def on_timer(self, now: float) -> list[Outgoing]:
        """Re-publish on a late round; give up on neighbours silent for neighbour_timeout_s."""
        if self.done or not self._started:
            return []
        if self._closing:
            return self._finish() if now >= max(self._doubts.values()) else []
        if now >= self._last_progress + self.settings.neighbour_timeout_s:
            k = self.round
            silent = sorted(self._missing)
            for j in silent:
                self._declare_gone(j, k, now)
            logger.warning(
                "%s: no round-%d message from %s within %g s; trading on without them",
                self.peer_id, k, ", ".join(silent), self.settings.neighbour_timeout_s,
            )  # fmt: skip
            self._last_progress = now
            self._resends = 0
            return self._complete_ready(now)
        if now >= max(self._last_progress, self._last_resend) + self._resend_interval():
            return self._resend(now)
        return []

    # ------------------------------------------------------------------ messages in
    def _parse(self, sender: str, body: Mapping[str, Any]) -> _Round:
        """Strict shape check of a round body; raises ProtocolError naming what is wrong."""

        def bad(why: str) -> ProtocolError:
            return ProtocolError(f"malformed negotiation.round body: {why}", peer_id=sender)

        if set(body) != _BODY_KEYS:
            raise bad(f"keys must be exactly {', '.join(sorted(_BODY_KEYS))}")
        k, side, price, qty, done = body["k"], body["side"], body["price"], body["qty"], body["done"]
        if not _is_int(k) or k < 1:
            raise bad("k must be an integer >= 1")
        if side not in _SIDES or not isinstance(side, str):
            raise bad("side must be buy, sell or none")
        if not _is_number(price) or not self._sell <= price <= self._buy:
            raise bad("price must be a number within the grid tariff")
        if not _is_number(qty) or qty < 0:
            raise bad("qty must be a number >= 0")
        if not isinstance(done, bool):
            raise bad("done must be a boolean")
        links = self._links.get(sender, ())
        offers: dict[str, dict[str, tuple[float, float]]] = {}
        for name in ("req", "grant"):
            table = body[name]
            if not isinstance(table, dict):
                raise bad(f"{name} must be a map")
            parsed: dict[str, tuple[float, float]] = {}
            for j, entry in table.items():
                if j not in links:
                    raise bad(f"{name} names {j!r}, not a neighbour of the sender")
                if not isinstance(entry, list) or len(entry) != 2 or not all(_is_number(v) for v in entry):
                    raise bad(f"{name} entries must be [kWh, price]")
                kwh, at = float(entry[0]), float(entry[1])
                if not kwh > 0 or not self._sell <= at <= self._buy:
                    raise bad(f"{name} needs kWh > 0 and a price within the grid tariff")
                parsed[j] = (kwh, at)
            offers[name] = parsed
        if offers["req"] and (side != "buy" or done):
            raise bad("only a buyer that is not done makes requests")
        if offers["grant"] and side != "sell":
            raise bad("only a seller grants")
        gone = body["gone"]
        if not isinstance(gone, dict):
            raise bad("gone must be a map")
        for j, r in gone.items():
            if j not in links or not _is_int(r) or not 1 <= r < k:
                raise bad("gone maps neighbours of the sender to an earlier round >= 1")
        return _Round(k, side, float(price), float(qty), offers["req"], offers["grant"], done, dict(gone))

    def _apply_notice(self, sender: str, r: int) -> None:
        """``sender`` uses none of our messages from round r on: it is gone for us too.

        We use its messages up to round r (its grants there answer requests it saw); our
        grants to it from round r on were never seen there and are cancelled, and our
        requests to it from round r on are void.
        """
        peer = self._peers[sender]
        peer.noticed = True
        self._doubts.pop(sender, None)
        if self.done:
            if any(d.counterparty == sender and d.kwh < 0 and d.round >= r for d in self.deals):
                logger.warning(
                    "%s: %s gave up on us at round %d after we finished: our grants to it from then on are "
                    "one-sided (a dispute in the result)", self.peer_id, sender, r,
                )  # fmt: skip
            return
        peer.until = min(peer.until, r)
        kept = [d for d in self.deals if not (d.counterparty == sender and d.kwh < 0 and d.round >= r)]
        if len(kept) < len(self.deals):
            logger.info("%s: %s never saw our grants from round %d: %d cancelled", self.peer_id, sender, r,
                        len(self.deals) - len(kept))  # fmt: skip
        self.deals = kept
        for sent, requests in self._requests.items():
            if sent >= r:
                requests.pop(sender, None)
        for k, inbox in self._inbox.items():
            if k > peer.until:
                inbox.pop(sender, None)
        self._update_missing()

    def _declare_gone(self, j: str, k: int, now: float) -> None:
        """Neighbour j's round-k message never came: use its messages up to k − 1 only.

        Our grants to j in rounds k − 1 and k are in doubt: j may never have seen them. If
        it did not, its own gone-notice will say so (and cancel them); we wait for that
        notice before finishing, at most another neighbour_timeout_s.
        """
        peer = self._peers[j]
        peer.until = min(peer.until, k - 1)
        self._gone_notices.setdefault(j, k)
        if not peer.noticed and any(d.counterparty == j and d.kwh < 0 and d.round >= k - 1 for d in self.deals):
            self._doubts[j] = now + self.settings.neighbour_timeout_s
        for requests in self._requests.values():
            requests.pop(j, None)  # unanswered (round k − 1) or not yet answerable: released
        self._update_missing()

    # ------------------------------------------------------------------ rounds
    def _awaited(self, k: int) -> list[str]:
        return [j for j in self.neighbours if self._peers[j].awaited(k)]

    def _update_missing(self) -> None:
        inbox = self._inbox.get(self.round, {})
        self._missing = {j for j in self._awaited(self.round) if j not in inbox}

    def _complete_ready(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        while self._started and not self.done and not self._closing and not self._missing:
            self._last_progress = now
            self._resends = 0
            out += self._complete_round()
        return out

    def _complete_round(self) -> list[Outgoing]:
        """Every awaited round-k message is here: take the answers, then quote round k + 1."""
        k = self.round
        received = self._inbox.pop(k, {})
        bodies = {j: received[j] for j in self._awaited(k)}
        asked = self._requests.pop(k - 1, {})  # answered now, or released: the answer round has passed
        dealt = False
        for j, body in bodies.items():
            grant = body.grant.get(self.peer_id)
            if grant is not None and j in asked:
                self.deals.append(Deal(j, grant[0], grant[1], k))
                dealt = True
            if body.done:
                self._peers[j].done_at = k
                self._requests.get(k, {}).pop(j, None)  # it will not answer our round-k request
        if self._final_round == k:
            if self._doubts:
                self._closing = True
                return []
            return self._finish()
        return self._advance(bodies, dealt=dealt)

    def _advance(self, bodies: Mapping[str, _Round], *, dealt: bool) -> list[Outgoing]:
        """Grants, side, concession, stop rule and requests for round k + 1, as one message."""
        k = self.round + 1
        settings = self.settings
        quotes = self._quotes(bodies)
        grants: dict[str, list[float]] = {}
        if self.side == "sell":
            grants = self._grant(bodies, k)
            dealt = dealt or bool(grants)
        in_flight = any(self._requests.values())
        if self.spec.role == "flexible" and not self.deals and not in_flight:
            self.side = self._choose_side(quotes)
        if not dealt and not in_flight:
            self._concessions += 1 if k > 1 else 0
        committed = self._committed()
        position = committed + self._reserved()
        if self.side == "buy":
            bound = marginal_value(self.spec, self._grid, position, selling=False)
            self.price = min(self._sell + self._concessions * self._delta, self._buy, bound)
        elif self.side == "sell":
            bound = marginal_value(self.spec, self._grid, position, selling=True)
            self.price = max(self._buy - self._concessions * self._delta, self._sell, bound)
        else:
            bound = self.price = self._reference(quotes)

        requests: dict[str, list[float]] = {}
        stop = ""
        available = any(p.available for p in self._peers.values())
        if k >= settings.max_rounds:
            stop = "max_rounds"
        elif not available:
            stop = "no counterparty"
        elif not in_flight and self._filled(committed):
            stop = "filled"
        elif self.side == "buy":
            requests = self._request(bodies, position, k)
        improved = self._improved(quotes)
        self._last_quotes = quotes
        # A request counts as activity: it is refused only when the seller sold to someone
        # else since its quote (the quote promised that much at a price at least as good),
        # left the sell side or stopped, so requests cannot go on without deals somewhere.
        # A seller whose ask some buyer's bid still covers waits for its requests: in a large
        # community the buyers serve one seller after another.
        crossed = self.side == "sell" and quotes.best_bid is not None and quotes.best_bid > self.price + _IMPROVEMENT
        idle = not (dealt or requests or in_flight or improved or crossed) and self.price == bound
        self._idle = self._idle + 1 if idle else 0
        if not stop and self._idle >= settings.patience:
            stop = "patience"
        if stop:
            requests = {}
            self._requests.pop(k, None)
            self._stop_reason = stop
            self._final_round = k

        position = committed + self._reserved()
        if self.side == "buy":
            self._quote_qty = max(0.0, _wanted_import(self.spec, self.price) - position)
        elif self.side == "sell":
            self._quote_qty = max(0.0, _offered_export(self.spec, self.price) + committed)
        else:
            self._quote_qty = 0.0
        self.round = k
        self._update_missing()
        message = Outgoing(
            "market",
            ROUND_TYPE,
            {
                "k": k,
                "side": self.side,
                "price": self.price,
                "qty": self._quote_qty,
                "req": requests,
                "grant": grants,
                "done": bool(stop),
                "gone": dict(self._gone_notices),
            },
        )
        self._sent[k] = message
        self._sent.pop(k - 2, None)
        return [message, self._status(quotes)]

    def _quotes(self, bodies: Mapping[str, _Round]) -> _Quotes:
        quotes = _Quotes()
        for j, body in bodies.items():
            if body.done or not self._peers[j].available:
                continue
            if body.side == "buy":
                quotes.bids.append(body.price)
                bid = body.price - self._fee[j]
                quotes.best_bid = bid if quotes.best_bid is None else max(quotes.best_bid, bid)
            elif body.side == "sell" and body.qty >= self.settings.min_trade_kwh:
                quotes.asks.append(body.price)
                ask = body.price + self._fee[j]
                quotes.best_ask = ask if quotes.best_ask is None else min(quotes.best_ask, ask)
        return quotes

    def _reference(self, quotes: _Quotes) -> float:
        """Midpoint of the best bid and ask quoted around us; the tariff midpoint if one side is missing."""
        if quotes.bids and quotes.asks:
            return 0.5 * (max(quotes.bids) + min(quotes.asks))
        return 0.5 * (self._buy + self._sell)

    def _choose_side(self, quotes: _Quotes) -> str:
        low, high = demand_bounds(self.spec, self._reference(quotes))
        if low > 0:
            return "buy"
        if high < 0:
            return "sell"
        return "none"

    def _improved(self, quotes: _Quotes) -> bool:
        """Did the best counter-quote move our way since the last round?"""
        last = self._last_quotes
        bid_up = quotes.best_bid is not None and (
            last.best_bid is None or quotes.best_bid > last.best_bid + _IMPROVEMENT
        )
        ask_down = quotes.best_ask is not None and (
            last.best_ask is None or quotes.best_ask < last.best_ask - _IMPROVEMENT
        )
        if self.side == "buy":
            return ask_down
        if self.side == "sell":
            return bid_up
        return bid_up or ask_down

    def _filled(self, committed: float) -> bool:
        """Nothing more is worth trading even at the best price of the tariff."""
        eps = self.settings.min_trade_kwh
        more_in = _wanted_import(self.spec, self._sell) - committed
        more_out = _offered_export(self.spec, self._buy) + committed
        if self.side == "buy" or (self.spec.role == "buyer"):
            return more_in < eps
        if self.side == "sell" or (self.spec.role == "seller"):
            return more_out < eps
        return more_in < eps and more_out < eps

    def _request(self, bodies: Mapping[str, _Round], position: float, k: int) -> dict[str, list[float]]:
        """A buyer's requests to the sellers whose last quote meets its bid (plus fee)."""
        eps = self.settings.min_trade_kwh
        sellers = sorted(
            (body.price + self._fee[j], self._tie[j], j)
            for j, body in bodies.items()
            if self._peers[j].available and not body.done and body.side == "sell" and body.qty >= eps
            and self.price >= body.price + self._fee[j]
        )  # fmt: skip
        requests: dict[str, list[float]] = {}
        sent: dict[str, tuple[float, float]] = {}
        for _, _, j in sellers:
            ask = bodies[j].price
            price = 0.5 * (self.price + ask)
            want = _wanted_import(self.spec, price + 0.5 * self._fee[j]) - position
            kwh = min(bodies[j].qty, want)
            if kwh < eps:
                continue
            requests[j] = [kwh, price]
            sent[j] = (kwh, price)
            position += kwh
        if sent:
            self._requests[k] = sent
        return requests

    def _grant(self, bodies: Mapping[str, _Round], k: int) -> dict[str, list[float]]:
        """A seller's grants to last round's requests, best net price first; each is a deal."""
        eps = self.settings.min_trade_kwh
        asks = sorted(
            (-(request[1] - self._fee[j]), self._tie[j], j, request)
            for j, body in bodies.items()
            if self._peers[j].available and (request := body.req.get(self.peer_id)) is not None
        )
        grants: dict[str, list[float]] = {}
        committed = self._committed()
        for _, _, j, (kwh, price) in asks:
            room = _offered_export(self.spec, price - 0.5 * self._fee[j]) + committed
            amount = min(kwh, room)
            if amount < eps:
                continue
            grants[j] = [amount, price]
            self.deals.append(Deal(j, -amount, price, k))
            committed -= amount
        return grants

    # ------------------------------------------------------------------ settlement
    def _committed(self) -> float:
        return math.fsum(d.kwh for d in self.deals)

    def _reserved(self) -> float:
        return math.fsum(kwh for requests in self._requests.values() for kwh, _ in requests.values())

    def _trades(self) -> dict[str, tuple[float, float]]:
        """Counterparty -> (import kWh, price): deals of a pair summed in grant order.

        The price is the deal price if all deals of the pair share one, else the
        volume-weighted mean; both ends compute it from the same floats in the same
        order, so they report identical numbers (energy with opposite sign).
        """
        by_pair: dict[str, list[Deal]] = {}
        for deal in sorted(self.deals, key=lambda d: d.round):
            by_pair.setdefault(deal.counterparty, []).append(deal)
        trades = {}
        for j, deals in sorted(by_pair.items()):
            kwh = 0.0
            value = 0.0
            for d in deals:
                kwh += d.kwh
                value += d.kwh * d.price
            prices = {d.price for d in deals}
            trades[j] = (kwh, prices.pop() if len(prices) == 1 else value / kwh)
        return trades

    def _settle(self) -> tuple[float, float, float, float, float]:
        """(net, community import, grid import, payment, cost) [kWh, kWh, kWh, currency, currency]."""
        community_import = self._committed()
        net = best_net_demand(self.spec, self._grid, community_import)
        grid_import = net - community_import
        payment = math.fsum(d.kwh * d.price for d in self.deals)
        fees = math.fsum(0.5 * self._fee[d.counterparty] * abs(d.kwh) for d in self.deals)
        buy, sell = self._grid
        grid_cost = buy * max(grid_import, 0.0) - sell * max(-grid_import, 0.0)
        cost = self.spec.cost(net) + grid_cost + payment + fees
        return net, community_import, grid_import, payment, cost

    def _status(self, quotes: _Quotes) -> Outgoing:
        if self.side == "buy" and quotes.best_ask is not None:
            spread = max(0.0, quotes.best_ask - self.price)
        elif self.side == "sell" and quotes.best_bid is not None:
            spread = max(0.0, self.price - quotes.best_bid)
        else:
            spread = 0.0
        prices = [d.price for d in self.deals] or [self.price]
        _, community_import, _, _, cost = self._settle()
        return Outgoing(
            "telemetry",
            STATUS_TYPE,
            {
                "k": self.round,
                "primal": self._quote_qty,
                "dual": spread,
                "price_min": min(prices),
                "price_max": max(prices),
                "cost": cost,
                "converged": self._final_round is not None,
                "community_import": community_import,
                "traded": math.fsum(abs(d.kwh) for d in self.deals),
            },
        )

    def _finish(self) -> list[Outgoing]:
        net, community_import, grid_import, payment, cost = self._settle()
        self.outcome = PeerOutcome(
            self.peer_id, self._stop_reason != "max_rounds", self.round, net, community_import,
            grid_import, payment, cost, standalone_cost(self.spec, self._grid), self._trades(),
            tuple(sorted(self.excluded)),
        )  # fmt: skip
        logger.debug("%s: finished at round %d (%s)", self.peer_id, self.round, self._stop_reason)
        return [Outgoing("report", REPORT_TYPE, self.outcome.to_body())]

    # ------------------------------------------------------------------ re-sends
    def _resend_interval(self) -> float:
        """round_timeout_s · 2^(re-sends since the last progress) [s]: exponential backoff."""
        return self.settings.round_timeout_s * 2.0 ** min(self._resends, 16)

    def _resend(self, now: float) -> list[Outgoing]:
        if now - self._last_resend < self._resend_interval() / 2:
            return []  # at most one burst per half interval, however many nudges arrive
        self._last_resend = now
        self._resends += 1
        return [self._sent[k] for k in (self.round - 1, self.round) if k in self._sent]


def create(spec: PeerSpec, public: PublicScenario, horizon: int) -> NegotiationPeer:
    """The mechanism registry's entry point (:func:`wattmesh.protocols.mechanism.create_core`).

    Raises:
        ValueError: the scenario has no ``[grid]`` (:data:`GRID_REQUIRED`) or a bad setting.
    """
    return NegotiationPeer(spec, public, horizon)


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check ``[market.negotiation]``; raises ``ValueError`` naming the bad setting."""
    NegotiationSettings.from_mapping(settings)


def validate_public(public: PublicScenario) -> None:
    """Check what ``validate_settings`` cannot see: the tariff is required.

    Raises:
        ValueError: :data:`GRID_REQUIRED` when the scenario has no ``[grid]``.
    """
    if public.grid is None:
        raise ValueError(GRID_REQUIRED)
