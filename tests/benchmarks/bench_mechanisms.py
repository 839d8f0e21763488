"""Every market mechanism on the same seeded communities, side by side.

    python tests/benchmarks/bench_mechanisms.py                       # N = 10, 50, 200; 3 seeds
    python tests/benchmarks/bench_mechanisms.py --sizes 10,50 --seeds 2 --no-write

For each size N and seed, one community (tests/communities.py: households with PV and
loads around a 0.30/0.08 grid tariff, fee 0.002) runs under every mechanism on the
in-memory bus (signed frames, the same cores a real run uses; wall time is compute
time on one core, not network time). Stackelberg needs a leader: the community gets one
extra peer, a 5 kWh community battery with role "leader", for that mechanism and for its
reference. Topology: complete for N <= 50; for N = 200 a sparse graph (ring + random
links, degree 6) for the mechanisms that trade along links (admm, negotiation,
consensus) and the complete graph for those that clear one community-wide book (gdb,
auction, stackelberg), whose references are computed on their own graph.

Figures per mechanism (medians over seeds):
- gap: (Σ reported cost − central optimum) / |grid-only cost − optimum|, the share of the
  possible sharing gain *not* captured (0 = the social optimum, 1 = no better than the grid);
- better off: share of peers whose cost is below their grid-only cost (− 1e-9);
- worse off: share of peers above their grid-only cost by more than 1e-6 (iterative
  mechanisms stop at a tolerance; below that it is rounding): individual rationality;
- budget: |Σ payments| [currency], 0 when every payment is someone else's income;
- rounds, messages, wall [s].

Writes docs/mechanisms.md (table + command) and docs/mechanisms.png (unless --no-write).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: communities, reference

from communities import random_community  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from reference import social_optimum  # noqa: E402

from wattmesh.protocols.memory_bus import run_in_memory  # noqa: E402
from wattmesh.protocols.scenario import parse_scenario  # noqa: E402

MECHANISMS = ("admm", "negotiation", "consensus", "gdb", "auction", "stackelberg")
LINK_MECHANISMS = ("admm", "negotiation", "consensus")
BATTERY = '[[peers]]\nid = "battery"\ncost = { a = 0.05, b = 0.0 }\nmin = -5.0\nmax = 5.0\nrole = "leader"\n'
DOCS = Path(__file__).resolve().parents[2] / "docs"


def community(mechanism: str, n: int, seed: int) -> str:
    sparse = n > 50 and mechanism in LINK_MECHANISMS
    text = random_community(n, seed, fee=0.002, degree=6 if sparse else None, name="bench")
    text = text.replace('mechanism = "admm"', f'mechanism = "{mechanism}"')
    return text + (BATTERY if mechanism == "stackelberg" else "")


def run_one(mechanism: str, n: int, seed: int) -> dict[str, float]:
    scenario = parse_scenario(community(mechanism, n, seed), source=f"{mechanism}-{n}-{seed}")
    keys = {pid: Ed25519PrivateKey.generate() for pid in scenario.public.peer_ids}
    started = time.perf_counter()
    bus = run_in_memory(scenario, keys)
    wall = time.perf_counter() - started
    optimum = social_optimum(scenario).social_cost
    outcomes = bus.outcomes.values()
    cost = sum(o.cost for o in outcomes)
    alone = sum(o.grid_only_cost or 0.0 for o in outcomes)
    possible = alone - optimum
    return {
        "gap": (cost - optimum) / possible if possible > 1e-12 else 0.0,
        "better": sum(o.cost < (o.grid_only_cost or 0.0) - 1e-9 for o in outcomes) / len(outcomes),
        "worse": sum(o.cost > (o.grid_only_cost or 0.0) + 1e-6 for o in outcomes) / len(outcomes),
        "budget": abs(sum(o.payment for o in outcomes)),
        "rounds": max(o.iterations for o in outcomes),
        "messages": bus.messages,
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50,200", help="community sizes N")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mechanisms", default=",".join(MECHANISMS))
    parser.add_argument("--no-write", action="store_true", help="print only; keep docs/ as it is")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    mechanisms = args.mechanisms.split(",")
    rows: list[tuple[int, str, dict[str, float]]] = []
    header = f"{'N':>4} {'mechanism':<12} {'gap':>8} {'better':>7} {'worse':>6} {'budget':>8} {'rounds':>6} {'messages':>9} {'wall s':>7}"
    print(header, flush=True)
    for n in sizes:
        for mechanism in mechanisms:
            runs = [run_one(mechanism, n, seed) for seed in range(1, args.seeds + 1)]
            median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append((n, mechanism, median))
            print(
                f"{n:>4} {mechanism:<12} {median['gap']:>8.4f} {median['better']:>7.2f} {median['worse']:>6.2f} "
                f"{median['budget']:>8.1e} {median['rounds']:>6.0f} {median['messages']:>9.0f} {median['wall']:>7.2f}",
                flush=True,
            )
    if not args.no_write:
        write_docs(rows, args)
    return 0


def write_docs(rows: list[tuple[int, str, dict[str, float]]], args: argparse.Namespace) -> None:
    lines = [
        "# Market mechanisms compared",
        "",
        "Every mechanism on the same seeded communities, on the in-memory bus (signed frames, the",
        "cores a real run uses). Produced by:",
        "",
        "```sh",
        f"python tests/benchmarks/bench_mechanisms.py --sizes {args.sizes} --seeds {args.seeds}",
        "```",
        "",
        "Definitions, communities and topologies: the script's docstring. *gap* is the share of",
        "the possible sharing gain (grid-only cost − central optimum) not captured; *better* /",
        "*worse* the share of peers below / above their grid-only cost; *budget* |Σ payments|;",
        "medians over seeds. The central optimum comes from cvxpy (tests/reference.py), used here",
        "only as the yardstick.",
        "",
        "| N | mechanism | gap | better off | worse off | budget | rounds | messages | wall [s] |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, mechanism, m in rows:
        lines.append(
            f"| {n} | {mechanism} | {m['gap']:.4f} | {m['better']:.2f} | {m['worse']:.2f} | {m['budget']:.1e} "
            f"| {m['rounds']:.0f} | {m['messages']:.0f} | {m['wall']:.2f} |"
        )
    lines += ["", "![gap and messages per mechanism](mechanisms.png)", ""]
    (DOCS / "mechanisms.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'wattmesh[demo]')")
        return
    sizes = sorted({n for n, _, _ in rows})
    mechanisms = list(dict.fromkeys(m for _, m, _ in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(mechanisms)
    for i, mechanism in enumerate(mechanisms):
        gaps = [next(m["gap"] for n2, mech, m in rows if n2 == n and mech == mechanism) for n in sizes]
        msgs = [next(m["messages"] for n2, mech, m in rows if n2 == n and mech == mechanism) for n in sizes]
        xs = [k + i * width for k in range(len(sizes))]
        left.bar(xs, gaps, width, label=mechanism)
        right.bar(xs, msgs, width, label=mechanism)
    for ax, title in ((left, "share of sharing gain not captured (0 = optimum)"), (right, "messages per session")):
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))], [f"N = {n}" for n in sizes])
        ax.set_title(title)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "mechanisms.png", dpi=110)
    print(f"wrote {DOCS / 'mechanisms.md'} and {DOCS / 'mechanisms.png'}")


if __name__ == "__main__":
    sys.exit(main())
