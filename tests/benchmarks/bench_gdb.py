"""How close generalized demand bidding gets to the social optimum as the community grows.

Chen et al. (IEEE TSG 2020) prove that the equilibrium of the energy sharing game with
generalized demand bidding approaches the social optimum as the number of prosumers I
grows (the distortion of each bid is κ·x_i, κ = 1/((I − 1)|a|)). For each size I and
seed this builds a community of I households with a grid (``random_community(I, seed)``
from ``tests/communities.py``), runs the gdb market on the in-memory bus with signed
frames (``run_in_memory``), and reports

    captured share = (grid-only cost − equilibrium social cost) / (grid-only cost − optimum)

the part of the optimal sharing gain the equilibrium obtains, with the optimum from
``tests/reference.py`` (cvxpy/Clarabel). Also: rounds to the stop, the clearing price,
the relative gap to the optimum, messages and wall time.

Run from the repository root:

    python tests/benchmarks/bench_gdb.py [--sizes 5,10,20,50] [--seeds 5]
        [--sensitivity -10] [--dynamics proposal|best_response]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: communities, reference

from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from reference import social_optimum

from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.scenario import Scenario, parse_scenario


def community(n: int, seed: int, sensitivity: float, dynamics: str) -> Scenario:
    text = random_community(n, seed, name=f"gdb-{n}-{seed}").replace('mechanism = "admm"', 'mechanism = "gdb"')
    scenario = parse_scenario(text, source=f"gdb-{n}-{seed}")
    settings = {"price_sensitivity": sensitivity, "dynamics": dynamics}
    return Scenario(replace(scenario.public, settings=settings), scenario.peers)


def measure(n: int, seed: int, sensitivity: float, dynamics: str) -> dict[str, float]:
    scenario = community(n, seed, sensitivity, dynamics)
    keys = {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }
    started = time.perf_counter()
    bus = run_in_memory(scenario, keys)
    wall = time.perf_counter() - started
    outcomes = list(bus.outcomes.values())
    cost = sum(o.cost for o in outcomes)
    grid_only = sum(o.grid_only_cost for o in outcomes if o.grid_only_cost is not None)
    optimum = social_optimum(scenario).social_cost
    price = next(iter(outcomes[0].trades.values()))[1]
    return {
        "rounds": outcomes[0].iterations,
        "price": price,
        "share": (grid_only - cost) / (grid_only - optimum),
        "gap": (cost - optimum) / max(abs(optimum), 1.0),
        "messages": bus.messages,
        "wall": wall,
        "converged": float(all(o.converged for o in outcomes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,10,20,50")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sensitivity", type=float, default=-10.0, help="a < 0 [kWh per currency/kWh]")
    parser.add_argument("--dynamics", default="proposal", choices=("proposal", "best_response"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"gdb, a = {args.sensitivity:g}, dynamics = {args.dynamics}, seeds 0–{args.seeds - 1}")
    print()
    print("| I | captured share, median [min] | gap to optimum, median [max] | rounds, median [max] "
          "| messages (median) | bus wall [s] (median) |")  # fmt: skip
    print("|---:|---|---|---|---:|---:|")
    for n in sizes:
        rows = [measure(n, seed, args.sensitivity, args.dynamics) for seed in range(args.seeds)]
        if not all(r["converged"] for r in rows):
            print(f"| {n} | some runs did not converge |")
            continue
        shares = [r["share"] for r in rows]
        gaps = [r["gap"] for r in rows]
        rounds = [r["rounds"] for r in rows]
        print(
            f"| {n} | {statistics.median(shares):.4f} [{min(shares):.4f}] "
            f"| {statistics.median(gaps):.1e} [{max(gaps):.1e}] "
            f"| {statistics.median(rounds):g} [{max(rounds):g}] "
            f"| {statistics.median(r['messages'] for r in rows):g} "
            f"| {statistics.median(r['wall'] for r in rows):.2f} |"
        )


if __name__ == "__main__":
    main()
