"""Proof on ARM: a peer running on aarch64 joins a market session with x86_64 peers.

The aarch64 peer runs in a Debian bookworm arm64 userland under qemu user-mode
emulation (built by ``deploy/arm64-qemu.sh``: wattmesh installed from a wheel into
``/opt/wattmesh/venv`` of the rootfs, every dependency from a PyPI aarch64 wheel). On
this x86_64 host the script

1. shows what the emulated side is: the ELF machine of the rootfs' Python binary,
   ``uname -m`` and ``platform.machine()`` inside the rootfs, and where numpy,
   cryptography and wattmesh are imported from there;
2. starts Mosquitto natively on a free loopback port (``wattmesh.broker.start_broker``);
3. runs a small community (``--peers``, default 5, everyone may trade with everyone)
   as one ``python -m wattmesh.peer.worker`` process per peer, jobs JSON on stdin as
   ``wattmesh run`` does: peer ``--arm-peer`` (default the first) inside the rootfs
   (``chroot ROOTFS /opt/wattmesh/venv/bin/python -m wattmesh.peer.worker``), the others
   natively. The run directory (keys, roster, sequence files, logs) lives inside the
   rootfs under ``/tmp``, so the emulated peer sees it at ``/tmp/...`` and the native
   peers at ``ROOTFS/tmp/...``; the chroot shares the host's loopback, so every peer
   uses the same ``mqtt://127.0.0.1:PORT``;
4. listens as a read-only observer for every peer's signed report (each one verified
   against the roster by ``PeerConnection``), aggregates them as ``wattmesh run`` does
   (``aggregate_reports``: converged only if every peer reported, converged, and both
   ends of every trade agree), and compares the aarch64 peer's figures with the same
   community run natively on the in-memory bus (``run_in_memory``).

The proof holds (exit status 0) when the session converged, the aarch64 peer's signed
report is present, and its process really ran emulated (``/proc/PID/exe`` of the
worker is the qemu interpreter while it runs).

How the emulated process is started (``--runner``): ``binfmt`` runs ``chroot ROOTFS
PYTHON`` and lets the kernel's binfmt_misc entry ``qemu-aarch64`` pick qemu (needs
``update-binfmts --enable qemu-aarch64``); ``explicit`` runs ``chroot ROOTFS
/usr/bin/qemu-aarch64-static PYTHON`` with the static interpreter copied into the
rootfs, which needs no binfmt registration (the worker starts no other program);
``auto`` (default) takes ``binfmt`` when ``/proc/sys/fs/binfmt_misc/qemu-aarch64`` is
enabled, else ``explicit``.

Run from the repository root, as root (chroot), after ``deploy/arm64-qemu.sh``:

    nice -n 10 python tests/benchmarks/arm_proof.py --rootfs /srv/wattmesh-arm64
        [--peers 5] [--arm-peer h1] [--runner auto|binfmt|explicit] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wattmesh.broker import start_broker
from wattmesh.broker.launch import die_with_parent
from wattmesh.peer.connection import PeerConnection
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.market import PeerJob
from wattmesh.protocols.identity import public_key_hex
from wattmesh.protocols.memory_bus import run_in_memory
from wattmesh.protocols.result import aggregate_reports
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope

VENV_PYTHON = "/opt/wattmesh/venv/bin/python"
QEMU_IN_ROOTFS = "/usr/bin/qemu-aarch64-static"
BINFMT_ENTRY = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
OBSERVER = "proof-observer"
EM_AARCH64 = 183  # ELF e_machine
EM_X86_64 = 62
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Net demands of six homes (kWh; negative: surplus PV), flex and flex cost: enough
# surplus and demand on both sides that the community trades.
HOMES = [(-3.2, 1.0, 0.10), (2.6, 1.2, 0.08), (-1.4, 1.5, 0.15), (1.8, 1.0, 0.12), (0.2, 2.0, 0.05), (-0.9, 0.8, 0.20)]


def community(n: int, name: str = "arm-proof") -> Scenario:
    """A community of ``n`` homes (2 ≤ n ≤ 12), everyone may trade with everyone."""
    if not 2 <= n <= 2 * len(HOMES):
        raise ValueError(f"--peers must be 2..{2 * len(HOMES)}")
    lines = [
        f'[community]\nname = "{name}"\n[market]\nmechanism = "admm"\nfee = 0.004\n'
        "[grid]\nbuy_price = 0.30\nsell_price = 0.08\n"
    ]
    for i in range(n):
        demand, flex, cost = HOMES[i % len(HOMES)]
        demand *= 1.0 + 0.1 * (i // len(HOMES))
        lines.append(f'[[peers]]\nid = "h{i + 1}"\ndemand = {demand:.3f}\nflex = {flex}\nflex_cost = {cost}\n')
    return parse_scenario("\n".join(lines), source=name)


# ------------------------------------------------------------------ the emulated side
def elf_machine(path: Path) -> str:
    """The ELF e_machine of a binary (follows symlinks), e.g. ``aarch64``."""
    header = path.resolve().read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return "not ELF"
    machine = struct.unpack("<H", header[18:20])[0]
    return {EM_AARCH64: "aarch64", EM_X86_64: "x86_64"}.get(machine, f"e_machine {machine}")


def binfmt_enabled() -> bool:
    with contextlib.suppress(OSError):
        return BINFMT_ENTRY.read_text().splitlines()[0] == "enabled"
    return False


def resolve_runner(rootfs: Path, runner: str) -> str:
    if runner == "auto":
        runner = "binfmt" if binfmt_enabled() else "explicit"
    if runner == "binfmt" and not binfmt_enabled():
        raise SystemExit(f"{BINFMT_ENTRY} is not enabled: update-binfmts --enable qemu-aarch64, or --runner explicit")
    if runner == "explicit" and not (rootfs / QEMU_IN_ROOTFS.lstrip("/")).exists():
        raise SystemExit(f"{rootfs}{QEMU_IN_ROOTFS} missing: cp /usr/bin/qemu-aarch64-static {rootfs}/usr/bin/")
    return runner


def emulated_argv(rootfs: Path, runner: str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` (an aarch64 program inside ``rootfs``) as a host command line."""
    prefix = ["chroot", str(rootfs)]
    if runner == "explicit":
        prefix.append(QEMU_IN_ROOTFS)
    else:
        prefix += ["/usr/bin/env", "-i"]
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
    if runner == "explicit":  # qemu passes its own environment on; set it with -E
        return [*prefix, *(a for k, v in environment.items() for a in ("-E", f"{k}={v}")), *argv]
    return [*prefix, *(f"{k}={v}" for k, v in environment.items()), *argv]


