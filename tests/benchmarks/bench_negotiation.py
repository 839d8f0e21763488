"""How well the negotiation market shares energy: welfare against the central optimum, rounds, messages.

For each community size N and topology (``full``: everyone may trade with everyone;
``sparse``: ring ±2 plus one random link per peer, ``degree=5`` in
``tests/communities.py``) it builds seeded communities of households with a grid
(``random_community(N, seed)``, optionally with a fee and buyer/seller roles), runs the
negotiation to its end and prints:

- **costs** [currency]: the central optimum (``social_optimum``, cvxpy/Clarabel,
  ``tests/reference.py``), the market's social cost Σ_i reported cost_i, and the
  grid-only cost Σ_i grid_only_cost_i (every peer alone with the grid);
- **welfare gap** [currency]: market cost − optimum (≥ 0);
- **share of gain**: the share of the optimal sharing gain the market captured,
  (grid-only cost − market cost) / (grid-only cost − optimum);
- **rounds**: the last peer's final round (peers stop on different rounds), and the
  median peer's;
- **messages**: round messages published (one per peer per round it took part in) and
  the bytes of their signed frames;
- **pairs / deals**: trading pairs, and concluded deals (grants; a pair may deal in
  several rounds; not counted with ``--signed``);
- **min IR margin** [currency]: min over peers of grid-only cost − market cost (≥ 0).

By default the cores are driven directly, FIFO, on a virtual clock: each frame is
encoded and signed exactly as the in-memory bus does (so its bytes are exact) but the
receivers get the envelope without verifying it — the arithmetic and therefore every
figure except wall time is that of the signed bus (``--signed`` runs ``run_in_memory``
itself and prints the same figures), and N = 200 full (39 800 links) would otherwise
spend minutes verifying signatures.

Run from the repository root:

    python tests/benchmarks/bench_negotiation.py [--sizes 10,50,200] [--topologies full,sparse]
        [--seeds 3] [--kinds grid,grid-fee,grid-roles] [--negotiation "steps = 20; patience = 3"]
        [--signed]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
import tomllib
from collections import deque
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: communities, reference

from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from reference import social_optimum

from wattmesh.protocols.mechanism import Outgoing, PeerOutcome
from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.negotiation import NegotiationPeer
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.wire import Envelope, encode

SPARSE_DEGREE = 5
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "grid": ("grid", {}),
    "grid-fee": ("grid + fee 0.01", {"fee": 0.01}),
    "grid-roles": ("grid + roles", {"roles": True}),
}


def community(n: int, seed: int, topology: str, settings: dict[str, Any], **kwargs: Any) -> Scenario:
    degree = SPARSE_DEGREE if topology == "sparse" else None
    text = random_community(n, seed, degree=degree, name=f"bench-{topology}-{n}", **kwargs)
    scenario = parse_scenario(text.replace('mechanism = "admm"', 'mechanism = "negotiation"'), source="bench")
    return Scenario(replace(scenario.public, settings=settings), scenario.peers)


@dataclass
class Run:
    outcomes: dict[str, PeerOutcome]
    messages: int
    bytes: int
    deals: int | None
    wall_s: float


def keys_for(scenario: Scenario) -> dict[str, Ed25519PrivateKey]:
    return {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }


def drive_cores(scenario: Scenario) -> Run:
    """The cores on a virtual clock, FIFO, frames signed but not verified: the signed bus's figures."""
    public = scenario.public
    keys = keys_for(scenario)
    cores = {pid: NegotiationPeer(scenario.peers[pid], public, 0) for pid in public.peer_ids}
    queue: deque[tuple[str, Envelope]] = deque()
    seq = dict.fromkeys(public.peer_ids, 0)
    traffic = [0, 0]
    now = 0.0

    def publish(sender: str, items: list[Outgoing]) -> None:
        for item in items:
            if item.channel == "market":
                seq[sender] += 1
                envelope = Envelope(item.type, sender, public.name, "memory", seq[sender], int(now * 1000), item.body)
                traffic[0] += 1
                traffic[1] += len(encode(envelope, keys[sender]))
                queue.append((sender, envelope))

    started = time.perf_counter()
    for pid, core in cores.items():
        publish(pid, core.start(now))
    while True:
        while queue:
            sender, envelope = queue.popleft()
            for receiver in public.links[sender]:
                publish(receiver, cores[receiver].receive(envelope, now))
        deadlines = [(d, pid) for pid, c in cores.items() if not c.done and (d := c.next_deadline()) is not None]
        if not deadlines:
            break
        now = max(now, min(deadlines)[0])
        for d, pid in deadlines:
            if d <= now:
                publish(pid, cores[pid].on_timer(now))
    wall = time.perf_counter() - started
    missing = [pid for pid, c in cores.items() if c.outcome is None]
    if missing:
        raise RuntimeError(f"cores never finished: {missing[:5]}")
    deals = sum(1 for c in cores.values() for d in c.deals if d.kwh < 0)
    return Run({pid: c.outcome for pid, c in cores.items() if c.outcome}, traffic[0], traffic[1], deals, wall)


