"""The run report: PNG plots and a short human summary next to the result JSON.

Everything is drawn from the result document (the peers' signed reports, aggregated)
and the monitor's per-iteration history; nothing is recomputed centrally.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["summary_text", "write_report"]

_INDIFFERENT = 1e-5
"""[currency] A competitive price can leave a peer exactly indifferent to trading; the
market's tolerance then shows as a difference of this order."""
REPORT_FILES = ("residuals.png", "prices.png", "trades.png", "costs.png", "summary.txt")


def summary_text(result: Mapping[str, Any]) -> str:
    """A few lines a person reads first: outcome, savings, self-consumption, effort."""
    peers = result["peers"]
    social, alone = result["social_cost"], result["grid_only_cost"]
    supply = sum(max(-p["net_demand"], 0.0) for p in peers.values())
    traded = sum(t["kwh"] for t in result["trades"])
    better = sum(
        1 for p in peers.values() if p["grid_only_cost"] is not None and p["cost"] <= p["grid_only_cost"] + _INDIFFERENT
    )
    lines = [
        f"wattmesh run of '{result['scenario']}' ({result['mechanism']}), session {result.get('session', '?')}",
        f"outcome: {'converged' if result['converged'] else 'NOT converged'} after {result['iterations']} iterations "
        f"in {result['wall_seconds']:.2f} s, {result['messages']['published']} messages "
        f"({result['messages']['bytes'] / 1e6:.2f} MB)",
        f"social cost: {social:.4f}",
    ]
    if alone is not None:
        saving = alone - social
        share = f" ({100 * saving / abs(alone):.1f} %)" if abs(alone) > 1e-12 else ""
        lines.append(f"grid only: {alone:.4f}; saving with sharing: {saving:.4f}{share}")
    lines.append(f"peers no worse off than grid only (±{_INDIFFERENT:g}): {better}/{len(peers)}")
    if supply > 1e-12:
        lines.append(
            f"community generation: {supply:.2f} kWh offered, {traded:.2f} kWh used inside the community "
            f"(self-consumption {100 * min(traded / supply, 1.0):.1f} %)"
        )
    lines.append(f"trades: {len(result['trades'])}, {traded:.2f} kWh")
    if result.get("disputes"):
        lines.append(f"DISPUTED trades (ends disagree): {len(result['disputes'])}")
    return "\n".join(lines) + "\n"


def write_report(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Write the PNGs and summary.txt into ``directory``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    history = result.get("history") or []

    def save(fig: Any, name: str) -> None:
        path = directory / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    # 1. residuals vs iteration, log scale
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        k = [h["iteration"] for h in history]
        ax.semilogy(k, [max(h["primal"], 1e-16) for h in history], label="primal: Σ|t_ij + t_ji| [kWh]")
        ax.semilogy(k, [max(h["dual"], 1e-16) for h in history], label="dual: Σ ρ|Δz| [per kWh]")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no telemetry recorded", ha="center", transform=ax.transAxes)
    ax.set(xlabel="iteration", ylabel="residual (log)", title="Convergence")
    ax.grid(True, which="both", alpha=0.3)
    save(fig, "residuals.png")

    # 2. price convergence: min / mean / max of the trade prices
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        k = [h["iteration"] for h in history]
        ax.fill_between(k, [h["price_min"] for h in history], [h["price_max"] for h in history], alpha=0.25, label="min–max")
        ax.plot(k, [h["price_mean"] for h in history], label="mean")
        ax.legend()
    ax.set(xlabel="iteration", ylabel="price [currency/kWh]", title="Trade prices λ_ij")
    ax.grid(True, alpha=0.3)
    save(fig, "prices.png")

    # 3. trade network: peers on a circle, arrows seller -> buyer, width ~ kWh, colour ~ price
    fig, ax = plt.subplots(figsize=(7, 7))
    ids = sorted(result["peers"])
    angle = {pid: 2 * math.pi * i / max(len(ids), 1) for i, pid in enumerate(ids)}
    pos = {pid: (math.cos(a), math.sin(a)) for pid, a in angle.items()}
    trades = result["trades"]
    if trades:
        prices = [t["price"] for t in trades]
        lo, hi = min(prices), max(prices)
        if hi - lo < 1e-3:  # a converged market has (nearly) one price: show it plainly
            lo, hi = lo - 0.005, hi + 0.005
        biggest = max(t["kwh"] for t in trades)
        cmap = plt.get_cmap("viridis")
        for t in sorted(trades, key=lambda t: t["kwh"]):
            (x0, y0), (x1, y1) = pos[t["seller"]], pos[t["buyer"]]
            colour = cmap(0.5 if hi - lo < 1e-12 else (t["price"] - lo) / (hi - lo))
            ax.annotate(
                "", xy=(x1, y1), xytext=(x0, y0),
                arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 0.5 + 4 * t["kwh"] / biggest, "alpha": 0.8},
            )  # fmt: skip
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
        bar = fig.colorbar(mappable, ax=ax, shrink=0.7, label="price [currency/kWh]")
        bar.formatter.set_useOffset(False)
        bar.update_ticks()
    marker = 120 if len(ids) <= 60 else max(6, 7200 // len(ids))
    for pid in ids:
        net = result["peers"][pid]["net_demand"]
        ax.scatter(*pos[pid], s=marker, color="tab:orange" if net < 0 else "tab:blue", zorder=3)
        if len(ids) <= 60:  # beyond that, labels only cover each other
            ax.annotate(pid, pos[pid], xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.set_title("Trades: seller → buyer (width ∝ kWh; orange = net producer)")
    ax.set_aspect("equal")
    ax.axis("off")
    save(fig, "trades.png")

    # 4. each peer's cost with sharing vs grid only
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(ids)), 4))
    x = range(len(ids))
    shared = [result["peers"][p]["cost"] for p in ids]
    alone = [result["peers"][p]["grid_only_cost"] or 0.0 for p in ids]
    ax.bar([i - 0.2 for i in x], alone, width=0.4, label="grid only")
    ax.bar([i + 0.2 for i in x], shared, width=0.4, label="with sharing")
    ax.set_xticks(list(x), ids, rotation=90, fontsize=7)
    ax.set(ylabel="cost [currency]", title="Each peer's cost")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend()
    save(fig, "costs.png")

    path = directory / "summary.txt"
    path.write_text(summary_text(result))
    written.append(path)
    return written
