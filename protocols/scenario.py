"""Scenario files (DESIGN.md §2): parse, validate, and split public from private.

One place validates everything; each error names the file, the key and why.

Decisions documented in docs/scenario.md:
* ``neighbors`` means "whom I am willing to trade with". A link i–j exists only when
  both sides consent (j in i's list or i has no list, and vice versa). A one-sided
  mention is therefore not an error, it is simply no link; naming an unknown peer or
  oneself is an error.
* ``role`` constrains the sign of every trade of the peer (Sorin et al. 2019): a buyer
  only imports on each link (t_ij >= 0), a seller only exports. This implies the
  DESIGN's q_i >= 0 / q_i <= 0 and keeps a buyer from acting as a relay. ``role =
  "leader"`` marks the price setter of mechanism ``stackelberg``: exactly one there, an
  error elsewhere; its id is public (``[market.stackelberg]`` gains ``leader``).
* Private parameters (cost, limits, role) live in :class:`PeerSpec`; everything in
  :class:`PublicScenario` (ids, links, fees, grid tariff, market settings) may be
  known to every peer.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wattmesh.protocols.errors import ScenarioError
from wattmesh.protocols.identity import PEER_ID_PATTERN

__all__ = [
    "MECHANISMS",
    "Grid",
    "PeerSpec",
    "PublicScenario",
    "Scenario",
    "parse_scenario",
    "parse_scenario_data",
]

MECHANISMS = ("admm", "negotiation", "consensus", "gdb", "auction", "stackelberg")
"""Mechanisms this version can run. Others named in DESIGN.md are rejected clearly."""
ROLES = ("buyer", "seller", "flexible", "leader")
"""``leader``: the price-setting peer of mechanism ``stackelberg`` (exactly one there, none elsewhere)."""


@dataclass(frozen=True, slots=True)
class Grid:
    """Outside option, same tariff for all [currency/kWh]; buy >= sell (no arbitrage)."""

    buy_price: float
    sell_price: float

    def cost(self, grid_import_kwh: float) -> float:
        """grid(g) = buy·max(g,0) − sell·max(−g,0) [currency]."""
        g = grid_import_kwh
        return self.buy_price * max(g, 0.0) - self.sell_price * max(-g, 0.0)


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One peer's private model: C(y) = a/2·y² + b·y + c on y ∈ [min_kwh, max_kwh].

    The household form a/2·(y − d)² is stored as a, b = −a·d, c = a·d²/2, so the
    reported cost is the household's own disutility (0 at its preferred demand).
    """

    id: str
    cost_quadratic: float  # a [currency/kWh²]
    cost_linear: float  # b [currency/kWh]
    cost_constant: float  # c [currency]
    min_kwh: float
    max_kwh: float
    role: str = "flexible"

    def cost(self, net_demand_kwh: float) -> float:
        """C_i(y) [currency]."""
        y = net_demand_kwh
        return 0.5 * self.cost_quadratic * y * y + self.cost_linear * y + self.cost_constant

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "a": self.cost_quadratic, "b": self.cost_linear,
            "c": self.cost_constant, "min": self.min_kwh, "max": self.max_kwh, "role": self.role,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeerSpec:
        return cls(d["id"], d["a"], d["b"], d["c"], d["min"], d["max"], d["role"])


