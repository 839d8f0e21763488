"""Acceptance does not depend on clocks, and a restart never opens a replay window.

Envelopes carry the sender's clock (``time_ms``) for humans and logs; acceptance rests
on signatures and per-sender sequence numbers only. So peers whose clocks are five
minutes apart in either direction talk without a single false rejection, and after a
peer restarts (new connection, sequence numbers from its state file) every frame it sent
before the restart, published again by anyone, is dropped as a replay.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import aiomqtt
from _helpers import SESSION, TIMEOUT, make_keys, unique_community

from wattmesh.broker import BrokerHandle
from wattmesh.peer.connection import PeerConnection, Topics, parse_url
from wattmesh.peer.sequence import SequenceStore
from wattmesh.protocols.wire import Verifier

SKEW_S = 300.0


async def test_skewed_clocks_and_a_restart_accept_every_genuine_frame_and_no_replay(
    any_broker: BrokerHandle, tmp_path: Path
) -> None:
    # GIVEN peer a five minutes fast and peer b five minutes slow
    community = unique_community()
    keys, roster = make_keys("a", "b")

    def peer(pid: str, skew: float) -> PeerConnection:
        return PeerConnection(
            pid, keys[pid], roster, community=community, session=SESSION, url=any_broker.url,
            sequence=SequenceStore(tmp_path / f"{pid}.seq"), clock=lambda: time.time() + skew,
        )  # fmt: skip

    sent: list[bytes] = []
    async with peer("b", -SKEW_S) as b:
        await b.subscribe("market", ["a"])
        # WHEN a talks, restarts (its state file keeps its sequence), and talks again
        for _ in range(2):
            async with peer("a", +SKEW_S) as a:
                for n in range(3):
                    await a.publish("market", "test.round", {"k": n})
                    incoming = await b.receive(TIMEOUT)
                    sent.append(incoming.frame)
                    # THEN b accepts every genuine frame, whatever the clocks say
                    assert incoming.envelope.sender == "a"
                    assert abs(incoming.envelope.time_ms / 1000 - time.time() - SKEW_S) < 60
        # AND every frame a ever sent, replayed onto its topic after the restart, is dropped
        host, port = parse_url(any_broker.url)
        async with aiomqtt.Client(host, port) as raw:
            for frame in sent:
                await raw.publish(Topics(community).of("market", "a"), frame, qos=1)
            async with peer("a", +SKEW_S) as a:
                await a.publish("market", "test.marker", {})
                marker = await b.receive(TIMEOUT)
        assert marker.envelope.type == "test.marker"
        assert b.drops == Counter({"replay": len(sent)})
        assert marker.envelope.seq > max(_seq(f, b) for f in sent)


def _seq(frame: bytes, conn: PeerConnection) -> int:
    """The sequence number inside a frame, checked with a fresh verifier."""
    return Verifier(conn._roster, conn.community, None).verify(frame).seq
