"""Home gateways: ``wattmesh peer`` processes trading three consecutive intervals.

Three homes, each its own ``wattmesh peer`` process over Mosquitto, each reading its
demand differently: a fixed value, a CSV profile, an MQTT topic (a retained JSON
reading, as a home energy manager would publish it). The CSV home is SIGKILLed right
after its first interval and restarted; it must join the next interval with nobody
in charge, and every interval's contracts must verify and match in both parties'
ledgers. Intervals are 12 s so the test takes about a minute.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from wattmesh.broker import BrokerHandle
from wattmesh.peer.connection import parse_url
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.peer.ledger import Ledger, audit

INTERVAL_S = 12
PROCESS_TIMEOUT_S = 150.0


def _config(home: str, url: str, demand: str) -> str:
    return f"""
[peer]
id = "{home}"
key = "{home}.key"
roster = "roster.toml"
state_dir = "state-{home}"
[broker]
url = "{url}"
[community]
name = "street"
interval_s = {INTERVAL_S}
join_window_s = 3
view_window_s = 2
[market]
mechanism = "admm"
[grid]
buy_price = 0.30
sell_price = 0.08
[home]
flex = 0.5
flex_cost = 0.1
[home.demand]
{demand}
"""


async def _start(config: Path, intervals: int, not_before: float = 0.0) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wattmesh.peer.cli", "peer", str(config), "--intervals", str(intervals),
        "--not-before", str(not_before),
        cwd=config.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def _read_until(process: asyncio.subprocess.Process, needle: str, seen: list[str]) -> None:
    """Collect the process's log lines until one contains ``needle``."""
    assert process.stdout is not None
    while True:
        line = (await process.stdout.readline()).decode()
        if not line:
            raise AssertionError(f"process ended before logging {needle!r}:\n" + "".join(seen))
        seen.append(line)
        if needle in line:
            return


@pytest.mark.mosquitto
async def test_three_homes_trade_three_intervals_and_a_killed_one_rejoins(
    mosquitto_broker: BrokerHandle, tmp_path: Path
) -> None:
    # GIVEN three homes: a PV home with a fixed value, one with a CSV profile, one fed over MQTT
    keys = {h: generate_key(tmp_path / f"{h}.key") for h in ("pv", "csv", "meter")}
    roster = write_roster(tmp_path / "roster.toml", keys)
    rows = ["start,kwh"] + [f"{h:02d}:{m:02d},{1.0 + 0.01 * m}" for h in range(24) for m in range(0, 60, 1)]
    (tmp_path / "profile.csv").write_text("\n".join(rows) + "\n")
    url = mosquitto_broker.url
    demands = {
        "pv": "value = -2.5",
        "csv": 'csv = "profile.csv"',
        "meter": 'mqtt = "home/meter/forecast"\nfield = "kwh"',
    }
    configs = {h: tmp_path / f"{h}.toml" for h in demands}
    for home, path in configs.items():
        path.write_text(_config(home, url, demands[home]))
    host, port = parse_url(url)
    async with aiomqtt.Client(host, port) as client:  # the home energy manager's reading
        await client.publish("home/meter/forecast", json.dumps({"kwh": 1.2}), qos=1, retain=True)
    # All three must start with the same interval, whatever their start-up times: the
    # first boundary at least 5 s away (the installer's --not-before for a roll-out)
    first = (int(time.time() + 5.0) // INTERVAL_S + 1) * INTERVAL_S
    processes = {h: await _start(p, 3, first) for h, p in configs.items()}
    logs: dict[str, list[str]] = {h: [] for h in configs}

    # WHEN the CSV home is killed right after its first interval and restarted
    await asyncio.wait_for(_read_until(processes["csv"], ": traded,", logs["csv"]), PROCESS_TIMEOUT_S)
    processes["csv"].send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(processes["csv"].wait(), 10) == -signal.SIGKILL
    first_log = logs["csv"]
    processes["csv"] = await _start(configs["csv"], 2)
    logs["csv"] = []

    async def finish(home: str) -> int:
        process = processes[home]
        assert process.stdout is not None
        logs[home] += (await process.stdout.read()).decode().splitlines(keepends=True)
        return await process.wait()

    codes = await asyncio.wait_for(asyncio.gather(*(finish(h) for h in configs)), PROCESS_TIMEOUT_S)

    # THEN every process ended well and every home traded in each of its intervals
    text = {h: "".join(lines) for h, lines in logs.items()}
    assert codes == [0, 0, 0], text
    for home in ("pv", "meter"):
        assert text[home].count(": traded,") == 3, text[home]
    assert text["csv"].count(": traded,") == 2, text["csv"]
    # AND the three homes met in three sessions, the restarted one in the last two
    sessions: dict[str, dict[str, dict[str, object]]] = {}
    for home in configs:
        with Ledger(tmp_path / f"state-{home}" / f"{home}.ledger.sqlite") as ledger:
            rows_checked = audit(ledger.records(), roster)
            assert rows_checked and all(r["check"] in ("ok",) for r in rows_checked), rows_checked
            for record in ledger.records():
                sessions.setdefault(record.session, {}).setdefault(home, {})[record.counterparty] = record
    assert len(sessions) == 3, sorted(sessions)
    for by_home in sessions.values():
        assert set(by_home) == set(configs)
        # AND each contract is final in both ledgers, byte for byte
        for home, by_counterparty in by_home.items():
            for other, record in by_counterparty.items():
                mirror = by_home[other][home]
                assert record.status == mirror.status == "final"  # type: ignore[attr-defined]
                assert record.contract == mirror.contract  # type: ignore[attr-defined]
    # AND the CSV home's first interval happened before it was killed
    assert any(": traded," in line for line in first_log)
    # AND sessions are named after the interval start (UTC), INTERVAL_S apart
    starts = sorted(dt.datetime.strptime(s.split("-", 1)[1], "%Y%m%dT%H%M%S") for s in sessions)
    assert [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)] == [INTERVAL_S] * 2
    assert starts[-1].replace(tzinfo=dt.UTC).timestamp() <= time.time()
