"""Central social optimum of a scenario: the reference the peers are checked against.

Used only in tests and benchmarks; wattmesh never runs a central solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from wattmesh.protocols.scenario import Scenario


@dataclass(frozen=True)
class Optimum:
    social_cost: float
    net_demand: dict[str, float]
    trades: dict[tuple[str, str], float]  # (buyer-side i, j) -> t_ij, i < j


def social_optimum(scenario: Scenario) -> Optimum:
    """min Σ C_i(y_i) + grid(g_i) + Σ_pairs w_ij |t_ij| over the same constraints as ADMM."""
    public = scenario.public
    ids = list(public.peer_ids)
    pairs = sorted(public.fees)  # every link once, (a, b) with a < b
    n, m = len(ids), len(pairs)
    index = {pid: i for i, pid in enumerate(ids)}
    y = cp.Variable(n)
    t = cp.Variable(m) if m else None  # t[e] = import of pairs[e][0] from pairs[e][1]
    incidence = np.zeros((n, m))
    for e, (a, b) in enumerate(pairs):
        incidence[index[a], e] = 1.0
        incidence[index[b], e] = -1.0
    specs = [scenario.peers[pid] for pid in ids]
    qa = np.array([s.cost_quadratic for s in specs])
    lb = np.array([s.cost_linear for s in specs])
    lc = np.array([s.cost_constant for s in specs])
    lo = np.array([s.min_kwh for s in specs])
    hi = np.array([s.max_kwh for s in specs])
    q = incidence @ t if m else np.zeros(n)
    cost = 0.5 * cp.sum(cp.multiply(qa, cp.square(y))) + lb @ y + lc.sum()
    constraints = [y >= lo, y <= hi]
    if m:
        fees = np.array([public.fees[p] for p in pairs])
        cost += fees @ cp.abs(t)
        for e, (a, b) in enumerate(pairs):
            for pid, sign in ((a, 1.0), (b, -1.0)):
                role = scenario.peers[pid].role
                if role == "buyer":
                    constraints.append(sign * t[e] >= 0)
                elif role == "seller":
                    constraints.append(sign * t[e] <= 0)
    if public.grid is not None:
        g_buy = cp.Variable(n, nonneg=True)
        g_sell = cp.Variable(n, nonneg=True)
        cost += public.grid.buy_price * cp.sum(g_buy) - public.grid.sell_price * cp.sum(g_sell)
        constraints.append(y == q + g_buy - g_sell)
    else:
        constraints.append(y == q)
    problem = cp.Problem(cp.Minimize(cost), constraints)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"reference solver: {problem.status}")
    trades = {p: float(t.value[e]) for e, p in enumerate(pairs)} if m else {}
    return Optimum(float(problem.value), {pid: float(y.value[index[pid]]) for pid in ids}, trades)