def signed_bus(scenario: Scenario) -> Run:
    started = time.perf_counter()
    bus = run_in_memory(scenario, keys_for(scenario))
    return Run(dict(bus.outcomes), bus.messages, bus.bytes, None, time.perf_counter() - started)


@dataclass
class Row:
    kind: str
    topology: str
    n: int
    seed: int
    optimum: float
    cost: float
    alone: float
    share: float
    rounds_max: int
    rounds_median: float
    messages: int
    mbytes: float
    pairs: int
    deals: int | None
    ir_margin: float
    wall_s: float


def measure(kind: str, topology: str, n: int, seed: int, args: argparse.Namespace) -> Row:
    _, kwargs = KINDS[kind]
    scenario = community(n, seed, topology, args.negotiation, **kwargs)
    run = signed_bus(scenario) if args.signed else drive_cores(scenario)
    optimum = social_optimum(scenario).social_cost
    cost = sum(o.cost for o in run.outcomes.values())
    alone = sum(o.grid_only_cost or 0.0 for o in run.outcomes.values())
    rounds = [o.iterations for o in run.outcomes.values()]
    return Row(
        kind, topology, n, seed, optimum, cost, alone,
        share=(alone - cost) / (alone - optimum) if alone - optimum > 1e-12 else float("nan"),
        rounds_max=max(rounds), rounds_median=statistics.median(rounds),
        messages=run.messages, mbytes=run.bytes / 1e6,
        pairs=sum(1 for o in run.outcomes.values() for kwh, _ in o.trades.values() if kwh < 0),
        deals=run.deals,
        ir_margin=min((o.grid_only_cost or 0.0) - o.cost for o in run.outcomes.values()),
        wall_s=run.wall_s,
    )  # fmt: skip


HEADER = (
    "| community | topology | N | seed | optimum | market | grid only | welfare gap | share of gain "
    "| rounds (last / median peer) | messages | MB | pairs / deals | min IR margin | wall [s] |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def print_row(r: Row) -> None:
    deals = "–" if r.deals is None else str(r.deals)
    print(
        f"| {KINDS[r.kind][0]} | {r.topology} | {r.n} | {r.seed} | {r.optimum:.3f} | {r.cost:.3f} | {r.alone:.3f} "
        f"| {r.cost - r.optimum:.3f} | {100 * r.share:.1f} % | {r.rounds_max} / {r.rounds_median:g} "
        f"| {r.messages} | {r.mbytes:.2f} | {r.pairs} / {deals} | {r.ir_margin:.1e} | {r.wall_s:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,200", help="comma-separated community sizes")
    parser.add_argument("--topologies", default="full,sparse", help="full and/or sparse")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 1..S per cell")
    parser.add_argument("--kinds", default="grid", help=f"communities: {', '.join(KINDS)}")
    parser.add_argument(
        "--negotiation", default="", help='[market.negotiation] settings, TOML, ";"-separated: "steps = 10"'
    )
    parser.add_argument("--signed", action="store_true", help="signed in-memory bus instead of direct driving")
    args = parser.parse_args()
    args.negotiation = tomllib.loads(args.negotiation.replace(";", "\n"))
    print(
        f"# bench_negotiation: {' '.join(sys.argv[1:]) or '(defaults)'}\n"
        f"# {platform.platform()}, Python {platform.python_version()}, {len(os.sched_getaffinity(0))} CPUs; "
        f"numpy {version('numpy')}, cvxpy {version('cvxpy')}\n"
    )
    print(HEADER)
    rows = []
    for kind in [k.strip() for k in args.kinds.split(",")]:
        for topology in [t.strip() for t in args.topologies.split(",")]:
            for n in [int(s) for s in args.sizes.split(",")]:
                for seed in range(1, args.seeds + 1):
                    row = measure(kind, topology, n, seed, args)
                    rows.append(row)
                    print_row(row)
    if len(rows) > 1:
        print(
            f"\nmean share {100 * statistics.fmean(r.share for r in rows):.1f} %, "
            f"worst {100 * min(r.share for r in rows):.1f} %; max rounds {max(r.rounds_max for r in rows)}"
        )


if __name__ == "__main__":
    main()
