"""PeerConnection over real brokers: signed exchange, presence, Nagle off, topic checks.

Every test runs once over the embedded amqtt broker and once over Mosquitto
(``any_broker``), in a community (topic root) of its own. Nothing sleeps: each step
waits on a message, a presence change or a timeout error.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import pytest
from _helpers import (
    ROUND_BODY,
    SESSION,
    TIMEOUT,
    RawPublisher,
    client_socket,
    connect,
    connected_pair,
    drop_abruptly,
    make_keys,
    pack,
    payload_fields,
    sign,
    unique_community,
    wait_presence,
)

from wattmesh.broker import BrokerHandle
from wattmesh.peer.connection import BrokerConnectionError, Incoming, Topics
from wattmesh.peer.sequence import SequenceStore


async def test_market_message_reaches_a_subscribed_neighbour(any_broker: BrokerHandle) -> None:
    community = unique_community()
    async with connected_pair(community, any_broker.url) as (a, b):
        await b.subscribe("market", ["a"])
        await a.publish("market", "admm.round", ROUND_BODY)
        incoming = await b.receive(TIMEOUT)
        assert (a.published, b.received, b.drops) == (1, 1, Counter())

    assert isinstance(incoming, Incoming)
    assert incoming.channel == "market"
    envelope = incoming.envelope
    assert (envelope.sender, envelope.type, envelope.community, envelope.session) == (
        "a",
        "admm.round",
        community,
        SESSION,
    )
    assert envelope.body == ROUND_BODY
    assert a.bytes_published > len(pack(payload_fields("a", community, 1)))  # payload + signature


async def test_inbox_request_and_reply(any_broker: BrokerHandle) -> None:
    community = unique_community()
    async with connected_pair(community, any_broker.url) as (a, b):
        await a.publish("inbox", "negotiation.offer", {"kwh": 1.5, "price": 0.21}, to="b")
        request = await b.receive(TIMEOUT)
        await b.publish("inbox", "negotiation.accept", {"kwh": 1.5}, to=request.envelope.sender)
        reply = await a.receive(TIMEOUT)

    assert request.channel == reply.channel == "inbox"
    assert (request.envelope.sender, request.envelope.type, request.envelope.body) == (
        "a",
        "negotiation.offer",
        {"kwh": 1.5, "price": 0.21},
    )
    assert (reply.envelope.sender, reply.envelope.type, reply.envelope.body) == (
        "b",
        "negotiation.accept",
        {"kwh": 1.5},
    )
    assert a.drops == b.drops == Counter()


async def test_a_burst_arrives_complete_and_in_order(any_broker: BrokerHandle) -> None:
    community = unique_community()
    async with connected_pair(community, any_broker.url) as (a, b):
        await b.subscribe("market", ["a"])
        for k in range(1, 51):
            await a.publish("market", "admm.round", {**ROUND_BODY, "k": k})
        rounds = [(await b.receive(TIMEOUT)).envelope for _ in range(50)]
        assert b.pending == 0

    assert [e.body["k"] for e in rounds] == list(range(1, 51))
    seqs = [e.seq for e in rounds]
    assert seqs == sorted(set(seqs))
    assert b.drops == Counter()


async def test_receive_times_out_when_nothing_arrives(any_broker: BrokerHandle) -> None:
    keys, roster = make_keys("a")
    async with connect("a", keys, roster, unique_community(), any_broker.url) as a:
        with pytest.raises(TimeoutError):
            await a.receive(0.05)


async def test_client_socket_has_nagle_disabled(any_broker: BrokerHandle) -> None:
    keys, roster = make_keys("a")
    async with connect("a", keys, roster, unique_community(), any_broker.url) as a:
        sock = client_socket(a)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_announce_makes_a_peer_online(any_broker: BrokerHandle) -> None:
    community = unique_community()
    async with connected_pair(community, any_broker.url) as (a, b):
        await b.subscribe("presence", ["a"])
        assert not b.online("a")
        await a.announce()
        await b.wait_online(["a"], TIMEOUT)
        assert b.online("a")
        assert b.pending == 0  # presence is state, not a message for the mechanism


async def test_late_subscriber_sees_the_retained_birth(any_broker: BrokerHandle) -> None:
    community = unique_community()
    keys, roster = make_keys("a", "b")
    async with connect("a", keys, roster, community, any_broker.url) as a:
        await a.announce()  # PUBACKed: the broker holds it before b exists
        async with connect("b", keys, roster, community, any_broker.url) as b:
            await b.subscribe("presence", ["a"])
            await b.wait_online(["a"], TIMEOUT)


async def test_last_will_marks_a_dropped_peer_offline(any_broker: BrokerHandle) -> None:
    community = unique_community()
    async with connected_pair(community, any_broker.url) as (a, b):
        await b.subscribe("presence", ["a"])
        await a.announce()
        await b.wait_online(["a"], TIMEOUT)

        drop_abruptly(a)  # no DISCONNECT: only the broker's Last Will can tell b

        await wait_presence(b, "a", online=False)
        with pytest.raises(BrokerConnectionError):
            await a.receive(TIMEOUT)
    assert b.drops == Counter()


async def test_clean_exit_marks_a_peer_offline(any_broker: BrokerHandle) -> None:
    community = unique_community()
    keys, roster = make_keys("a", "b")
    async with connect("b", keys, roster, community, any_broker.url) as b:
        await b.subscribe("presence", ["a"])
        async with connect("a", keys, roster, community, any_broker.url) as a:
            await a.announce()
            await b.wait_online(["a"], TIMEOUT)
        await wait_presence(b, "a", online=False)
    assert b.drops == Counter()


async def test_restarted_peer_is_online_again(any_broker: BrokerHandle, tmp_path: Path) -> None:
    """GIVEN a peer that crashed (its Will said offline)
    WHEN it restarts with the same sequence file
    THEN its new birth is not mistaken for a replay."""
    community = unique_community()
    keys, roster = make_keys("a", "b")
    state = tmp_path / "a.seq"
    async with connect("b", keys, roster, community, any_broker.url) as b:
        await b.subscribe("presence", ["a"])
        async with connect(
            "a", keys, roster, community, any_broker.url, sequence=SequenceStore(state)
        ) as a:
            await a.announce()
            await b.wait_online(["a"], TIMEOUT)
            drop_abruptly(a)
            await wait_presence(b, "a", online=False)

        restarted = SequenceStore(state)
        async with connect("a", keys, roster, community, any_broker.url, sequence=restarted) as a:
            await a.announce()
            await b.wait_online(["a"], TIMEOUT)
    assert b.drops == Counter()


async def test_wait_online_names_the_missing_peers(any_broker: BrokerHandle) -> None:
    community = unique_community()
    async with connected_pair(community, any_broker.url) as (a, b):
        await b.subscribe("presence", ["a", "zed"])
        await a.announce()
        await b.wait_online(["a"], TIMEOUT)

        with pytest.raises(TimeoutError) as one:
            await b.wait_online(["zed", "a"], 0.1)
        many = [f"p{i}" for i in range(7)]
        with pytest.raises(TimeoutError) as seven:
            await b.wait_online(["a", *many], 0.05)

    assert str(one.value) == "1 peer(s) not online after 0.1 s: zed"
    assert str(seven.value) == "7 peer(s) not online after 0.05 s: p0, p1, p2, p3, p4 …"


async def test_frame_on_another_peers_market_topic_is_dropped(any_broker: BrokerHandle) -> None:
    """GIVEN c listens to the market channels of a and b
    WHEN a frame genuinely signed by a appears on b's market topic
    THEN c drops it as a topic mismatch, and a's own messages still reach c."""
    community = unique_community()
    keys, roster = make_keys("a", "b", "c")
    topic_b = Topics(community).of("market", "b")
    async with (
        connect("a", keys, roster, community, any_broker.url) as a,
        connect("c", keys, roster, community, any_broker.url) as c,
    ):
        await c.subscribe("market", ["a", "b"])
        async with RawPublisher(any_broker.url) as raw:
            raw.publish(topic_b, sign(keys["a"], pack(payload_fields("a", community, 7))))
            raw.publish(topic_b, sign(keys["b"], pack(payload_fields("b", community, 1))))
            from_b = await c.receive(TIMEOUT)  # same client, topic and QoS: in order
        assert c.drops == Counter(topic_mismatch=1)

        await a.publish("market", "admm.round", ROUND_BODY)  # a's seq is still below 7
        from_a = await c.receive(TIMEOUT)

    assert (from_b.channel, from_b.envelope.sender) == ("market", "b")
    assert (from_a.channel, from_a.envelope.sender) == ("market", "a")
    assert from_a.envelope.seq < 7  # what a channel-wide replay table would have refused
    assert c.drops == Counter(topic_mismatch=1)


async def test_misplaced_copy_does_not_block_the_genuine_frame(any_broker: BrokerHandle) -> None:
    """GIVEN someone retained a copy of a's birth on b's presence topic
    WHEN c subscribes to b's presence before a's and meets the copy first
    THEN a's genuine birth on its own topic still counts: a is online for c."""
    community = unique_community()
    keys, roster = make_keys("a", "b", "c")
    topics = Topics(community)
    birth = sign(
        keys["a"], pack(payload_fields("a", community, 1, type="presence", body={"online": True}))
    )
    async with RawPublisher(any_broker.url) as raw:
        await raw.publish_acked(topics.of("presence", "b"), birth, retain=True)
        await raw.publish_acked(topics.of("presence", "a"), birth, retain=True)
    async with connect("c", keys, roster, community, any_broker.url) as c:
        await c.subscribe("presence", ["b"])
        await c.subscribe("presence", ["a"])
        await c.wait_online(["a"], TIMEOUT)
    assert not c.online("b")
    assert c.drops == Counter(topic_mismatch=1)