@dataclass(frozen=True, slots=True)
class PublicScenario:
    """What every peer of a session may know: ids, links, fees, tariff, settings."""

    name: str
    mechanism: str
    peer_ids: tuple[str, ...]
    links: Mapping[str, tuple[str, ...]]  # peer id -> sorted neighbour ids (symmetric)
    fees: Mapping[tuple[str, str], float]  # (min id, max id) -> fee per kWh, every link
    grid: Grid | None
    settings: Mapping[str, Any] = field(default_factory=dict)  # [market.<mechanism>]

    def fee(self, a: str, b: str) -> float:
        return self.fees[(a, b) if a < b else (b, a)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mechanism": self.mechanism,
            "peer_ids": list(self.peer_ids),
            "links": {k: list(v) for k, v in self.links.items()},
            "fees": [[a, b, f] for (a, b), f in sorted(self.fees.items())],
            "grid": None if self.grid is None else [self.grid.buy_price, self.grid.sell_price],
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PublicScenario:
        grid = None if d["grid"] is None else Grid(*d["grid"])
        return cls(
            d["name"], d["mechanism"], tuple(d["peer_ids"]),
            {k: tuple(v) for k, v in d["links"].items()},
            {(a, b): f for a, b, f in d["fees"]}, grid, dict(d["settings"]),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Scenario:
    """A whole community: the public part plus every peer's private model."""

    public: PublicScenario
    peers: Mapping[str, PeerSpec]

    @property
    def name(self) -> str:
        return self.public.name


_TOP_KEYS = {"community", "market", "grid", "peers", "fees"}
_PEER_KEYS = {"id", "demand", "flex", "flex_cost", "min", "max", "cost", "role", "neighbors"}


class _Reader:
    """Typed access to a TOML table that raises ScenarioError with the key path."""

    def __init__(self, source: str, table: Mapping[str, Any], path: str, allowed: set[str]):
        self.source, self.table, self.path = source, table, path
        for key in table:
            if key not in allowed:
                raise self.error(key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def error(self, key: str, reason: str) -> ScenarioError:
        return ScenarioError(self.source, f"{self.path}{key}", reason)

    def number(self, key: str, *, default: float | None = None, minimum: float | None = None) -> float:
        if key not in self.table:
            if default is None:
                raise self.error(key, "missing (a number is required)")
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:  # TOML integers have no size limit in tomllib
            raise self.error(key, "must be finite, got a huge integer") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(key, "must be finite")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum:g}, got {value:g}")
        return value

    def string(self, key: str, *, default: str | None = None) -> str:
        if key not in self.table:
            if default is None:
                raise self.error(key, "missing (a string is required)")
            return default
        value = self.table[key]
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {type(value).__name__}")
        return value

    def table_of(self, key: str) -> Mapping[str, Any]:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return value


def parse_scenario(text: str, *, source: str = "scenario") -> Scenario:
    """Parse and validate a scenario file's text.

    Args:
        text: the TOML text.
        source: file name used in error messages.

    Raises:
        ScenarioError: naming the file, the key and the reason.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "", f"not valid TOML ({exc})") from None
    return parse_scenario_data(data, source=source)


def parse_scenario_data(data: Mapping[str, Any], *, source: str = "scenario") -> Scenario:
    """Validate a scenario already read from TOML (a home gateway assembles one per interval).

    Raises:
        ScenarioError: naming the file, the key and the reason.
    """
    top = _Reader(source, data, "", _TOP_KEYS)

    community = _Reader(source, top.table_of("community"), "community.", {"name"})
    name = community.string("name")
    if not PEER_ID_PATTERN.match(name):
        raise community.error("name", "must match [a-z0-9-]{1,64}")

    market_table = top.table_of("market")
    market = _Reader(source, market_table, "market.", {"mechanism", "fee", *MECHANISMS})
    mechanism = market.string("mechanism", default="admm")
    if mechanism not in MECHANISMS:
        raise market.error("mechanism", f"{mechanism!r} is not available (choose: {', '.join(MECHANISMS)})")
    for other in MECHANISMS:
        if other != mechanism and other in market_table:
            raise market.error(other, f"unknown key: settings of {other!r}, but the mechanism is {mechanism!r}")
    default_fee = market.number("fee", default=0.0, minimum=0.0)
    settings = dict(market.table_of(mechanism))
    for key, value in settings.items():  # the settings classes would take nan/inf/huge ints
        if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63
        ):
            raise market.error(f"{mechanism}.{key}", "must be a finite number")
    from wattmesh.protocols.mechanism import validate_settings  # each mechanism checks its own

    try:
        validate_settings(mechanism, settings)
    except ValueError as exc:
        raise ScenarioError(source, f"market.{mechanism}", str(exc)) from None

    grid: Grid | None = None
    if "grid" in data:
        g = _Reader(source, top.table_of("grid"), "grid.", {"buy_price", "sell_price"})
        grid = Grid(g.number("buy_price"), g.number("sell_price"))
        if grid.sell_price > grid.buy_price:
            raise g.error("sell_price", "must not exceed buy_price (free arbitrage against the grid)")

    raw_peers = data.get("peers")
    if not isinstance(raw_peers, list) or not raw_peers:
        raise top.error("peers", "at least one [[peers]] entry is required")
    specs: dict[str, PeerSpec] = {}
    wants: dict[str, set[str] | None] = {}
    for index, raw in enumerate(raw_peers):
        if not isinstance(raw, dict):
            raise top.error(f"peers[{index}]", "must be a table")
        spec, neighbors = _parse_peer(source, raw, index)
        if spec.id in specs:
            raise ScenarioError(source, f"peers[{index}].id", f"duplicate peer id {spec.id!r}")
        specs[spec.id] = spec
        wants[spec.id] = neighbors
    leaders = [(index, pid) for index, pid in enumerate(specs) if specs[pid].role == "leader"]
    if mechanism == "stackelberg":
        if len(leaders) != 1:
            key = "peers" if not leaders else f"peers[{leaders[1][0]}].role"
            found = "none" if not leaders else ", ".join(repr(pid) for _, pid in leaders)
            reason = f'mechanism "stackelberg" needs exactly one peer with role = "leader", found {found}'
            raise ScenarioError(source, key, reason)
        settings["leader"] = leaders[0][1]  # public: every follower must know whose prices to take
    elif leaders:
        reason = f'"leader" is a role of mechanism "stackelberg" only, not of {mechanism!r}'
        raise ScenarioError(source, f"peers[{leaders[0][0]}].role", reason)
    for index, pid in enumerate(specs):
        for other in sorted(wants[pid] or ()):
            if other == pid:
                raise ScenarioError(source, f"peers[{index}].neighbors", "a peer cannot list itself")
            if other not in specs:
                raise ScenarioError(source, f"peers[{index}].neighbors", f"unknown peer {other!r}")

    def consents(a: str, b: str) -> bool:
        return wants[a] is None or b in wants[a]  # type: ignore[operator]

    ids = tuple(specs)
    links = {
        pid: tuple(sorted(o for o in ids if o != pid and consents(pid, o) and consents(o, pid)))
        for pid in ids
    }
    fees = {(a, b): default_fee for a in ids for b in links[a] if a < b}
    raw_fees = data.get("fees", [])
    if not isinstance(raw_fees, list):
        raise top.error("fees", "must be an array of tables [[fees]]")
    for index, raw in enumerate(raw_fees):
        path = f"fees[{index}]."
        if not isinstance(raw, dict):
            raise top.error(f"fees[{index}]", "must be a table")
        f = _Reader(source, raw, path, {"a", "b", "fee"})
        a, b = f.string("a"), f.string("b")
        for key, pid in (("a", a), ("b", b)):
            if pid not in specs:
                raise f.error(key, f"unknown peer {pid!r}")
        if b not in links[a]:
            raise f.error("b", f"{a!r} and {b!r} are not neighbours, a fee for them means nothing")
        fees[(a, b) if a < b else (b, a)] = f.number("fee", minimum=0.0)

    _check_feasible(source, specs, links, grid)
    public = PublicScenario(name, mechanism, ids, links, fees, grid, settings)
    from wattmesh.protocols.mechanism import check_scenario

    problem = check_scenario(public, specs)
    if problem is not None:
        raise ScenarioError(source, "market.mechanism", problem)
    return Scenario(public, specs)


def _parse_peer(source: str, raw: Mapping[str, Any], index: int) -> tuple[PeerSpec, set[str] | None]:
    r = _Reader(source, raw, f"peers[{index}].", _PEER_KEYS)
    pid = r.string("id")
    if not PEER_ID_PATTERN.match(pid):
        raise r.error("id", f"{pid!r} must match [a-z0-9-]{{1,64}}")
    role = r.string("role", default="flexible")
    if role not in ROLES:
        raise r.error("role", f"{role!r} is not one of {', '.join(ROLES)}")
    if "cost" in raw:
        for key in ("demand", "flex", "flex_cost"):
            if key in raw:
                raise r.error(key, "not allowed with 'cost' (general form); use min/max")
        cost = _Reader(source, r.table_of("cost"), f"peers[{index}].cost.", {"a", "b"})
        a = cost.number("a", minimum=0.0)
        b = cost.number("b", default=0.0)
        c = 0.0
        lo, hi = r.number("min"), r.number("max")
    else:
        demand = r.number("demand")
        a = r.number("flex_cost", minimum=0.0)
        b, c = -a * demand, 0.5 * a * demand * demand
        if "flex" in raw:
            if "min" in raw or "max" in raw:
                raise r.error("flex", "give either flex or min/max, not both")
            flex = r.number("flex", minimum=0.0)
            lo, hi = demand - flex, demand + flex
        else:
            lo, hi = r.number("min", default=demand), r.number("max", default=demand)
            if not lo <= demand <= hi:
                raise r.error("demand", f"{demand:g} lies outside min/max [{lo:g}, {hi:g}]")
    if lo > hi:
        raise r.error("min", f"min {lo:g} > max {hi:g}")
    neighbors: set[str] | None = None
    if "neighbors" in raw:
        value = raw["neighbors"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise r.error("neighbors", "must be a list of peer ids")
        neighbors = set(value)
    return PeerSpec(pid, a, b, c, lo, hi, role), neighbors


def _check_feasible(
    source: str, specs: Mapping[str, PeerSpec], links: Mapping[str, tuple[str, ...]], grid: Grid | None
) -> None:
    """Without a grid every group of connected peers must be able to balance itself."""
    if grid is not None:
        return
    ids = list(specs)
    for index, pid in enumerate(ids):
        s = specs[pid]
        if (s.role == "buyer" and s.max_kwh < 0) or (s.role == "seller" and s.min_kwh > 0):
            raise ScenarioError(source, f"peers[{index}].role", f"a {s.role} with limits [{s.min_kwh:g}, {s.max_kwh:g}] cannot balance without a grid")
        if not links[pid] and not s.min_kwh <= 0 <= s.max_kwh:
            raise ScenarioError(source, f"peers[{index}].neighbors", "no trading partner and no grid, but 0 kWh is outside its limits")
    seen: set[str] = set()
    for start in ids:
        if start in seen:
            continue
        component, stack = [], [start]
        seen.add(start)
        while stack:
            pid = stack.pop()
            component.append(pid)
            for other in links[pid]:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        lo = sum(specs[p].min_kwh for p in component)
        hi = sum(specs[p].max_kwh for p in component)
        if lo > 1e-9 or hi < -1e-9:
            raise ScenarioError(source, "grid", f"without a grid, peers {', '.join(sorted(component)[:5])}… cannot balance: their net demand lies in [{lo:g}, {hi:g}] kWh, which excludes 0")
