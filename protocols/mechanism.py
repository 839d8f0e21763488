"""What every market mechanism core offers the shell, and how a scenario picks one.

A mechanism core is one peer's sans-IO state machine (STYLE.md: h11/aioquic shape). The
peer shell (``wattmesh.peer.market``) and the in-memory bus drive any core the same way:

    out = core.start(now, start_grace_s=…)      # first messages
    out = core.receive(envelope, now)          # a verified message from a peer it listens to
    out = core.on_timer(now)                   # when ``next_deadline()`` has passed

and publish each :class:`Outgoing`. A core ends with ``outcome`` (a :class:`PeerOutcome`,
bilateral trades with prices, the same schema for every mechanism) or ``failure``.
Every mechanism's cleared trades are then settled as two-party contracts
(:mod:`wattmesh.protocols.settlement`), whatever produced them.

Message types are ``<mechanism>.<name>``; per-round telemetry uses
``<mechanism>.status`` and the final report ``<mechanism>.report`` so a monitor follows
any mechanism.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

from wattmesh.protocols.scenario import PeerSpec, PublicScenario
from wattmesh.protocols.wire import Envelope

__all__ = [
    "MECHANISM_MODULES",
    "CoreLifecycle",
    "MarketCore",
    "Outgoing",
    "PeerOutcome",
    "check_scenario",
    "create_core",
    "settings_from_mapping",
    "validate_settings",
]

_Settings = TypeVar("_Settings")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the shell must sign and publish.

    ``channel`` is ``"market"`` (the sender's own market topic, read by every peer that
    listens to it), ``"inbox"`` (directed: ``to`` names the one recipient, who checks
    that the signed body names it too), ``"telemetry"`` (per-round status for
    monitors) or ``"report"``.
    """

    channel: str
    type: str
    body: Mapping[str, Any]
    to: str | None = None

    def __post_init__(self) -> None:
        if (self.channel == "inbox") != (self.to is not None):
            raise ValueError("an inbox message needs a recipient, and only an inbox message has one")


@dataclass(frozen=True, slots=True)
class PeerOutcome:
    """What a peer reports when the market has cleared (all values signed by it)."""

    peer_id: str
    converged: bool
    iterations: int
    net_demand: float
    community_import: float
    grid_import: float
    payment: float
    cost: float
    grid_only_cost: float | None  # its cost trading with nobody (None: no feasible point)
    trades: Mapping[str, tuple[float, float]]  # counterparty -> (import kWh, price per kWh)
    excluded: tuple[str, ...] = ()  # neighbours it stopped trading with (liars, gone for good)

    def to_body(self) -> dict[str, Any]:
        return {
            "converged": self.converged,
            "iterations": self.iterations,
            "net_demand": self.net_demand,
            "community_import": self.community_import,
            "grid_import": self.grid_import,
            "payment": self.payment,
            "cost": self.cost,
            "grid_only_cost": self.grid_only_cost,
            "trades": {j: [kwh, price] for j, (kwh, price) in self.trades.items()},
            "excluded": list(self.excluded),
        }


class CoreLifecycle:
    """What every core means by finished and by lingering, in one place: done once it
    has an outcome or a failure; after finishing it stays ``neighbour_timeout_s`` for
    neighbours that still need a re-send."""

    outcome: PeerOutcome | None
    failure: str | None
    settings: Any  # the mechanism's settings, with neighbour_timeout_s

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.failure is not None

    @property
    def linger_s(self) -> float:
        return float(self.settings.neighbour_timeout_s)


class MarketCore(Protocol):
    """One peer's market mechanism, sans-IO."""

    peer_id: str
    neighbours: tuple[str, ...]
    """Peers whose market topic this core reads (and who may write to its inbox)."""
    outcome: PeerOutcome | None
    failure: str | None

    @property
    def done(self) -> bool: ...

    @property
    def linger_s(self) -> float:
        """How long to stay after finishing, answering neighbours that are behind [s]."""
        ...

    def start(self, now: float, *, start_grace_s: float = 0.0) -> list[Outgoing]: ...

    def receive(self, envelope: Envelope, now: float) -> list[Outgoing]: ...

    def on_timer(self, now: float) -> list[Outgoing]: ...

    def next_deadline(self) -> float | None: ...


MECHANISM_MODULES: Mapping[str, str] = {
    "admm": "wattmesh.protocols.admm",
    "negotiation": "wattmesh.protocols.negotiation",
    "consensus": "wattmesh.protocols.consensus",
    "gdb": "wattmesh.protocols.gdb",
    "auction": "wattmesh.protocols.auction",
    "stackelberg": "wattmesh.protocols.stackelberg",
}
"""``market.mechanism`` -> module with ``create(spec, public, horizon)`` and ``validate_settings(mapping)``."""


def _module(mechanism: str) -> Any:
    try:
        name = MECHANISM_MODULES[mechanism]
    except KeyError:
        raise ValueError(f"unknown mechanism {mechanism!r}") from None
    return importlib.import_module(name)


def create_core(spec: PeerSpec, public: PublicScenario, horizon: int) -> MarketCore:
    """The core of ``public.mechanism`` for peer ``spec``.

    Args:
        horizon: rounds a message needs to reach every peer (the diameter of the
            public link graph), for mechanisms that vote on stopping.
    """
    core: MarketCore = _module(public.mechanism).create(spec, public, horizon)
    return core


def check_scenario(public: PublicScenario, peers: Mapping[str, PeerSpec]) -> str | None:
    """Why the mechanism cannot run this community (e.g. it needs a grid), or None.

    Each core checks what it needs when it is created; creating every peer's core once
    at load time turns those checks into a scenario error instead of a failed run.
    """
    for spec in peers.values():
        try:
            create_core(spec, public, 1)
        except ValueError as exc:
            return str(exc)
    return None


def validate_settings(mechanism: str, settings: Mapping[str, Any]) -> None:
    """Check ``[market.<mechanism>]``.

    Raises:
        ValueError: naming the bad setting and why.
    """
    _module(mechanism).validate_settings(settings)


def settings_from_mapping(cls: type[_Settings], values: Mapping[str, Any]) -> _Settings:
    """Build a mechanism's frozen settings dataclass from its ``[market.<mechanism>]`` table.

    Types follow each field's default (bool, int, float; ``None`` defaults take a number).

    Raises:
        ValueError: an unknown key (naming the allowed ones), a wrong type, or what the
            dataclass's ``__post_init__`` rejects.
    """
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown setting {key!r} (allowed: {', '.join(known)})")
        default = known[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise ValueError(f"setting {key!r} has the wrong type ({type(value).__name__})")
        kwargs[key] = value
    return cls(**kwargs)
