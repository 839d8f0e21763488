"""Footprint of one peer process: memory, start-up time, CPU per market round, imports.

Issue goals for a Raspberry Pi 4-class gateway: at most 40 MiB resident, at most 2 s
from start to connected. Measured here for one ``python -m wattmesh.peer.worker``
process (one peer, jobs JSON on stdin as ``wattmesh run`` gives it), natively and,
with ``--rootfs``, as an aarch64 process under qemu user-mode emulation in the
Debian bookworm arm64 userland of ``deploy/arm64-qemu.sh``. qemu-user translates
every instruction (typically 5–20× slower CPU) and its own code and translation
cache count in the process's RSS: the emulated figures are upper bounds, not
Raspberry Pi figures.

1. **Imports** (what dominates start-up): median wall time over ``--repeat`` fresh
   interpreters of ``python -c pass``, ``python -c "import wattmesh.peer.market"``
   and ``python -c "import wattmesh.peer.worker, wattmesh.protocols.admm"`` (what a
   worker loads before its first message); and, in one interpreter, the wall time
   and resident memory (VmRSS, split into anonymous and file-backed pages, and
   threads) after each stage of imports, in the order a worker needs them. Says
   whether ``amqtt`` (the embedded broker) gets imported by a peer.
2. **A market session** (``--repeat`` times): a community of ``--peers`` homes
   (everyone may trade with everyone, so the measured peer has ``--peers`` − 1
   neighbours) over Mosquitto on a free loopback port; every other peer is spawned
   first, natively, and once they are all online the measured peer ``h1`` is spawned
   alone. From its /proc entries, sampled every 10 ms while it lives:

   - **peak RSS**: ``VmHWM`` of /proc/PID/status [MiB] (the kernel's high-water mark,
     so sampling misses at most the last 10 ms of the process);
   - **start-up**: from the spawn to its signed presence birth seen by an observer
     connection on the broker (the birth is published once the peer is connected and
     subscribed) [s]; and the CPU it used until then;
   - **CPU per market round**: user + system CPU (utime + stime of /proc/PID/stat,
     10 ms ticks) from its birth to its signed report, divided by the iterations
     (includes the start barrier's few ready messages and the vote rounds).

Run from the repository root (as root for ``--rootfs``: chroot):

    nice -n 10 python tests/benchmarks/bench_footprint.py [--repeat 3] [--peers 5]
        [--rootfs /srv/wattmesh-arm64] [--runner auto|binfmt|explicit]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arm_proof import VENV_PYTHON, community, emulated_argv, host_env, resolve_runner, run_session

MEASURED = "h1"
GOAL_RSS_MIB = 40.0
GOAL_STARTUP_S = 2.0

IMPORTS = {
    "interpreter": "pass",
    "import wattmesh.peer.market": "import wattmesh.peer.market",
    "import worker + ADMM core": "import wattmesh.peer.worker, wattmesh.protocols.admm",
}

STAGES = """
import sys, time
t0 = time.perf_counter()
def status():
    d = dict(l.split(":", 1) for l in open("/proc/self/status"))
    kib = lambda k: int(d[k].split()[0])
    return [kib("VmRSS"), kib("RssAnon"), kib("RssFile"), int(d["Threads"])]
rows = [["interpreter (python -c)", 0.0, *status()]]
for label, statement in [
    ("asyncio, logging, json", "import asyncio, logging, json"),
    ("cryptography (Ed25519)", "import cryptography.hazmat.primitives.asymmetric.ed25519"),
    ("msgpack", "import msgpack"),
    ("aiomqtt + paho-mqtt (+ ssl)", "import aiomqtt"),
    ("numpy", "import numpy"),
    ("wattmesh worker + ADMM core", "import wattmesh.peer.worker, wattmesh.protocols.admm"),
]:
    t = time.perf_counter()
    exec(statement)
    rows.append([label, time.perf_counter() - t, *status()])
import json
print(json.dumps({"rows": rows, "amqtt": any(m.split(".")[0] == "amqtt" for m in sys.modules),
                  "modules": len(sys.modules)}))
