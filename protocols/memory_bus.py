"""An in-memory message bus that runs N protocol cores in one process.

It passes *encoded, signed frames* between the cores exactly as MQTT would, so a unit
test or a 10,000-peer simulation exercises the same wire and core code as a real run.
Delivery order is first-in first-out; nothing is lost. Time is virtual: it stands still
while messages are in flight and jumps to the earliest core deadline when none are, so
mechanisms with round deadlines run here too, instantly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.identity import Roster
from wattmesh.protocols.mechanism import MarketCore, Outgoing, PeerOutcome, create_core
from wattmesh.protocols.scenario import Scenario
from wattmesh.protocols.topology import diameter
from wattmesh.protocols.wire import Envelope, Verifier, encode

__all__ = ["BusResult", "run_in_memory"]


@dataclass(frozen=True, slots=True)
class BusResult:
    """Outcomes per peer and the traffic it took."""

    outcomes: Mapping[str, PeerOutcome]
    messages: int
    bytes: int


def run_in_memory(
    scenario: Scenario,
    keys: Mapping[str, Ed25519PrivateKey],
    *,
    session: str = "memory",
    max_deliveries: int = 50_000_000,
) -> BusResult:
    """Run the scenario's market to the end with every core in this process.

    Raises:
        RuntimeError: a core failed, or the delivery budget ran out (a livelock).
    """
    public = scenario.public
    roster = Roster({pid: keys[pid].public_key() for pid in public.peer_ids})
    horizon = diameter(public.links)
    cores: dict[str, MarketCore] = {pid: create_core(scenario.peers[pid], public, horizon) for pid in public.peer_ids}
    listeners: dict[str, list[str]] = {pid: [] for pid in public.peer_ids}
    for pid, core in cores.items():
        for other in core.neighbours:
            listeners[other].append(pid)
    verifiers = {pid: Verifier(roster, public.name, session) for pid in public.peer_ids}
    seq = dict.fromkeys(public.peer_ids, 0)
    queue: deque[tuple[str, bytes, str | None]] = deque()
    traffic = [0, 0]
    now = 0.0

    def publish(sender: str, items: list[Outgoing]) -> None:
        for item in items:
            if item.channel not in ("market", "inbox"):
                continue  # reports and telemetry are read off the cores directly
            seq[sender] += 1
            frame = encode(
                Envelope(item.type, sender, public.name, session, seq[sender], int(now * 1000), item.body),
                keys[sender],
            )
            traffic[0] += 1
            traffic[1] += len(frame)
            queue.append((sender, frame, item.to))

    for pid, core in cores.items():
        publish(pid, core.start(now))
    deliveries = 0
    while True:
        while queue:
            sender, frame, to = queue.popleft()
            for receiver in listeners[sender] if to is None else [to]:
                deliveries += 1
                envelope = verifiers[receiver].verify(frame)
                publish(receiver, cores[receiver].receive(envelope, now))
            if deliveries > max_deliveries:
                raise RuntimeError("delivery budget exhausted")
        deadlines = [(d, pid) for pid, c in cores.items() if not c.done and (d := c.next_deadline()) is not None]
        if not deadlines:
            break
        now = max(now, min(deadlines)[0])
        for d, pid in deadlines:
            if d <= now:
                publish(pid, cores[pid].on_timer(now))
    failed = {pid: c.failure for pid, c in cores.items() if c.failure}
    if failed:
        raise RuntimeError(f"cores failed: {failed}")
    missing = [pid for pid, c in cores.items() if c.outcome is None]
    if missing:
        raise RuntimeError(f"cores never finished: {missing[:5]}")
    outcomes = {pid: c.outcome for pid, c in cores.items() if c.outcome is not None}
    return BusResult(outcomes, traffic[0], traffic[1])
