"""What signing costs: Ed25519 and wire encoding rates, and the signed round trip.

1. In this process, for a typical ``admm.round`` body with 6 neighbours: Ed25519
   sign and verify rates, ``encode`` (envelope -> signed frame) and
   ``Verifier.verify`` (signed frame -> checked envelope) rates.
2. Through each broker kind (started with :func:`wattmesh.broker.start_broker`): the
   round trip of a signed request/response between two :class:`PeerConnection`\\ s
   (A publishes on its market channel, B answers on its own, A waits for the answer),
   next to the raw paho-mqtt ping-pong through the same broker
   (``raw_pingpong.raw_round_trip_ms``, QoS 1 like the market channel). The goal is a
   signed round trip of at most 3x the raw one.

Both peers share one process and one event loop, as the raw pinger and echo client
share one process: each signed round trip carries 2 signs and 2 verifies on that core.

Run: ``python tests/benchmarks/bench_wire.py [--count 1000] [--kind embedded ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent))

from raw_pingpong import raw_round_trip_ms

from wattmesh.broker import start_broker
from wattmesh.peer.connection import PeerConnection
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.wire import DOMAIN, Envelope, Verifier, encode

COMMUNITY = "bench"
SESSION = "bench-1"
NEIGHBOURS = [f"h{i:03d}" for i in range(2, 8)]  # 6 neighbours of h001
WARMUP = 50
TIMEOUT = 10.0  # [s] for one answer


def round_body(k: int) -> dict[str, Any]:
    """A typical admm.round body (docs/wire.md §10) of a peer with 6 neighbours."""
    return {
        "k": k,
        "t": {pid: 0.123456789 * (i + 1) * (-1) ** i for i, pid in enumerate(NEIGHBOURS)},
        "v0": max(1, k - 4),
        "votes": [True, False, True, True][: min(4, k - 1)],
    }


def _rate(operation: Callable[[int], object], count: int) -> float:
    """Operations per second of ``operation(i)`` for i in range(count)."""
    start = time.perf_counter()
    for i in range(count):
        operation(i)
    return count / (time.perf_counter() - start)


def crypto_rates(count: int) -> tuple[int, list[tuple[str, float]]]:
    """(frame size [bytes], [(operation, rate [msg/s])])."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key()
    roster = Roster({"h001": public})
    envelopes = [
        Envelope("admm.round", "h001", COMMUNITY, SESSION, seq, 1_700_000_000_000, round_body(17))
        for seq in range(1, count + 1)
    ]
    frame = encode(envelopes[0], key)
    assert frame[:2] == b"\x92\xc4" and frame[-66:-64] == b"\xc4\x40"  # payload < 256 bytes
    message = DOMAIN + frame[3:-66]  # what is signed: DOMAIN + the payload bytes
    signature = frame[-64:]
    public.verify(signature, message)  # raises if the slicing were wrong

    frames: list[bytes] = []
    rows = [
        ("Ed25519 sign", _rate(lambda _i: key.sign(message), count)),
        ("Ed25519 verify", _rate(lambda _i: public.verify(signature, message), count)),
        (
            "encode (envelope -> frame)",
            _rate(lambda i: frames.append(encode(envelopes[i], key)), count),
        ),
    ]
    verifier = Verifier(roster, COMMUNITY, SESSION)
    rows.append(
        ("verify + decode (frame -> envelope)", _rate(lambda i: verifier.verify(frames[i]), count))
    )
    return len(frame), rows


async def signed_round_trip_ms(url: str, count: int) -> tuple[list[float], dict[str, int]]:
    """Round trips [ms] of ``count`` signed exchanges on the market channels, and drops."""
    keys = {pid: Ed25519PrivateKey.generate() for pid in ("a", "b")}
    roster = Roster({pid: key.public_key() for pid, key in keys.items()})

    def peer(pid: str) -> PeerConnection:
        return PeerConnection(pid, keys[pid], roster, community=COMMUNITY, session=SESSION, url=url)

    async with peer("a") as a, peer("b") as b:
        await a.subscribe("market", ["b"])
        await b.subscribe("market", ["a"])
        total = WARMUP + count

        async def answer() -> None:
            for _ in range(total):
                request = await b.receive(TIMEOUT)
                await b.publish("market", "admm.round", round_body(int(request.envelope.body["k"])))

        responder = asyncio.create_task(answer())
        round_trips: list[float] = []
        for k in range(1, total + 1):
            start = time.perf_counter()
            await a.publish("market", "admm.round", round_body(k))
            reply = await a.receive(TIMEOUT)
            round_trips.append((time.perf_counter() - start) * 1000.0)
            assert reply.envelope.sender == "b" and reply.envelope.body["k"] == k
        await responder
        drops = dict(a.drops + b.drops)
    return round_trips[WARMUP:], drops


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[94]


async def main_async(count: int, kinds: list[str], crypto_count: int) -> None:
    print(
        f"wattmesh wire benchmark: Python {platform.python_version()}, "
        f"cryptography {version('cryptography')}, msgpack {version('msgpack')}, "
        f"paho-mqtt {version('paho-mqtt')}, aiomqtt {version('aiomqtt')}"
    )
    size, rows = crypto_rates(crypto_count)
    print(
        f"\nadmm.round body, 6 neighbours: frame of {size} bytes;"
        f" {crypto_count} ops per row, 1 core"
    )
    print(f"{'operation':<38} {'msgs/s':>9} {'µs/msg':>8}")
    for name, rate in rows:
        print(f"{name:<38} {rate:>9,.0f} {1e6 / rate:>8.1f}")
    per_op = {name: 1000.0 / rate for name, rate in rows}  # [ms]
    # each signed round trip: A encodes, B verifies, B encodes, A verifies
    crypto_ms = 2 * (
        per_op["encode (envelope -> frame)"] + per_op["verify + decode (frame -> envelope)"]
    )

    print(f"\nround trip [ms], {count} exchanges after {WARMUP} warm-up, QoS 1, TCP_NODELAY on")
    header = (
        f"{'broker':<10} {'raw med':>8} {'raw p95':>8} {'signed med':>11} {'signed p95':>11}"
        f" {'ratio med':>10} {'ratio p95':>10} {'crypto':>7}"
    )
    print(header)
    for kind in kinds:
        async with start_broker(kind) as broker:
            raw = await asyncio.to_thread(raw_round_trip_ms, broker.url, count, 1)
            signed, drops = await signed_round_trip_ms(broker.url, count)
        assert not drops, f"frames dropped in the signed exchange: {drops}"
        raw_median, signed_median = statistics.median(raw), statistics.median(signed)
        print(
            f"{broker.kind:<10} {raw_median:>8.3f} {_p95(raw):>8.3f} {signed_median:>11.3f}"
            f" {_p95(signed):>11.3f} {signed_median / raw_median:>9.2f}x"
            f" {_p95(signed) / _p95(raw):>9.2f}x {crypto_ms:>7.3f}"
        )
    print(
        "\ncrypto: 2 encodes + 2 verify+decodes per round trip at the rates above [ms]"
        "\ngoal: signed round trip <= 3x raw (ratio of medians)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count", type=int, default=1000, help="round trips per broker (default 1000)"
    )
    parser.add_argument(
        "--crypto-count", type=int, default=5000, help="operations per crypto row (default 5000)"
    )
    parser.add_argument(
        "--kind",
        action="append",
        choices=["embedded", "mosquitto"],
        help="broker kind, repeatable (default: both)",
    )
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(
        main_async(options.count, options.kind or ["embedded", "mosquitto"], options.crypto_count)
    )


if __name__ == "__main__":
    main()
