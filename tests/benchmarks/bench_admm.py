"""How fast and how well the ADMM market clears: iterations, wall time, traffic, optimality.

For each size N and topology (``full``: everyone may trade with everyone; ``sparse``:
ring ±2 plus one random link per peer, ``degree=5`` in ``tests/communities.py``) it
builds one seeded community of households with a grid (``random_community(N, seed)``)
and measures:

1. **MQTT**: ``run_scenario`` — N peers as OS processes (K per process with
   ``--peers-per-process``) over a real broker: iterations, wall time (process start
   to the last report), messages and bytes the peers published (round messages,
   start barrier, per-round telemetry and reports, as counted by the peers). The
   launcher does not follow the telemetry unless ``--telemetry``: verifying N status
   messages a round in one process is the launcher's work, not the market's, and at
   N = 200 it fell so far behind that the reports queued after the telemetry were
   never read.
2. **In-memory bus**: ``run_in_memory`` — the same cores passing signed frames in one
   process, at the default ``eps_rel = 1e-4`` (its iterations must equal the MQTT run's)
   and at ``eps_rel = 1e-3``.
3. **Optimality**: the relative social-cost gap (reported − optimum) / max(|optimum|, 1)
   against ``social_optimum`` (cvxpy/Clarabel) at both tolerances.

``--sweep`` instead prints the distribution of iterations over several seeds for
the community kinds (grid / no grid × fee / no fee × full / sparse), driving the cores
directly with unsigned envelopes: the arithmetic, hence the iteration count, is the
same as on the bus and over MQTT (the tests check bus = processes bit for bit); only
the signatures are skipped, which dominate the bus's run time.

Run from the repository root:

    python tests/benchmarks/bench_admm.py [--sizes 10,50,100,200] [--broker mosquitto]
        [--topologies full,sparse] [--peers-per-process K] [--seed S] [--no-mqtt]
        [--admm "round_timeout_s = 10"] [--telemetry]
    python tests/benchmarks/bench_admm.py --sweep [--sizes 10,50,100,200] [--seeds 5]
        [--kinds grid,grid-fee,nogrid,nogrid-fee] [--admm "adapt_rho = false"]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import platform
import sys
import tempfile
import time
import tomllib
from collections import deque
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: communities, reference

import numpy as np
from communities import random_community
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from reference import social_optimum

from wattmesh.peer.launcher import RunOptions, run_scenario
from wattmesh.protocols.admm import AdmmPeer, Outgoing, PeerOutcome
from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope

SPARSE_DEGREE = 5
PROCESS_PER_PEER_MAX_LINKS = 2500


def community(n: int, seed: int, topology: str, **kwargs: Any) -> Scenario:
    degree = SPARSE_DEGREE if topology == "sparse" else None
    text = random_community(n, seed, degree=degree, name=f"bench-{topology}-{n}", **kwargs)
    return parse_scenario(text, source=f"bench-{topology}-{n}")


def with_settings(scenario: Scenario, **settings: Any) -> Scenario:
    """The same community with ``[market.admm]`` settings replaced."""
    from dataclasses import replace

    return Scenario(replace(scenario.public, settings={**scenario.public.settings, **settings}), scenario.peers)


def keys_for(scenario: Scenario) -> dict[str, Ed25519PrivateKey]:
    return {
        pid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(pid.encode()).digest())
        for pid in scenario.public.peer_ids
    }


def gap(cost: float, optimum: float) -> float:
    return (cost - optimum) / max(abs(optimum), 1.0)


def drive_cores(scenario: Scenario) -> dict[str, PeerOutcome]:
    """The cores alone, FIFO, unsigned envelopes: same arithmetic as the signed bus."""
    public = scenario.public
    horizon = diameter(public.links)
    cores = {pid: AdmmPeer(scenario.peers[pid], public, horizon) for pid in public.peer_ids}
    queue: deque[tuple[str, Envelope]] = deque()
    seq = dict.fromkeys(public.peer_ids, 0)

    def publish(sender: str, items: list[Outgoing]) -> None:
        for item in items:
            if item.channel == "market":
                seq[sender] += 1
                queue.append((sender, Envelope(item.type, sender, public.name, "sweep", seq[sender], 0, item.body)))

    for pid, core in cores.items():
        publish(pid, core.start(0.0))
    while queue:
        sender, envelope = queue.popleft()
        for receiver in public.links[sender]:
            publish(receiver, cores[receiver].receive(envelope, 0.0))
    return {pid: core.outcome for pid, core in cores.items() if core.outcome is not None}


@dataclass
class Row:
    n: int
    topology: str
    links: int  # directed links, Σ_i |N(i)|
    diameter: int
    processes: int = 0
    mqtt_iterations: int | None = None
    mqtt_wall_s: float | None = None
    mqtt_messages: int | None = None
    mqtt_mbytes: float | None = None
    mqtt_gap: float | None = None
    bus_iterations: int | None = None
    bus_messages: int | None = None  # round messages only (the bus carries nothing else)
    bus_mbytes: float | None = None
    bus_wall_s: float | None = None
    bus_gap: float | None = None
    bus_iterations_1e3: int | None = None
    bus_gap_1e3: float | None = None
    note: str = ""


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "–"
    return format(value, spec) if spec else str(value)


def print_rows(rows: list[Row], broker: str) -> None:
    print()
    print(
        f"| N | topology | links | D | processes | iterations ({broker}) | wall [s] | messages | MB "
        "| iterations (bus) | round messages | round MB | bus wall [s] | gap at 1e-4 "
        "| iterations to 1e-3 | gap at 1e-3 |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.n} | {r.topology} | {r.links} | {r.diameter} | {_fmt(r.processes or None)} "
            f"| {_fmt(r.mqtt_iterations)} | {_fmt(r.mqtt_wall_s, '.1f')} | {_fmt(r.mqtt_messages)} "
            f"| {_fmt(r.mqtt_mbytes, '.2f')} | {_fmt(r.bus_iterations)} | {_fmt(r.bus_messages)} "
            f"| {_fmt(r.bus_mbytes, '.2f')} | {_fmt(r.bus_wall_s, '.1f')} "
            f"| {_fmt(r.mqtt_gap if r.mqtt_gap is not None else r.bus_gap, '.1e')} "
            f"| {_fmt(r.bus_iterations_1e3)} | {_fmt(r.bus_gap_1e3, '.1e')} |" + (f" {r.note}" if r.note else "")
        )
    print()


async def measure(n: int, topology: str, args: argparse.Namespace, workdir: Path) -> Row:
    scenario = with_settings(community(n, args.seed, topology), **args.admm)
    public = scenario.public
    row = Row(n, topology, sum(len(v) for v in public.links.values()), diameter(public.links))
    optimum = social_optimum(scenario).social_cost

    if not args.no_mqtt:
        # One process per peer until the links outgrow two cores: at N = 100 full (9900
        # links) 100 processes never got past the start barrier within the start timeout.
        per_process = args.peers_per_process or (1 if row.links <= PROCESS_PER_PEER_MAX_LINKS else max(1, n // 10))
        out = workdir / f"{topology}-{n}.json"

        def progress(line: str) -> None:
            logging.info("N=%d %s: %s", n, topology, line)

        started = time.monotonic()
        load_before = os.getloadavg()[0]
        try:
            result = await run_scenario(
                scenario,
                RunOptions(
                    broker=args.broker,
                    out=out,
                    peers_per_process=per_process,
                    timeout_s=args.timeout,
                    progress=progress,
                    telemetry=args.telemetry,
                ),
            )
        except Exception as exc:  # a benchmark reports failures, it does not stop on them
            row.note = f"MQTT run failed after {time.monotonic() - started:.0f} s: {type(exc).__name__}: {exc}"
        else:
            row.processes = -(-n // per_process)
            row.mqtt_iterations = int(result["iterations"])
            row.mqtt_wall_s = float(result["wall_seconds"])
            row.mqtt_messages = int(result["messages"]["published"])
            row.mqtt_mbytes = result["messages"]["bytes"] / 1e6
            row.mqtt_gap = gap(float(result["social_cost"]), optimum)
            if not result["converged"]:
                row.note = "MQTT run did not converge"
        row.note += f" (load average {load_before:.1f} → {os.getloadavg()[0]:.1f} during the MQTT run)"

    keys = keys_for(scenario)
    started = time.perf_counter()
    bus = run_in_memory(scenario, keys)
    row.bus_wall_s = time.perf_counter() - started
    row.bus_iterations = max(o.iterations for o in bus.outcomes.values())
    row.bus_messages, row.bus_mbytes = bus.messages, bus.bytes / 1e6
    row.bus_gap = gap(sum(o.cost for o in bus.outcomes.values()), optimum)
    if row.mqtt_iterations is not None and row.mqtt_iterations != row.bus_iterations:
        row.note += f" MQTT and bus disagree ({row.mqtt_iterations} vs {row.bus_iterations})"
    loose = run_in_memory(with_settings(scenario, eps_rel=1e-3), keys)
    row.bus_iterations_1e3 = max(o.iterations for o in loose.outcomes.values())
    row.bus_gap_1e3 = gap(sum(o.cost for o in loose.outcomes.values()), optimum)
    return row


KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "grid": ("grid", {}),
    "grid-fee": ("grid + fee 0.01", {"fee": 0.01}),
    "nogrid": ("no grid", {"grid": False}),
    "nogrid-fee": ("no grid + fee 0.01", {"grid": False, "fee": 0.01}),
}


def sweep(args: argparse.Namespace) -> None:
    print(f"iterations over seeds 0..{args.seeds - 1}: median [min–max]; gap = worst relative social-cost gap")
    print()
    print("| community | topology | N | to eps_rel 1e-3 | to eps_rel 1e-4 (default) | worst gap at 1e-4 |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in args.kinds:
        label, kwargs = KINDS[kind]
        for topology in args.topologies:
            for n in args.sizes:
                if topology == "full" and n > args.sweep_full_max:
                    continue
                counts: dict[float, list[int]] = {1e-3: [], 1e-4: []}
                worst = 0.0
                for seed in range(args.seeds):
                    scenario = with_settings(community(n, seed, topology, **kwargs), **args.admm)
                    for eps in counts:
                        outcomes = drive_cores(with_settings(scenario, eps_rel=eps))
                        counts[eps].append(max(o.iterations for o in outcomes.values()))
                        if eps == 1e-4:
                            optimum = social_optimum(scenario).social_cost
                            worst = max(worst, abs(gap(sum(o.cost for o in outcomes.values()), optimum)))
                cells = [f"{int(np.median(c))} [{min(c)}–{max(c)}]" for c in counts.values()]
                print(f"| {label} | {topology} | {n} | {cells[0]} | {cells[1]} | {worst:.1e} |", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,100,200", help="comma-separated community sizes")
    parser.add_argument("--topologies", default="full,sparse", help="full and/or sparse")
    parser.add_argument("--broker", default="mosquitto", help="mosquitto, embedded or mqtt://host:port")
    parser.add_argument(
        "--peers-per-process", type=int, default=0, help="K peers per OS process (0: 1 up to 2500 links, else N/10)"
    )
    parser.add_argument("--seed", type=int, default=1, help="community seed")
    parser.add_argument("--timeout", type=float, default=1800.0, help="deadline of one MQTT run [s]")
    parser.add_argument("--no-mqtt", action="store_true", help="in-memory figures only")
    parser.add_argument(
        "--telemetry", action="store_true",
        help="the launcher follows per-round telemetry (off: at N = 200 it fell behind and missed the reports)",
    )  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="iteration distribution over seeds, cores only")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per cell in --sweep")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"communities in --sweep: {', '.join(KINDS)}")
    parser.add_argument("--sweep-full-max", type=int, default=50, help="largest full-topology N in --sweep")
    parser.add_argument(
        "--admm", default="", help='[market.admm] settings for every run, TOML, ";"-separated: "round_timeout_s = 10"'
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log run progress")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.topologies = [t.strip() for t in args.topologies.split(",")]
    args.admm = tomllib.loads(args.admm.replace(";", "\n"))
    args.kinds = [k.strip() for k in args.kinds.split(",")]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    print(
        f"# bench_admm: {' '.join(sys.argv[1:]) or '(defaults)'}\n"
        f"# {platform.platform()}, Python {platform.python_version()}, {_cpus()} CPUs; "
        f"numpy {version('numpy')}, cryptography {version('cryptography')}, cvxpy {version('cvxpy')}"
    )
    if args.sweep:
        sweep(args)
        return
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-admm-"))  # kept: result files and peer logs
    print(f"# MQTT runs' results and logs: {workdir}")
    for n in args.sizes:
        for topology in args.topologies:
            row = await measure(n, topology, args, workdir)
            rows.append(row)
            print_rows([row], args.broker)  # partial results as they come
    print("## all")
    print_rows(rows, args.broker)


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    asyncio.run(main())
