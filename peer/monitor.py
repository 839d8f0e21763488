"""The monitor peer: watch a community's market live, from verified telemetry only.

``wattmesh monitor`` connects read-only with its own key, verifies every frame against
the roster, and redraws a terminal view a few times a second from a
:class:`~wattmesh.protocols.monitoring.MonitorState`. Reading and drawing are decoupled:
frames are folded into the state as they arrive (bounded queue), the view is drawn
on a timer, so a slow terminal never slows the market.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from wattmesh.peer.connection import PeerConnection
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.monitoring import MonitorState, Snapshot

__all__ = ["render", "render_text", "watch"]

MONITOR_QUEUE = 20_000


def _fmt(value: float, spec: str = ".3g") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def render(snapshot: Snapshot, *, title: str = "wattmesh monitor") -> Group:
    """The live view as a rich renderable."""
    latest = snapshot.latest
    table = Table(title=title, show_header=False, expand=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    expected = snapshot.expected_peers if snapshot.expected_peers is not None else "?"
    table.add_row("session", snapshot.session or "(waiting for telemetry)")
    table.add_row("iteration", str(snapshot.iteration))
    table.add_row(
        "peers",
        f"{snapshot.online}/{expected} online · {snapshot.late} late · {snapshot.dropped} dropped · "
        f"{snapshot.finished} finished",
    )
    if latest is not None:
        table.add_row("primal residual", f"{_fmt(latest.primal)} kWh (iteration {latest.iteration})")
        table.add_row("dual residual", f"{_fmt(latest.dual)} per kWh")
        table.add_row(
            "price min/mean/max",
            f"{_fmt(latest.price_min, '.4f')} / {_fmt(latest.price_mean, '.4f')} / {_fmt(latest.price_max, '.4f')}",
        )
        table.add_row("social cost estimate", _fmt(latest.social_cost, ".4f"))
    bar = ProgressBar(total=1.0, completed=snapshot.converged_share, width=30)
    progress = Table.grid(padding=(0, 1))
    progress.add_row(Text("peers within tolerance", style="bold"), bar, Text(f"{100 * snapshot.converged_share:.0f} %"))
    parts: list[Any] = [table, progress]
    if snapshot.liars:
        parts.append(Text(f"equivocation proven (excluded): {', '.join(snapshot.liars)}", style="bold red"))
    if snapshot.settled_line:
        parts.append(Text(snapshot.settled_line, style="bold green"))
    return Group(*parts)


def render_text(snapshot: Snapshot, *, width: int = 100) -> str:
    """The view as plain text at a fixed width (tests, logs)."""
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(render(snapshot))
    return console.export_text()


async def watch(
    url: str,
    community: str,
    roster: Roster,
    key: Any,
    *,
    peer_id: str = "monitor",
    expected_peers: int | None = None,
    until_settled: bool = True,
    timeout_s: float | None = None,
    console: Console | None = None,
    refresh_hz: float = 4.0,
) -> MonitorState:
    """Follow a community's market and draw it until it settles (or ``timeout_s``).

    Joining mid-run works: the view starts at the iteration the peers are at.
    """
    from rich.live import Live

    state = MonitorState(expected_peers=expected_peers, roster=roster, community=community)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    connection = PeerConnection(
        peer_id, key, roster, community=community, session=None, url=url,
        read_only=True, max_pending=MONITOR_QUEUE,
    )  # fmt: skip
    async with connection as conn:
        for channel in ("presence", "telemetry", "report"):
            await conn.subscribe_all(channel)  # presence is folded in by the connection
        with Live(render(state.snapshot(loop.time())), console=console, refresh_per_second=refresh_hz) as live:
            next_draw = loop.time()
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                if until_settled and state.snapshot(now).settled:
                    break
                wait = next_draw - now
                try:
                    incoming = await conn.receive(timeout=max(wait, 0.0))
                    state.observe(incoming.channel, incoming.envelope, loop.time())
                except TimeoutError:
                    pass
                for peer, online in conn.presence.items():
                    state.set_online(peer, online)
                if loop.time() >= next_draw:
                    live.update(render(state.snapshot(loop.time())))
                    next_draw = loop.time() + 1.0 / refresh_hz
            live.update(render(state.snapshot(loop.time())))
    return state

