"""A peer's own demand at given prices: the best responses every mechanism builds on.

Pure functions of the private model (DESIGN.md §2): C(y) = a/2·y² + b·y + c on
[min, max]. Kept in one place so every mechanism answers "how much would this home
buy at price p" the same way.
"""

from __future__ import annotations

from wattmesh.protocols.scenario import PeerSpec

__all__ = ["best_net_demand_at_tariff", "demand_bounds"]


def demand_bounds(spec: PeerSpec, price: float) -> tuple[float, float]:
    """Smallest and largest minimiser of C(y) + price·y on [min, max] [kWh].

    y*(p) = clip((−p − b)/a, min, max) for a > 0; for a linear cost (a = 0) max below
    p = −b, min above, and the whole interval at p = −b.
    """
    a, b = spec.cost_quadratic, spec.cost_linear
    if a > 0:
        y = min(max((-price - b) / a, spec.min_kwh), spec.max_kwh)
        return y, y
    if price < -b:
        return spec.max_kwh, spec.max_kwh
    if price > -b:
        return spec.min_kwh, spec.min_kwh
    return spec.min_kwh, spec.max_kwh


def best_net_demand_at_tariff(spec: PeerSpec, buy: float, sell: float, community_import: float) -> float:
    """argmin_y C(y) + tariff(y − q) for a fixed community import q [kWh], sell ≤ buy.

    The convex objective has slope C′(y) + buy above q and C′(y) + sell below it, so
    y* = max(lo(buy), min(q, hi(sell))) with [lo(p), hi(p)] = :func:`demand_bounds`.
    """
    return max(demand_bounds(spec, buy)[0], min(community_import, demand_bounds(spec, sell)[1]))
