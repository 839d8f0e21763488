"""``wattmesh run``: launch every peer of a scenario on this host and collect the result.

The launcher is a convenience, not a market participant: it starts a broker if asked,
gives each peer process its key and *only its own* private parameters (on stdin),
then listens as an observer for the peers' signed reports and writes them, aggregated,
to the result file. It never computes a market outcome itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattmesh.broker import start_broker
from wattmesh.broker.launch import die_with_parent
from wattmesh.peer.connection import PeerConnection
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.market import PeerJob
from wattmesh.protocols.errors import ScenarioError, WattmeshError
from wattmesh.protocols.monitoring import MonitorState, PeerStatus
from wattmesh.protocols.result import aggregate_reports
from wattmesh.protocols.scenario import Scenario, parse_scenario
from wattmesh.protocols.topology import diameter

__all__ = ["RunError", "RunOptions", "load_scenario", "run_scenario"]

OBSERVER_ID = "run-observer"


class RunError(WattmeshError):
    """A run could not complete (peers failed, timed out, or crashed)."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a scenario.

    Attributes:
        broker: ``auto``, ``embedded``, ``mosquitto`` or an ``mqtt://host:port`` URL.
        out: result JSON path; the run's keys, roster and logs go to ``<out stem>.d/``.
        peers_per_process: K peers per OS process (packed mode).
        timeout_s: the whole run's deadline.
        progress: called with one human line per notable event.
        watch: called with the live monitor state a few times a second.
        telemetry: follow the peers' per-round telemetry (the history in the result
            and the live view need it; costs one verification per peer per round).
        on_ready: called with (broker URL, roster path) just before the peers start,
            e.g. to attach a monitor.
    """

    broker: str = "auto"
    out: Path = Path("result.json")
    peers_per_process: int = 1
    timeout_s: float = 900.0
    progress: Callable[[str], None] = lambda line: None
    watch: Callable[[MonitorState, float], None] | None = None
    telemetry: bool = True
    on_ready: Callable[[str, Path], None] | None = None


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file (errors name the file)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(str(path), "", f"cannot read ({exc.strerror})") from None
    return parse_scenario(text, source=str(path))


@contextlib.asynccontextmanager
async def _broker_url(choice: str, progress: Callable[[str], None]) -> AsyncIterator[str]:
    if "://" in choice:
        yield choice
        return
    async with start_broker(choice) as broker:
        progress(f"broker: {broker.kind} at {broker.url}")
        yield broker.url


async def run_scenario(scenario: Scenario, options: RunOptions) -> dict[str, Any]:
    """Run every peer of ``scenario`` as OS processes and return the result document.

    Raises:
        RunError: a peer failed or the run timed out; the message names the peers and
            where their logs are.
    """
    if options.peers_per_process < 1:
        raise ValueError("peers_per_process must be >= 1")
    public = scenario.public
    ids = list(public.peer_ids)
    observer = OBSERVER_ID if OBSERVER_ID not in ids else f"{OBSERVER_ID}-{secrets.token_hex(2)}"
    run_dir = options.out.parent / f"{options.out.stem}.d"
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    keys = {pid: generate_key(run_dir / "keys" / f"{pid}.key", overwrite=True) for pid in [*ids, observer]}
    roster = write_roster(run_dir / "roster.toml", keys)
    roster_toml = roster.to_toml()
    session = f"{public.name}-{int(time.time())}-{secrets.token_hex(3)}"
    horizon = diameter(public.links)
    groups = [ids[i : i + options.peers_per_process] for i in range(0, len(ids), options.peers_per_process)]
    # Start-up (interpreter, imports, one connection per peer) dominates on 2 cores:
    # measured ~25 s for 500 peers in 20 processes on an idle machine; keep 4× margin.
    # Dense communities also subscribe two topics and verify barrier readies per link:
    # 200 peers on a complete graph (39,800 links) did not all start within 60 s.
    links = sum(len(v) for v in public.links.values())
    start_timeout = max(60.0, 2.0 * len(groups) + 0.2 * len(ids) + 0.002 * links)
    started = time.monotonic()
    monitor = MonitorState(expected_peers=len(ids), roster=roster, community=public.name)

    async with _broker_url(options.broker, options.progress) as url:
        connection = PeerConnection(
            observer, keys[observer], roster, community=public.name, session=session, url=url,
            read_only=True, max_pending=100_000,
        )  # fmt: skip
        async with connection as conn:
            await conn.subscribe_all("report")
            await conn.subscribe_all("presence")
            if options.telemetry:
                await conn.subscribe_all("telemetry")
            if options.on_ready is not None:
                options.on_ready(url, run_dir / "roster.toml")
            processes = [
                await _spawn(scenario, group, index, run_dir, roster_toml, url, session, horizon, start_timeout)
                for index, group in enumerate(groups)
            ]
            options.progress(f"started {len(ids)} peers in {len(processes)} processes (session {session})")
            try:
                await _collect(conn, monitor, processes, groups, started + options.timeout_s, options)
            finally:
                # finished peers linger briefly for their neighbours, then exit by themselves
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), 10.0)
                for process in processes:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.terminate()
                await asyncio.gather(*(p.wait() for p in processes))
    reports = {pid: dict(body) for pid, body in monitor.reports.items()}
    failures = {pid: s.failed for pid, s in monitor.peers.items() if s.failed and pid not in reports}
    wall = time.monotonic() - started
    # Written even when peers failed: the others may have cleared without them (a peer
    # gone for good is excluded by its neighbours), and their contracts are real.
    result = aggregate_reports(public, reports, wall_seconds=round(wall, 3), failed=failures)
    result["session"] = session
    result["history"] = [dataclasses.asdict(h) for h in monitor.history()]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = options.out.with_name(options.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(options.out)
    if missing := result["missing_peers"]:
        first = [f"{p}: {failures[p]}" if p in failures else f"{p}: never reported" for p in missing[:3]]
        cleared = f"; the other {len(reports)} cleared without them" if reports else ""
        raise RunError(
            f"{len(missing)} peer(s) failed, e.g. " + "; ".join(first)
            + f"{cleared} (result in {options.out}, logs in {run_dir / 'logs'})"
        )
    return result



async def _spawn(
    scenario: Scenario, group: list[str], index: int, run_dir: Path, roster_toml: str,
    url: str, session: str, horizon: int, start_timeout: float,
) -> asyncio.subprocess.Process:  # fmt: skip
    """One worker process for ``group``; its private parameters go in on stdin."""
    jobs = [
        PeerJob(
            scenario.peers[pid], scenario.public, horizon, run_dir / "keys" / f"{pid}.key",
            roster_toml, url, session, run_dir / "state", start_timeout,
        ).to_dict()
        for pid in group
    ]  # fmt: skip
    with open(run_dir / "logs" / f"worker-{index:04d}.log", "wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wattmesh.peer.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=log,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    assert process.stdin is not None
    process.stdin.write(json.dumps(jobs).encode())
    await process.stdin.drain()
    process.stdin.close()
    return process


async def _collect(
    conn: PeerConnection,
    monitor: MonitorState,
    processes: list[asyncio.subprocess.Process],
    groups: list[list[str]],
    deadline_monotonic: float,
    options: RunOptions,
) -> None:
    """Fold reports (and telemetry) into ``monitor`` until every peer has ended.

    A worker that exits leaves 2 s for its reports to arrive; its peers still silent
    then are failed ("exited before reporting"), not waited for until the run timeout.
    """
    total = monitor.expected_peers or 0
    last_line = 0.0
    last_watch = 0.0
    exited: dict[int, float] = {}
    while True:
        for index, process in enumerate(processes):
            if process.returncode is None:
                continue
            since = exited.setdefault(index, time.monotonic())
            if time.monotonic() - since > 2.0 and conn.pending == 0:
                for pid in groups[index]:
                    status = monitor.peers.setdefault(pid, PeerStatus())
                    if not status.finished and not status.failed:
                        status.failed = (
                            f"its process exited (code {process.returncode}) before it reported; "
                            f"see logs/worker-{index:04d}.log"
                        )
        ended = sum(1 for s in monitor.peers.values() if s.finished or s.failed)
        if ended >= total:
            break
        now = time.monotonic()
        if all(p.returncode is not None for p in processes):
            # every worker exited: reports still in flight get 2 s to arrive
            deadline_monotonic = min(deadline_monotonic, now + 2.0)
        if now > deadline_monotonic:
            if all(p.returncode is not None for p in processes):
                if conn.pending == 0:
                    return
                # reports queued behind telemetry still count: drain before giving up
            else:
                raise RunError(f"run timed out after {options.timeout_s:g} s")
        try:
            incoming = await conn.receive(timeout=max(0.05, min(0.25, deadline_monotonic - now)))
            monitor.observe(incoming.channel, incoming.envelope, time.monotonic())
        except TimeoutError:
            pass
        for peer, online in conn.presence.items():
            monitor.set_online(peer, online)
        now = time.monotonic()
        if options.watch is not None and now - last_watch > 0.25:
            last_watch = now
            options.watch(monitor, now)
        done = sum(1 for s in monitor.peers.values() if s.finished)
        failed = sum(1 for s in monitor.peers.values() if s.failed)
        if now - last_line > 2.0 or done + failed == total:
            if done + failed > 0 or now - last_line > 10.0:
                last_line = now
                at = f"iteration {monitor.iteration}: " if monitor.iteration else ""
                options.progress(f"{at}{done}/{total} peers done" + (f", {failed} failed" if failed else ""))
    if options.watch is not None:
        options.watch(monitor, time.monotonic())