def host_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for chroot/qemu themselves: the host's, less Python settings
    that would leak into the emulated interpreter (explicit runner) and confuse it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    return {**env, **(extra or {})}


PROBE = """
import json, os, platform, sys, importlib.metadata as md
import numpy, cryptography, msgpack, aiomqtt, paho.mqtt, wattmesh.peer.worker
print(json.dumps({
    "uname_m": os.uname().machine, "platform_machine": platform.machine(),
    "python": sys.version.split()[0], "executable": sys.executable,
    "numpy": numpy.__version__ + " " + os.path.dirname(numpy.__file__),
    "cryptography": md.version("cryptography"), "msgpack": md.version("msgpack"),
    "aiomqtt": md.version("aiomqtt"), "paho-mqtt": md.version("paho-mqtt"),
    "wattmesh": md.version("wattmesh") + " " + os.path.dirname(wattmesh.peer.worker.__file__),
}))
"""


def probe_rootfs(rootfs: Path, runner: str) -> dict[str, Any]:
    """What the emulated userland says about itself."""
    facts: dict[str, Any] = {"python_elf": elf_machine(rootfs / "usr/bin/python3"), "host": platform.machine()}
    uname = subprocess.run(emulated_argv(rootfs, runner, ["/bin/uname", "-m"]), env=host_env(),
                           capture_output=True, text=True, check=True)  # fmt: skip
    facts["uname -m (rootfs /bin/uname)"] = uname.stdout.strip()
    probe = subprocess.run(emulated_argv(rootfs, runner, [VENV_PYTHON, "-c", PROBE]), env=host_env(),
                           capture_output=True, text=True, check=True)  # fmt: skip
    facts.update(json.loads(probe.stdout))
    return facts


