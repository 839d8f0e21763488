"""Does the ADMM market still reach the optimum under message loss and a peer restart, and at what cost?

For each seed s = 0 … S−1 it builds the seeded community ``random_community(N, s,
fee=0.01)`` (households with a grid and a fee, everyone may trade with everyone) and
runs it twice over a real Mosquitto, N peers as worker processes
(``python -m wattmesh.peer.worker``):

1. **clean**: no faults.
2. **faulty**: every peer drops ``--drop`` of the market and inbox messages it receives
   (``FaultPlan(drop_rate=…)``, injected in its transport adapter, seeded per run and
   peer) and one peer, alone in its process, SIGKILLs itself on reaching a seeded round
   k (uniform in [2, clean rounds − 3]); the benchmark restarts it at once with the same
   job (drops still on, no crash), and it resumes from its snapshot.

Reported per run: rounds, wall time (spawn to the last signed report: market and
settlement), injected drops, and the relative social-cost gap
(reported − optimum) / max(|optimum|, 1) against the central optimum
(``tests/reference.py``, cvxpy/Clarabel). A run reaches the optimum when every peer
reported, converged, and |gap| ≤ 1e-3. A run that passes its deadline (``--deadline``)
is killed and counted as hung. The summary gives the share of faulty runs that reached
the optimum (goal ≥ 99 %), the iteration overhead faulty/clean (goal ≤ 3×; the
synchronous ADMM recomputes nothing after a loss, so 1.0 is expected), the wall-time
overhead, and the hung runs (goal 0).

With ``--gone`` the killed peer is *not* restarted (gone for good): its neighbours
exclude it after ``neighbour_timeout_s`` and the others clear without it; such a run
reaches the optimum when the other N − 1 peers reported, converged, within 1e-3 of the
optimum of the community without the gone peer. The wall-time overhead then includes
the neighbour timeout.

The clean and faulty runs use the same ADMM settings; ``round_timeout_s`` is small
(0.3 s) so a lost message is re-sent quickly (docs/faults.md).

Run from the repository root (nice: the machine is shared):

    nice -n 10 python tests/benchmarks/bench_faults.py [--seeds 10] [--peers 10] [--drop 0.1]
        [--peers-per-process 3] [--deadline 180] [--admm "round_timeout_s = 0.3; neighbour_timeout_s = 30"]
        [--gone]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: communities, reference

from communities import random_community, without_peer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from reference import social_optimum

from wattmesh.broker import start_broker
from wattmesh.peer.connection import PeerConnection
from wattmesh.peer.faults import NO_FAULTS, FaultPlan
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.market import FAILED_TYPE, PeerJob
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter

TOLERANCE = 1e-3
START_TIMEOUT_S = 60.0


@dataclass
class Run:
    """One run's figures; ``None`` where it produced none."""

    rounds: int | None = None
    wall_s: float | None = None
    social_cost: float | None = None
    gap: float | None = None
    converged: bool = False
    drops: int = 0
    hung: bool = False
    failure: str = ""
    restarts: int = 0

    @property
    def optimal(self) -> bool:
        return self.converged and self.gap is not None and abs(self.gap) <= TOLERANCE and not self.failure


@dataclass
class Row:
    seed: int
    optimum: float
    crash_round: int
    optimum_faulty: float  # of the community without the victim with --gone, else = optimum
    clean: Run = field(default_factory=Run)
    faulty: Run = field(default_factory=Run)


