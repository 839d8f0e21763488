"""The solver-free local step of bilateral ADMM against cvxpy on the same small QP.

One peer with k neighbours solves

    min  C(y) + grid(g) + Σ_j [w_j/2·|t_j| + λ_j·t_j + ρ_j/2·(t_j − z_j)²]
    s.t. y = Σ_j t_j + g,  y ∈ [min, max],  t_j ∈ [lower_j, upper_j]

(``protocols/admm.py``, ``solve_local_step``). The objective is strictly convex in the
trades, so the trades are unique; y and g are unique unless the cost is linear. The
tests compare objective values (tight), trades, and the balance y = Σt + g on seeded
random instances, then the degenerate corners one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from wattmesh.protocols.admm import LocalSolution, solve_local_step, standalone_cost
from wattmesh.protocols.scenario import PeerSpec

GRID = (0.30, 0.08)  # (buy, sell) [currency/kWh]
OBJECTIVE_TOL = 1e-8  # Clarabel at 1e-10 gaps; the local step is exact up to rounding
TRADE_TOL = 1e-6  # trades from an interior-point solver are good to ~sqrt(tol)


@dataclass(frozen=True)
class Instance:
    spec: PeerSpec
    grid: tuple[float, float] | None
    center: np.ndarray
    price: np.ndarray
    rho: np.ndarray
    half_fee: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def solve(self) -> LocalSolution:
        return solve_local_step(
            self.spec, self.grid, self.center, self.price, self.rho,
            self.half_fee, self.lower, self.upper,
        )  # fmt: skip

    def objective(self, t: np.ndarray, y: float, g: float) -> float:
        """The local objective at a point (no feasibility check)."""
        grid_cost = 0.0
        if self.grid is not None:
            buy, sell = self.grid
            grid_cost = buy * max(g, 0.0) - sell * max(-g, 0.0)
        return float(
            self.spec.cost(y) + grid_cost + self.half_fee @ np.abs(t) + self.price @ t
            + 0.5 * self.rho @ (t - self.center) ** 2
        )  # fmt: skip


def reference(inst: Instance) -> tuple[float, np.ndarray]:
    """cvxpy/Clarabel optimum of the same local QP: (objective, trades)."""
    s = inst.spec
    m = len(inst.center)
    y = cp.Variable()
    cost = 0.5 * s.cost_quadratic * cp.square(y) + s.cost_linear * y + s.cost_constant
    constraints = [y >= s.min_kwh, y <= s.max_kwh]
    traded = 0.0
    t = None
    if m:
        t = cp.Variable(m)
        cost += inst.half_fee @ cp.abs(t) + inst.price @ t
        cost += cp.sum(cp.multiply(inst.rho / 2, cp.square(t - inst.center)))
        for j in range(m):
            if np.isfinite(inst.lower[j]):
                constraints.append(t[j] >= inst.lower[j])
            if np.isfinite(inst.upper[j]):
                constraints.append(t[j] <= inst.upper[j])
        traded = cp.sum(t)
    if inst.grid is not None:
        buy, sell = inst.grid
        g_buy, g_sell = cp.Variable(nonneg=True), cp.Variable(nonneg=True)
        cost += buy * g_buy - sell * g_sell
        constraints.append(y == traded + g_buy - g_sell)
    else:
        constraints.append(y == traded)
    problem = cp.Problem(cp.Minimize(cost), constraints)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    assert problem.status == cp.OPTIMAL, problem.status
    return float(problem.value), (np.zeros(0) if t is None else np.asarray(t.value))


def random_instance(seed: int, *, grid: bool, fees: bool, roles: bool, linear: bool, k: int) -> Instance:
    """A feasible random local problem; the draws depend only on ``seed``."""
    rng = np.random.default_rng(seed)
    a = 0.0 if linear else float(rng.uniform(0.01, 1.0))
    b = float(rng.uniform(-0.6, 0.6))
    lo = float(rng.uniform(-4.0, 2.0))
    hi = lo + float(rng.uniform(0.0, 4.0))
    center = rng.normal(0.0, 1.5, k)
    price = rng.uniform(-0.1, 0.5, k)
    rho = np.exp(rng.uniform(np.log(1e-3), np.log(10.0), k))
    half_fee = rng.uniform(0.0, 0.05, k) * (rng.random(k) < 0.7) if fees else np.zeros(k)
    lower, upper = np.full(k, -np.inf), np.full(k, np.inf)
    if roles:  # each link one-way at random, as a buyer's or a seller's links are
        kind = rng.integers(0, 3, k)
        lower[kind == 1] = 0.0
        upper[kind == 2] = 0.0
    if not grid:  # without a grid the trades alone must reach [lo, hi]
        reach_lo, reach_hi = float(lower.sum()), float(upper.sum())
        if hi < reach_lo or lo > reach_hi:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
    spec = PeerSpec("p", a, b, float(rng.uniform(-1, 1)), lo, hi)
    return Instance(spec, GRID if grid else None, center, price, rho, half_fee, lower, upper)


def check_against_reference(inst: Instance) -> LocalSolution:
    sol = inst.solve()
    expected, trades = reference(inst)
    s = inst.spec
    # THEN the point is feasible: limits, trade bounds, balance (exact without a grid)
    assert s.min_kwh - 1e-12 <= sol.net_demand <= s.max_kwh + 1e-12
    assert np.all(sol.trades >= inst.lower) and np.all(sol.trades <= inst.upper)
    assert sol.net_demand == pytest.approx(sol.trades.sum() + sol.grid_import, abs=1e-12)
    if inst.grid is None:
        assert sol.grid_import == 0.0
        assert sol.net_demand == sol.trades.sum()
    # AND it is optimal: same objective as the solver, and the (unique) same trades
    got = inst.objective(sol.trades, sol.net_demand, sol.grid_import)
    assert_allclose(got, expected, rtol=OBJECTIVE_TOL, atol=OBJECTIVE_TOL)
    assert_allclose(sol.trades, trades, atol=TRADE_TOL)
    return sol


CASES = {
    "grid": dict(grid=True, fees=False, roles=False, linear=False),
    "no-grid": dict(grid=False, fees=False, roles=False, linear=False),
    "grid-fees": dict(grid=True, fees=True, roles=False, linear=False),
    "no-grid-fees": dict(grid=False, fees=True, roles=False, linear=False),
    "grid-roles": dict(grid=True, fees=False, roles=True, linear=False),
    "no-grid-roles-fees": dict(grid=False, fees=True, roles=True, linear=False),
    "grid-linear": dict(grid=True, fees=False, roles=False, linear=True),
    "no-grid-linear-fees": dict(grid=False, fees=True, roles=False, linear=True),
    "grid-linear-roles-fees": dict(grid=True, fees=True, roles=True, linear=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_local_step_matches_cvxpy_on_random_instances(case: str) -> None:
    # GIVEN 40 seeded random local problems of one kind, 1 to 8 neighbours each
    for seed in range(40):
        inst = random_instance(1000 * seed + len(case), k=1 + seed % 8, **CASES[case])
        # WHEN the local step solves each, THEN it matches cvxpy (checks inside)
        check_against_reference(inst)


def test_no_neighbours_with_grid_is_the_grid_only_problem() -> None:
    # GIVEN a household wanting 2 kWh (a = 0.2), no neighbours, grid 0.30/0.08
    spec = PeerSpec("p", 0.2, -0.4, 0.4, 0.0, 4.0)  # 0.1·(y − 2)²
    empty = np.zeros(0)
    inst = Instance(spec, GRID, empty, empty, empty, empty, empty, empty)
    # WHEN it solves the local step
    sol = check_against_reference(inst)
    # THEN it buys where marginal disutility meets the buy price: 0.2·(2 − y) = 0.30
    assert sol.net_demand == pytest.approx(0.5, abs=1e-12)
    assert sol.grid_import == pytest.approx(0.5, abs=1e-12)
    assert sol.balance_price == pytest.approx(0.30)


def test_no_neighbours_linear_cost_between_tariffs_uses_no_grid() -> None:
    # GIVEN a linear cost whose marginal value 0.2 lies between the tariffs, 0 ∈ limits
    spec = PeerSpec("p", 0.0, -0.2, 0.0, -1.0, 3.0)
    empty = np.zeros(0)
    inst = Instance(spec, GRID, empty, empty, empty, empty, empty, empty)
    # WHEN it solves the local step, THEN it neither buys nor sells
    sol = check_against_reference(inst)
    assert sol.net_demand == 0.0 and sol.grid_import == 0.0


@pytest.mark.parametrize("grid", [GRID, None])
def test_all_trades_clipped_by_role(grid: tuple[float, float] | None) -> None:
    # GIVEN a buyer (every t_j ≥ 0) preferring 2 kWh, C = 0.2·(y − 2)² on [0, 3], whose
    # neighbours' prices and centres all push towards exporting
    spec = PeerSpec("p", 0.4, -0.8, 0.8, 0.0, 3.0, role="buyer")
    k = 4
    inst = Instance(
        spec, grid, center=np.full(k, -10.0), price=np.full(k, 0.45), rho=np.full(k, 0.1),
        half_fee=np.full(k, 0.005), lower=np.zeros(k), upper=np.full(k, np.inf),
    )  # fmt: skip
    # WHEN it solves the local step
    sol = check_against_reference(inst)
    # THEN every trade sits exactly on its bound 0
    assert np.all(sol.trades == 0.0)
    if grid is None:  # AND alone it can only take y = 0
        assert sol.net_demand == 0.0
    else:  # AND the grid serves it where 0.4·(2 − y) = 0.30
        assert sol.net_demand == pytest.approx(1.25, abs=1e-12)
        assert sol.grid_import == pytest.approx(1.25, abs=1e-12)


def test_trades_inside_the_fee_dead_zone_are_exactly_zero() -> None:
    # GIVEN neighbours whose price matches the peer's value of energy within half the fee
    spec = PeerSpec("p", 0.2, -0.4, 0.4, 0.0, 4.0)
    k = 3
    inst = Instance(
        spec, GRID, center=np.zeros(k), price=np.full(k, 0.30), rho=np.full(k, 0.5),
        half_fee=np.full(k, 0.04), lower=np.full(k, -np.inf), upper=np.full(k, np.inf),
    )  # fmt: skip
    # WHEN it solves the local step (its own balance price is the grid buy price 0.30)
    sol = check_against_reference(inst)
    # THEN no trade moves: |p − λ_j| = 0 < w_j/2 soft-thresholds to exactly 0
    assert np.all(sol.trades == 0.0)


def test_general_finite_trade_bounds() -> None:
    # GIVEN trade bounds other than 0/±∞ (the function's contract; the market core
    # itself only passes role bounds)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        inst = random_instance(seed, grid=seed % 2 == 0, fees=seed % 3 == 0, roles=False, linear=seed % 5 == 0, k=3)
        lower = -rng.uniform(0.0, 0.6, 3)
        upper = rng.uniform(0.0, 0.6, 3)
        bounded = Instance(
            inst.spec if inst.grid else PeerSpec("p", inst.spec.cost_quadratic, inst.spec.cost_linear, 0.0, -1.0, 1.0),
            inst.grid, inst.center, inst.price, inst.rho, inst.half_fee, lower, upper,
        )  # fmt: skip
        # WHEN it solves the local step, THEN it matches cvxpy
        check_against_reference(bounded)


def test_linear_cost_at_its_step_balances_without_grid() -> None:
    # GIVEN a linear cost (marginal value 0.2) and one neighbour at exactly that price
    spec = PeerSpec("p", 0.0, -0.2, 0.0, 0.0, 5.0)
    one = np.ones(1)
    inst = Instance(spec, GRID, center=one * 1.5, price=one * 0.2, rho=one * 0.1,
                    half_fee=np.zeros(1), lower=-np.inf * one, upper=np.inf * one)  # fmt: skip
    # WHEN it solves the local step
    sol = check_against_reference(inst)
    # THEN y takes the traded amount: any y in [0, 5] is as good, none needs the grid
    assert sol.trades[0] == pytest.approx(1.5)
    assert sol.grid_import == 0.0 and sol.net_demand == sol.trades[0]


# ---------------------------------------------------------------- standalone cost


def _grid_only_reference(spec: PeerSpec, grid: tuple[float, float]) -> float:
    empty = np.zeros(0)
    value, _ = reference(Instance(spec, grid, empty, empty, empty, empty, empty, empty))
    return value


@pytest.mark.parametrize("seed", range(12))
def test_standalone_cost_with_grid_matches_cvxpy(seed: int) -> None:
    # GIVEN a random peer (every fourth one with a linear cost) and the grid
    inst = random_instance(seed, grid=True, fees=False, roles=False, linear=seed % 4 == 0, k=0)
    # WHEN it prices its grid-only alternative
    alone = standalone_cost(inst.spec, GRID)
    # THEN that is min C(y) + grid(y)
    assert alone is not None
    assert_allclose(alone, _grid_only_reference(inst.spec, GRID), rtol=OBJECTIVE_TOL, atol=OBJECTIVE_TOL)


def test_standalone_cost_without_grid() -> None:
    # GIVEN no grid: alone, a peer can only sit at y = 0
    flexible = PeerSpec("p", 0.2, -0.4, 0.4, -1.0, 3.0)  # 0.1·(y − 2)²
    must_buy = PeerSpec("q", 0.2, -0.4, 0.4, 1.0, 3.0)
    # WHEN each prices its alternative, THEN it is C(0), or None where 0 is infeasible
    assert standalone_cost(flexible, None) == pytest.approx(0.4)
    assert standalone_cost(must_buy, None) is None
