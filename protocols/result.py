"""The result file of a run (DESIGN.md §2), aggregated from the peers' signed reports.

Nothing here solves anything: every figure is what a peer reported and signed. The
only check is agreement: both ends of a trade must report the same energy (opposite
signs) and the same price, else the trade is listed under ``disputes``. A trade is
``signed`` when both ends report a final two-party contract for it (settlement).
A peer without a report (failed, or gone for good and excluded by its neighbours) is
listed under ``missing_peers``, with its reason under ``failed_peers`` when known; the
run is then not ``converged``, though the peers under ``peers`` may have cleared among
themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wattmesh.protocols.scenario import PublicScenario

__all__ = ["AGREEMENT_TOLERANCE", "aggregate_reports"]

AGREEMENT_TOLERANCE = 1e-9
"""Both ends derive a trade from the same two floats, so they agree to rounding."""
_MIN_TRADE_KWH = 1e-9


def aggregate_reports(
    public: PublicScenario,
    reports: Mapping[str, Mapping[str, Any]],
    *,
    wall_seconds: float,
    failed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build the result document from one report body per peer.

    Args:
        public: the session's public scenario.
        reports: peer id -> verified report body (``PeerOutcome.to_body()`` plus
            ``messages``/``bytes`` counters added by the peer's shell).
        wall_seconds: time from launch to the last report [s].
        failed: peer id -> why it has no report (its ``session.failed`` reason, or what
            the launcher saw); listed under ``failed_peers``, and still missing.
    """
    failed = dict(failed or {})
    missing = [pid for pid in public.peer_ids if pid not in reports]
    peers: dict[str, Any] = {}
    trades: list[dict[str, Any]] = []
    disputes: list[dict[str, Any]] = []
    published = sum(int(r.get("messages", 0)) for r in reports.values())
    sent_bytes = sum(int(r.get("bytes", 0)) for r in reports.values())
    for pid in public.peer_ids:
        report = reports.get(pid)
        if report is None:
            continue
        peers[pid] = {
            "net_demand": report["net_demand"],
            "community_import": report["community_import"],
            "grid_import": report["grid_import"],
            "payment": report["payment"],
            "cost": report["cost"],
            "grid_only_cost": report["grid_only_cost"],
            "excluded": list(report.get("excluded", [])),
        }
        for other, (kwh, price) in sorted(report["trades"].items()):
            if other < pid and other in reports:
                continue  # each pair once, from its first id's report
            mirror = reports.get(other, {}).get("trades", {}).get(pid)
            if mirror is None or abs(kwh + mirror[0]) > AGREEMENT_TOLERANCE or abs(price - mirror[1]) > AGREEMENT_TOLERANCE:
                disputes.append({"a": pid, "b": other, "a_says": [kwh, price], "b_says": mirror})
                continue
            if abs(kwh) < _MIN_TRADE_KWH:
                continue
            buyer, seller = (pid, other) if kwh > 0 else (other, pid)
            signed = other in report.get("signed", ()) and pid in reports.get(other, {}).get("signed", ())
            trades.append({"buyer": buyer, "seller": seller, "kwh": abs(kwh), "price": price, "signed": signed})
    baseline = [p["grid_only_cost"] for p in peers.values()]
    return {
        "scenario": public.name,
        "mechanism": public.mechanism,
        "converged": not missing and not disputes and all(r["converged"] for r in reports.values()),
        "iterations": max((int(r["iterations"]) for r in reports.values()), default=0),
        "social_cost": sum(p["cost"] for p in peers.values()),
        "grid_only_cost": None if None in baseline else sum(baseline),
        "wall_seconds": wall_seconds,
        "messages": {"published": published, "bytes": sent_bytes},
        "peers": peers,
        "trades": trades,
        "contracts": {"signed": sum(t["signed"] for t in trades), "unsigned": sum(not t["signed"] for t in trades)},
        "missing_peers": missing,
        "failed_peers": {pid: failed[pid] for pid in missing if pid in failed},
        "disputes": disputes,
    }