"""


def python_argv(where: str, rootfs: Path | None, runner: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    if where == "native":
        return [sys.executable, *args], dict(os.environ)
    assert rootfs is not None
    return emulated_argv(rootfs, runner, [VENV_PYTHON, *args]), host_env()


def import_figures(where: str, rootfs: Path | None, runner: str, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, code in IMPORTS.items():
        argv, env = python_argv(where, rootfs, runner, ["-c", code])
        walls = []
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            walls.append(time.perf_counter() - started)
        out[label] = statistics.median(walls)
    runs = []
    for _ in range(repeat):
        argv, env = python_argv(where, rootfs, runner, ["-c", STAGES])
        runs.append(json.loads(subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout))
    rows = []
    for i, row in enumerate(runs[0]["rows"]):
        rows.append([row[0], statistics.median(r["rows"][i][1] for r in runs), *row[2:]])
    out["stages"] = rows
    out["amqtt"] = runs[0]["amqtt"]
    out["modules"] = runs[0]["modules"]
    return out


def print_imports(where: str, figures: dict[str, Any]) -> None:
    print(f"\n### Imports, {where}\n")
    print("| command | median wall [s] |")
    print("|---|---:|")
    for label in IMPORTS:
        print(f"| `python -c \"{IMPORTS[label]}\"` | {figures[label]:.3f} |")
    print("\n| stage (cumulative, one interpreter) | wall [s] | VmRSS [MiB] | of which anon | file-backed | threads |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, wall, rss, anon, file_, threads in figures["stages"]:
        print(f"| {label} | {wall:.3f} | {rss / 1024:.1f} | {anon / 1024:.1f} | {file_ / 1024:.1f} | {threads} |")
    print(f"\n{figures['modules']} modules loaded; amqtt imported by a peer: {'YES' if figures['amqtt'] else 'no'}")


async def session_figures(where: str, rootfs: Path | None, runner: str, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for i in range(args.repeat):
        scenario = community(args.peers, name=f"footprint-{where}-{i}")
        out = await run_session(
            scenario, rootfs or Path("/"), {MEASURED} if where == "emulated" else set(), runner=runner,
            timeout_s=args.timeout, last=MEASURED,
        )  # fmt: skip
        peer = out.peers[MEASURED]
        report = out.reports.get(MEASURED)
        if report is None or peer.online is None or peer.cpu_online is None or peer.cpu_report is None:
            print(f"run {i + 1}: {MEASURED} did not complete (failures {out.failures}); files in {out.run_dir}")
            continue
        iterations = int(report["iterations"])
        rows.append({
            "rss_mib": peer.hwm_kib / 1024,
            "startup_s": peer.online - peer.spawned,
            "startup_cpu_s": peer.cpu_online,
            "cpu_per_round_ms": 1000 * (peer.cpu_report - peer.cpu_online) / iterations,
            "total_cpu_s": peer.cpu_last,
            "iterations": iterations,
            "threads": peer.threads,
            "converged": bool(out.result["converged"]),
            "exe": peer.exe,
        })  # fmt: skip
        print(f"  run {i + 1} ({where}): " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))  # fmt: skip
    return {"runs": rows}


def _median(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows]
    if not values:
        return "–"
    mid = statistics.median(values)
    fmt = ".0f" if key in ("iterations", "threads") else (".1f" if key in ("rss_mib", "cpu_per_round_ms") else ".2f")
    if len(values) == 1 or min(values) == max(values):
        return format(mid, fmt)
    return f"{mid:{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def print_sessions(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n### One peer process in a {args.peers}-peer session ({args.peers - 1} neighbours), median [min–max]"
          f" over {args.repeat} runs\n")  # fmt: skip
    columns = list(results)
    names = {"native": f"native {platform.machine()}", "emulated": "aarch64 under qemu-user (upper bound)"}
    print("| figure | " + " | ".join(names[c] for c in columns) + " | goal (Pi 4) |")
    print("|---|" + "---:|" * len(columns) + "---:|")
    for key, label, goal in [
        ("rss_mib", "peak RSS (VmHWM) [MiB]", f"≤ {GOAL_RSS_MIB:g}"),
        ("startup_s", "start-up, spawn → birth on the broker [s]", f"≤ {GOAL_STARTUP_S:g}"),
        ("startup_cpu_s", "CPU during start-up [s]", ""),
        ("cpu_per_round_ms", "CPU per market round [ms]", ""),
        ("total_cpu_s", "CPU, whole process [s]", ""),
        ("iterations", "market rounds (iterations)", ""),
        ("threads", "threads (most seen)", ""),
    ]:
        print(f"| {label} | " + " | ".join(_median(results[c]["runs"], key) for c in columns) + f" | {goal} |")
    for c in columns:
        runs = results[c]["runs"]
        if runs:
            print(f"\n{names[c]}: converged {sum(r['converged'] for r in runs)}/{len(runs)}, "
                  f"/proc/PID/exe {runs[0]['exe']}")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rootfs", type=Path, default=None, help="also measure under arm64 emulation in this rootfs")
    parser.add_argument("--runner", choices=("auto", "binfmt", "explicit"), default="auto")
    parser.add_argument("--peers", type=int, default=5, help="community size (the measured peer has N-1 neighbours)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of one session [s]")
    parser.add_argument("--no-session", action="store_true", help="imports only")
    args = parser.parse_args()
    rootfs = args.rootfs.resolve() if args.rootfs else None
    runner = resolve_runner(rootfs, args.runner) if rootfs else "native"
    where = ["native"] + (["emulated"] if rootfs else [])
    print(f"# bench_footprint: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# host: {platform.platform()}, {len(os.sched_getaffinity(0))} CPUs, Python {platform.python_version()}; "
          f"numpy {version('numpy')}, cryptography {version('cryptography')}, aiomqtt {version('aiomqtt')}, "
          f"paho-mqtt {version('paho-mqtt')}, msgpack {version('msgpack')}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    if rootfs:
        versions = subprocess.run(
            emulated_argv(rootfs, runner, [VENV_PYTHON, "-c",
                "import platform, importlib.metadata as m; print(platform.machine(), 'Python', "
                "platform.python_version() + ';', ', '.join(p + ' ' + m.version(p) for p in "
                "('numpy', 'cryptography', 'aiomqtt', 'paho-mqtt', 'msgpack')))"]),
            env=host_env(), check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        print(f"# emulated: {rootfs} via {runner}: {versions}")
    for w in where:
        print_imports(w, import_figures(w, rootfs, runner, args.repeat))
    if args.no_session:
        return
    results = {}
    for w in where:
        results[w] = await session_figures(w, rootfs, runner, args)
    print_sessions(results, args)


if __name__ == "__main__":
    asyncio.run(main())