class _Community:
    """One run: keys, jobs, worker processes, an observer for the signed reports."""

    def __init__(self, scenario: Scenario, url: str, workdir: Path) -> None:
        self.scenario, self.url, self.dir = scenario, url, workdir
        self.ids = list(scenario.public.peer_ids)
        keys = {pid: generate_key(workdir / "keys" / f"{pid}.key") for pid in self.ids}
        self.roster = write_roster(workdir / "roster.toml", keys)
        self.session = f"{scenario.public.name}-{uuid.uuid4().hex[:6]}"
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def job(self, pid: str, faults: FaultPlan) -> PeerJob:
        public = self.scenario.public
        return PeerJob(
            self.scenario.peers[pid], public, diameter(public.links), self.dir / "keys" / f"{pid}.key",
            self.roster.to_toml(), self.url, self.session, self.dir / "state", START_TIMEOUT_S, faults,
        )  # fmt: skip

    async def spawn(self, name: str, jobs: list[PeerJob]) -> asyncio.subprocess.Process:
        with open(self.dir / f"{name}.log", "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wattmesh.peer.worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        assert process.stdin is not None
        process.stdin.write(json.dumps([job.to_dict() for job in jobs]).encode())
        await process.stdin.drain()
        process.stdin.close()
        self.processes[name] = process
        return process

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()


async def one_run(
    scenario: Scenario, url: str, workdir: Path, args: argparse.Namespace, *, faulty: bool, seed: int, crash_round: int
) -> Run:
    """Run the community once; never raises, never outlives ``args.deadline``."""
    run = Run()
    community = _Community(scenario, url, workdir)
    plan = FaultPlan(drop_rate=args.drop, seed=seed) if faulty else NO_FAULTS
    victim = community.ids[seed % len(community.ids)]
    others = [pid for pid in community.ids if pid != victim]
    key = Ed25519PrivateKey.generate()
    roster = Roster({**{pid: community.roster[pid] for pid in community.ids}, "bench": key.public_key()})
    observer = PeerConnection(
        "bench", key, roster, community=scenario.public.name, session=community.session, url=url,
        read_only=True, reconnect_s=30.0,
    )  # fmt: skip
    reports: dict[str, dict[str, Any]] = {}
    started = time.monotonic()

    async def drive() -> None:
        async with observer as conn:
            await conn.subscribe_all("report")
            groups = [others[i : i + args.peers_per_process] for i in range(0, len(others), args.peers_per_process)]
            for index, group in enumerate(groups):
                await community.spawn(f"w{index}", [community.job(pid, plan) for pid in group])
            crash = FaultPlan(crash_at="market.round", crash_round=crash_round, drop_rate=args.drop, seed=seed)
            dying = await community.spawn("victim", [community.job(victim, crash if faulty else NO_FAULTS)])
            restarted = False
            expected = len(community.ids) - (1 if faulty and args.gone else 0)
            while len(reports) < expected:
                if faulty and not restarted and dying.returncode is not None and not args.gone:
                    if dying.returncode != -signal.SIGKILL:
                        run.failure = f"victim exited with {dying.returncode} before its crash point"
                        return
                    await community.spawn("victim", [community.job(victim, plan)])  # same job, no crash
                    restarted = True
                    run.restarts += 1
                try:
                    incoming = await conn.receive(0.25)
                except TimeoutError:
                    continue
                if incoming.channel != "report":
                    continue
                if incoming.envelope.type == FAILED_TYPE:
                    run.failure = f"{incoming.envelope.sender}: {incoming.envelope.body.get('reason')}"
                    return
                reports[incoming.envelope.sender] = dict(incoming.envelope.body)
            run.wall_s = time.monotonic() - started
            if faulty and args.gone:
                if dying.returncode != -signal.SIGKILL:
                    run.failure = f"victim did not die at its crash point (exit {dying.returncode})"
                elif any(victim not in r.get("excluded", ()) for pid, r in reports.items() if pid != victim):
                    run.failure = "a survivor did not exclude the gone peer"
            await asyncio.gather(*(p.wait() for p in community.processes.values()))

    try:
        await asyncio.wait_for(drive(), args.deadline)
    except TimeoutError:
        run.hung = True
        run.failure = f"hung: past its {args.deadline:g} s deadline ({len(reports)}/{len(community.ids)} reports)"
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        run.failure = f"{type(exc).__name__}: {exc}"
    finally:
        community.kill_all()
        await asyncio.gather(*(p.wait() for p in community.processes.values()))
    if len(reports) == len(community.ids) - (1 if faulty and args.gone else 0):
        run.rounds = max(int(r["iterations"]) for r in reports.values())
        run.converged = all(r["converged"] for r in reports.values())
        run.drops = sum(int(r.get("drops", {}).get("injected", 0)) for r in reports.values())
        run.social_cost = sum(float(r["cost"]) for r in reports.values())
    return run


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "–"
    return format(value, spec) if spec else str(value)


def print_row(row: Row) -> None:
    c, f = row.clean, row.faulty
    note = "; ".join(x for x in (c.failure and f"clean: {c.failure}", f.failure and f"faulty: {f.failure}") if x)
    print(
        f"| {row.seed} | {_fmt(c.rounds)} | {_fmt(c.wall_s, '.1f')} | {_fmt(c.gap, '.1e')} "
        f"| {row.crash_round} | {_fmt(f.rounds)} | {_fmt(f.wall_s, '.1f')} | {f.drops} | {_fmt(f.gap, '.1e')} "
        f"| {'yes' if f.optimal else 'NO'} | {note} |",
        flush=True,
    )


def summary(rows: list[Row]) -> None:
    faulty = [r.faulty for r in rows]
    reached = sum(1 for f in faulty if f.optimal)
    clean_reached = sum(1 for r in rows if r.clean.optimal)
    pairs = [(r.clean, r.faulty) for r in rows if r.clean.rounds and r.faulty.rounds]
    iteration = [f.rounds / c.rounds for c, f in pairs if c.rounds and f.rounds]
    wall = [f.wall_s / c.wall_s for c, f in pairs if c.wall_s and f.wall_s]
    hung = sum(1 for r in rows for run in (r.clean, r.faulty) if run.hung)
    print()
    print("| metric | value | goal |")
    print("|---|---|---|")
    print(f"| faulty runs reaching the optimum within {TOLERANCE:g} | {reached}/{len(rows)} "
          f"({100 * reached / max(len(rows), 1):.0f} %) | ≥ 99 % |")  # fmt: skip
    print(f"| clean runs reaching it | {clean_reached}/{len(rows)} | |")
    if iteration:
        print(f"| iteration overhead faulty/clean | median {statistics.median(iteration):.2f}×, "
              f"max {max(iteration):.2f}× | ≤ 3× |")  # fmt: skip
    if wall:
        print(f"| wall-time overhead faulty/clean | median {statistics.median(wall):.1f}×, "
              f"max {max(wall):.1f}× | |")  # fmt: skip
        walls = [(c.wall_s, f.wall_s) for c, f in pairs if c.wall_s and f.wall_s]
        print(f"| wall time clean / faulty [s] | median {statistics.median(w[0] for w in walls):.1f} / "
              f"{statistics.median(w[1] for w in walls):.1f} | |")  # fmt: skip
    print(f"| hung runs (clean + faulty) | {hung} of {2 * len(rows)} | 0 |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="communities (seeds 0..S-1)")
    parser.add_argument("--peers", type=int, default=10, help="households per community")
    parser.add_argument("--drop", type=float, default=0.1, help="drop rate of incoming market/inbox messages")
    parser.add_argument("--peers-per-process", type=int, default=3, help="peers per worker process (victim alone)")
    parser.add_argument("--deadline", type=float, default=180.0, help="a run past this is killed, counted hung [s]")
    parser.add_argument(
        "--admm", default="round_timeout_s = 0.3; neighbour_timeout_s = 30",
        help='[market.admm] settings, TOML, ";"-separated',
    )  # fmt: skip
    parser.add_argument("--gone", action="store_true", help="the killed peer is not restarted (gone for good)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log peer-side warnings of this process")
    args = parser.parse_args()
    admm = "\n".join(part.strip() for part in args.admm.split(";"))
    tomllib.loads(admm)  # fail early on a typo
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(asctime)s %(message)s")
    print(
        f"# bench_faults: {' '.join(sys.argv[1:]) or '(defaults)'}\n"
        f"# {platform.platform()}, Python {platform.python_version()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; aiomqtt {version('aiomqtt')}, cvxpy {version('cvxpy')}\n"
        f"# N = {args.peers}, drop rate {args.drop:g}, one SIGKILL {'(gone for good)' if args.gone else '+ restart'} "
        f"per faulty run, [market.admm] {args.admm}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-faults-"))  # kept: peer logs and state
    print(f"# peer logs and state: {workdir}\n")
    print("| seed | clean rounds | clean wall [s] | clean gap | crash round | faulty rounds | faulty wall [s] "
          "| injected drops | faulty gap | optimum | note |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    rows = []
    async with start_broker("mosquitto") as broker:
        for seed in range(args.seeds):
            text = random_community(args.peers, seed, fee=0.01, name=f"faults-{seed}", admm=admm)
            scenario = parse_scenario(text, source=f"faults-{seed}")
            keys = {pid: Ed25519PrivateKey.generate() for pid in scenario.public.peer_ids}
            clean_rounds = next(iter(run_in_memory(scenario, keys).outcomes.values())).iterations
            crash_round = random.Random(seed).randint(2, max(2, clean_rounds - 3))
            optimum = social_optimum(scenario).social_cost
            victim = scenario.public.peer_ids[seed % len(scenario.public.peer_ids)]  # as in one_run
            without = parse_scenario(without_peer(text, victim)) if args.gone else scenario
            row = Row(seed, optimum, crash_round, social_optimum(without).social_cost if args.gone else optimum)
            for faulty in (False, True):
                where = workdir / f"seed{seed}-{'faulty' if faulty else 'clean'}"
                run = await one_run(
                    scenario, broker.url, where, args, faulty=faulty, seed=seed, crash_round=crash_round
                )
                if run.social_cost is not None:
                    reference = row.optimum_faulty if faulty else row.optimum
                    run.gap = (run.social_cost - reference) / max(abs(reference), 1.0)
                if faulty:
                    row.faulty = run
                else:
                    row.clean = run
            rows.append(row)
            print_row(row)
    summary(rows)


if __name__ == "__main__":
    asyncio.run(main())