# ------------------------------------------------------------------ one session
def proc_cpu_s(pid: int) -> float | None:
    """user + system CPU of ``pid`` so far [s], from /proc/PID/stat (utime, stime)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


def proc_status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


_QEMU_SPECIAL = ("[heap]", "[stack]", "[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")


def guest_rss_kib(pid: int) -> int | None:
    """Estimated resident memory of the aarch64 guest inside a qemu-user process [KiB].

    qemu-user maps the guest's memory 1:1 below its own: the sum of the Rss of every
    mapping that starts below qemu's heap (the host brk), less qemu's own binary. What
    it leaves out is qemu's: its binary, heap, translation buffer and thread arenas.
    """
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    maps: list[tuple[int, str, int]] = []
    start, path = 0, ""
    for line in text.splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, path = int(head[0].split("-")[0], 16), head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:":
            maps.append((start, path, int(head[1])))
    heap = min((a for a, p, _ in maps if p == "[heap]"), default=0x7F00_0000_0000)
    return sum(kib for a, p, kib in maps if a < heap and "qemu-" not in p and p not in _QEMU_SPECIAL)


@dataclass
class PeerProcess:
    """One worker process and what was measured of it (times: time.monotonic() [s])."""

    peer_id: str
    emulated: bool
    process: asyncio.subprocess.Process
    spawned: float
    online: float | None = None
    reported: float | None = None
    cpu_online: float | None = None
    cpu_report: float | None = None
    cpu_last: float = 0.0
    hwm_kib: int = 0
    guest_kib: int = 0  # emulated only: peak of guest_rss_kib() over samples
    threads: int = 0
    exe: str = ""
    samples: int = 0

    def sample(self) -> float | None:
        """Read the process's CPU, peak RSS and executable while it lives."""
        pid = self.process.pid
        if self.process.returncode is not None:
            return None
        status = proc_status(pid)
        if hwm := status.get("VmHWM"):
            self.hwm_kib = max(self.hwm_kib, int(hwm.split()[0]))
            self.threads = max(self.threads, int(status.get("Threads", "0")))
        with contextlib.suppress(OSError):
            self.exe = os.readlink(f"/proc/{pid}/exe")
        if self.emulated and self.samples % 10 == 0:  # smaps is costly: every 10th sample
            self.guest_kib = max(self.guest_kib, guest_rss_kib(pid) or 0)
        self.samples += 1
        cpu = proc_cpu_s(pid)
        if cpu is not None:
            self.cpu_last = cpu
        return cpu


@dataclass
class Session:
    scenario: Scenario
    url: str = ""
    session: str = ""
    run_dir: Path = Path()
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    envelopes: dict[str, Envelope] = field(default_factory=dict)
    failures: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, PeerProcess] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    public_keys: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


async def run_session(
    scenario: Scenario,
    rootfs: Path,
    emulated: set[str],
    *,
    runner: str = "binfmt",
    timeout_s: float = 600.0,
    start_timeout_s: float = 300.0,
    keep: bool = False,
    worker_env: dict[str, str] | None = None,
    last: str | None = None,
) -> Session:
    """Run ``scenario`` with one worker process per peer; peers in ``emulated`` inside
    ``rootfs`` under qemu, the rest natively. Returns reports and per-process figures.

    ``last``: a peer spawned only once every other peer is online (its birth seen), so
    its start-up is measured without the others competing for the CPU.
    """
    public = scenario.public
    ids = list(public.peer_ids)
    # Inside the rootfs, so the emulated peer reads the same files at /tmp/<name>.
    (rootfs / "tmp").mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="wattmesh-arm-proof-", dir=rootfs / "tmp"))
    inside = Path("/tmp") / run_dir.name
    (run_dir / "logs").mkdir()
    keys = {pid: generate_key(run_dir / "keys" / f"{pid}.key") for pid in [*ids, OBSERVER]}
    roster = write_roster(run_dir / "roster.toml", keys)
    out = Session(scenario, run_dir=run_dir)
    out.public_keys = {pid: public_key_hex(key.public_key()) for pid, key in keys.items()}
    out.session = f"{public.name}-{int(time.time())}-{os.getpid()}"
    horizon = diameter(public.links)
    started = time.monotonic()
    try:
        async with start_broker("mosquitto") as broker:
            out.url = broker.url
            observer = PeerConnection(
                OBSERVER, keys[OBSERVER], roster, community=public.name, session=out.session, url=broker.url,
                read_only=True,
            )  # fmt: skip
            async with observer as conn:
                await conn.subscribe_all("report")
                await conn.subscribe_all("presence")
                sampler = asyncio.create_task(_sample(out, conn))
                try:
                    for pid in [p for p in ids if p != last] + [p for p in ids if p == last]:
                        if pid == last:
                            await _wait_online(conn, [p for p in ids if p != last], started + start_timeout_s)
                        base = inside if pid in emulated else run_dir
                        job = PeerJob(
                            scenario.peers[pid], public, horizon, base / "keys" / f"{pid}.key", roster.to_toml(),
                            broker.url, out.session, base / "state", start_timeout_s,
                        )  # fmt: skip
                        out.peers[pid] = await _spawn(pid, job, pid in emulated, rootfs, runner, run_dir, worker_env)
                    await _collect(out, conn, started + timeout_s)
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                    for peer in out.peers.values():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(peer.process.wait(), 60.0)
                        if peer.process.returncode is None:
                            with contextlib.suppress(ProcessLookupError):
                                peer.process.terminate()
                            await peer.process.wait()
    finally:
        if not keep and not out.failures and len(out.reports) == len(ids):
            shutil.rmtree(run_dir, ignore_errors=True)
    out.wall_s = time.monotonic() - started
    out.result = aggregate_reports(public, out.reports, wall_seconds=round(out.wall_s, 3))
    return out


