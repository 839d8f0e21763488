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
   and resident memory (VmRSS of /proc/PID/status, read from outside while the child
   waits, split into anonymous and file-backed pages, and threads) after each stage
   of imports, in the order a worker needs them. Says
   whether ``amqtt`` (the embedded broker) gets imported by a peer.
2. **A market session** (``--repeat`` times): a community of ``--peers`` homes
   (everyone may trade with everyone, so the measured peer has ``--peers`` − 1
   neighbours) over Mosquitto on a free loopback port; every other peer is spawned
   first, natively, and once they are all online the measured peer ``h1`` is spawned
   alone. From its /proc entries, sampled every 10 ms while it lives:

   - **peak RSS**: ``VmHWM`` of /proc/PID/status [MiB] (the kernel's high-water mark,
     so sampling misses at most the last 10 ms of the process); under emulation this
     is qemu's process, so also the peak of an estimate of the aarch64 guest's own
     share (``arm_proof.guest_rss_kib``: the mappings qemu made for the guest, from
     /proc/PID/smaps every 100 ms, without qemu's binary, heap and translation cache);
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

from arm_proof import (
    VENV_PYTHON,
    community,
    emulated_argv,
    guest_rss_kib,
    host_env,
    proc_status,
    resolve_runner,
    run_session,
)

MEASURED = "h1"
GOAL_RSS_MIB = 40.0
GOAL_STARTUP_S = 2.0

IMPORTS = {
    "interpreter": "pass",
    "import wattmesh.peer.market": "import wattmesh.peer.market",
    "import worker + ADMM core": "import wattmesh.peer.worker, wattmesh.protocols.admm",
}

# Run in the measured interpreter: after each stage it prints its wall time and waits for
# a line on stdin, while this side reads the child's /proc/PID/status (the chroot has no
# /proc of its own, and the child must not perturb what it measures).
STAGES = """
import sys, time
def stage(label, seconds):
    print(label + "\t" + repr(seconds), flush=True)
    sys.stdin.readline()
stage("interpreter (python -c)", 0.0)
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
    stage(label, time.perf_counter() - t)
stage("amqtt imported " + str(any(m.split(".")[0] == "amqtt" for m in sys.modules)), len(sys.modules))
"""


def staged_imports(argv: list[str], env: dict[str, str], emulated: bool) -> tuple[list[list[Any]], bool, int]:
    """[[stage, wall s, VmRSS, RssAnon, RssFile (KiB), threads, guest KiB or None]], amqtt imported, modules."""
    child = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    rows: list[list[Any]] = []
    try:
        for line in child.stdout:
            label, value = line.rstrip("\n").split("\t")
            if label.startswith("amqtt imported "):
                child.stdin.write("\n")
                child.stdin.flush()
                child.wait(60)
                return rows, label.endswith("True"), int(value)
            status = proc_status(child.pid)
            kib = [int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")]
            guest = guest_rss_kib(child.pid) if emulated else None
            rows.append([label, float(value), *kib, int(status["Threads"]), guest])
            child.stdin.write("\n")
            child.stdin.flush()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    raise RuntimeError(f"staged imports ended early (exit {child.returncode})")


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
    runs = [
        staged_imports(*python_argv(where, rootfs, runner, ["-c", STAGES]), where == "emulated") for _ in range(repeat)
    ]
    # wall: median over the runs; memory: the first run's (it does not vary)
    out["stages"] = [
        [row[0], statistics.median(r[0][i][1] for r in runs), *row[2:]] for i, row in enumerate(runs[0][0])
    ]
    out["amqtt"], out["modules"] = runs[0][1], runs[0][2]
    return out


def print_imports(where: str, figures: dict[str, Any]) -> None:
    print(f"\n### Imports, {where}\n")
    print("| command | median wall [s] |")
    print("|---|---:|")
    for label in IMPORTS:
        print(f'| `python -c "{IMPORTS[label]}"` | {figures[label]:.3f} |')
    emulated = figures["stages"][0][-1] is not None
    head = "| stage (cumulative, one interpreter) | wall [s] | VmRSS [MiB] | anon | file-backed | threads |"
    print("\n" + head + (" aarch64 guest ≈ [MiB] |" if emulated else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if emulated else ""))
    for label, wall, rss, anon, file_, threads, guest in figures["stages"]:
        cells = [f"{wall:.3f}", *(f"{kib / 1024:.1f}" for kib in (rss, anon, file_)), str(threads)]
        if emulated:
            cells.append(f"{guest / 1024:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
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
            "guest_mib": peer.guest_kib / 1024 if peer.emulated else None,
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
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "–"
    mid = statistics.median(values)
    fmt = ".2f"
    if key in ("iterations", "threads"):
        fmt = ".0f"
    elif key in ("rss_mib", "guest_mib", "cpu_per_round_ms"):
        fmt = ".1f"
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
        ("guest_mib", "of which the aarch64 guest, estimated (peak) [MiB]", ""),
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
          f"paho-mqtt {version('paho-mqtt')}, msgpack {version('msgpack')}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
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