async def _spawn(
    pid: str, job: PeerJob, emulated: bool, rootfs: Path, runner: str, run_dir: Path, env: dict[str, str] | None
) -> PeerProcess:
    """One worker process, its job on stdin (as ``launcher._spawn``)."""
    if emulated:
        argv = emulated_argv(rootfs, runner, [VENV_PYTHON, "-m", "wattmesh.peer.worker"], env)
        process_env = host_env()
    else:
        argv = [sys.executable, "-m", "wattmesh.peer.worker"]
        process_env = {**os.environ, **(env or {})}
    with open(run_dir / "logs" / f"{pid}.log", "wb") as log:
        spawned = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=log,
            env=process_env, preexec_fn=die_with_parent,
        )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(json.dumps([job.to_dict()]).encode())
    await process.stdin.drain()
    process.stdin.close()
    return PeerProcess(pid, emulated, process, spawned)


async def _wait_online(conn: PeerConnection, peers: list[str], deadline: float) -> None:
    while not all(conn.online(pid) for pid in peers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not online: {[pid for pid in peers if not conn.online(pid)]}")
        await asyncio.sleep(0.01)


async def _sample(out: Session, conn: PeerConnection) -> None:
    """Every 10 ms: each live process's CPU and peak RSS; note when its birth arrives."""
    while True:
        for peer in list(out.peers.values()):
            cpu = peer.sample()
            if peer.online is None and conn.online(peer.peer_id):
                peer.online = time.monotonic()
                peer.cpu_online = cpu
        await asyncio.sleep(0.01)


async def _collect(out: Session, conn: PeerConnection, deadline: float) -> None:
    """Receive verified reports until every peer reported or failed, or the deadline."""
    ids = set(out.scenario.public.peer_ids)
    while set(out.reports) | set(out.failures) != ids:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no report from {sorted(ids - set(out.reports) - set(out.failures))}")
        if out.peers and all(p.process.returncode is not None for p in out.peers.values()) and conn.pending == 0:
            await asyncio.sleep(2.0)  # reports still in flight
            if conn.pending == 0:
                break
        try:
            incoming = await conn.receive(timeout=0.25)
        except TimeoutError:
            continue
        if incoming.channel != "report":
            continue
        envelope = incoming.envelope
        peer = out.peers.get(envelope.sender)
        if peer is not None and peer.reported is None:
            peer.reported = time.monotonic()
            peer.cpu_report = peer.sample()
        if envelope.type.endswith(".report"):
            out.reports[envelope.sender] = dict(envelope.body)
            out.envelopes[envelope.sender] = envelope
        else:
            out.failures[envelope.sender] = dict(envelope.body)


# ------------------------------------------------------------------ the proof
def compare_with_bus(scenario: Scenario, peer_id: str, report: dict[str, Any]) -> tuple[int, float]:
    """(bus iterations, largest |difference| of the peer's figures) against the same
    community on the native in-memory bus."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {pid: Ed25519PrivateKey.generate() for pid in scenario.public.peer_ids}
    outcome = run_in_memory(scenario, keys).outcomes[peer_id].to_body()
    diffs = [abs(float(outcome[k]) - float(report[k])) for k in ("net_demand", "grid_import", "payment", "cost")]
    for other, (kwh, price) in outcome["trades"].items():
        theirs = report["trades"][other]
        diffs += [abs(kwh - theirs[0]), abs(price - theirs[1])]
    return int(outcome["iterations"]), max(diffs)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rootfs", type=Path, default=Path("/srv/wattmesh-arm64"), help="the arm64 rootfs")
    parser.add_argument("--peers", type=int, default=5, help="community size (2..12)")
    parser.add_argument("--arm-peer", default="h1", help="the peer that runs on aarch64")
    parser.add_argument("--runner", choices=("auto", "binfmt", "explicit"), default="auto")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of the session [s]")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (keys, logs)")
    args = parser.parse_args()
    rootfs = args.rootfs.resolve()
    if not (rootfs / VENV_PYTHON.lstrip("/")).exists():
        raise SystemExit(f"{rootfs}{VENV_PYTHON} missing: run deploy/arm64-qemu.sh first")
    runner = resolve_runner(rootfs, args.runner)
    scenario = community(args.peers)
    if args.arm_peer not in scenario.peers:
        raise SystemExit(f"--arm-peer {args.arm_peer!r} is not one of {', '.join(scenario.public.peer_ids)}")

    print(f"# arm_proof: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# host: {platform.platform()}, Python {platform.python_version()} ({platform.machine()})")
    print(f"# runner: {runner} (binfmt_misc qemu-aarch64 {'enabled' if binfmt_enabled() else 'not enabled'})")
    print("\n## The emulated userland")
    facts = probe_rootfs(rootfs, runner)
    for key, value in facts.items():
        print(f"{key}: {value}")

    print(f"\n## Session: {args.peers} peers, {args.arm_peer} on aarch64, the others on {platform.machine()}")
    out = await run_session(scenario, rootfs, {args.arm_peer}, runner=runner, timeout_s=args.timeout, keep=args.keep)
    arm = out.peers[args.arm_peer]
    print(f"broker: Mosquitto at {out.url}, session {out.session}")
    print(f"{args.arm_peer} worker: pid {arm.process.pid}, /proc/PID/exe = {arm.exe} "
          f"(ELF {elf_machine(Path(arm.exe)) if arm.exe else '?'}), exit status {arm.process.returncode}")  # fmt: skip
    for pid, peer in out.peers.items():
        where = "aarch64 (qemu)" if peer.emulated else platform.machine()
        online = f"{peer.online - peer.spawned:.2f} s" if peer.online else "never seen"
        guest = f" (guest ≈ {peer.guest_kib / 1024:.1f} MiB)" if peer.emulated else ""
        print(f"  {pid}: {where:15} online after {online}, peak RSS {peer.hwm_kib / 1024:.1f} MiB{guest}, "
              f"CPU {peer.cpu_last:.2f} s, exit {peer.process.returncode}")  # fmt: skip
    result = out.result
    print(f"converged: {result['converged']}")
    print(f"iterations: {result['iterations']}")
    print(f"social cost: {result['social_cost']:.6f} (grid only: {result['grid_only_cost']:.6f})")
    print(f"trades: {len(result['trades'])}, disputes: {len(result['disputes'])}, missing: {result['missing_peers']}")
    print(f"failures: {out.failures or 'none'}")
    ok = bool(result["converged"]) and args.arm_peer in out.reports and "qemu" in arm.exe
    envelope = out.envelopes.get(args.arm_peer)
    if envelope is not None:
        print(f"\n## {args.arm_peer}'s signed report (verified against roster key {out.public_keys[args.arm_peer]})")
        print(f"type {envelope.type}, sender {envelope.sender}, session {envelope.session}, seq {envelope.seq}")
        print(json.dumps(out.reports[args.arm_peer], indent=1, sort_keys=True))
        iterations, diff = compare_with_bus(scenario, args.arm_peer, out.reports[args.arm_peer])
        same = iterations == out.reports[args.arm_peer]["iterations"]
        print(f"native in-memory bus: {iterations} iterations ({'same' if same else 'DIFFERENT'}), "
              f"largest difference of {args.arm_peer}'s figures {diff:.1e}")  # fmt: skip
        ok = ok and same and diff < 1e-9
    if args.keep or not ok:
        print(f"run directory (keys, logs): {out.run_dir}")
    print(f"\nPROOF {'HOLDS' if ok else 'FAILED'}: an aarch64 peer {'joined' if ok else 'did not complete'} "
          f"a converged session with {args.peers - 1} x86_64 peers")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
