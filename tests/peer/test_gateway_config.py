"""``wattmesh peer CONFIG --check``: a good config passes, every broken one is one clear line.

Also the pieces of a gateway that need no broker: demand from a CSV profile or an MQTT
payload, and the retained home state's figures.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from wattmesh.peer.cli import main
from wattmesh.peer.gateway_config import DemandSource, load_gateway_config
from wattmesh.peer.keys import generate_key, write_roster
from wattmesh.protocols.errors import ScenarioError

GOOD = """
[peer]
id = "h1"
key = "h1.key"
roster = "roster.toml"
[broker]
url = "mqtt://127.0.0.1:1883"
[community]
name = "street"
interval_s = 900
[market]
mechanism = "admm"
[grid]
buy_price = 0.30
sell_price = 0.08
[home]
flex = 0.5
flex_cost = 0.1
[home.demand]
value = 1.5
"""

# (what is broken, edit of GOOD, key the error must name)
BROKEN = [
    ("not TOML", lambda t: t + "\n[[[", ""),
    ("unknown table", lambda t: t + "\n[extra]\nx = 1\n", "extra"),
    ("misspelt table", lambda t: t.replace("[peer]", "[peerz]"), "peerz"),
    ("no peer table", lambda t: "[broker]" + t.split("[broker]")[1], "peer"),
    ("bad peer id", lambda t: t.replace('id = "h1"', 'id = "H 1"'), "peer.id"),
    ("missing key file", lambda t: t.replace('key = "h1.key"', 'key = "nope.key"'), "peer.key"),
    ("missing roster", lambda t: t.replace('roster = "roster.toml"', 'roster = "none.toml"'), "peer.roster"),
    ("unknown peer key", lambda t: t.replace('[peer]\n', '[peer]\ncolour = "red"\n'), "peer.colour"),
    ("bad url", lambda t: t.replace("mqtt://127.0.0.1:1883", "http://x"), "broker.url"),
    ("tls without ca", lambda t: t.replace('[broker]\n', '[broker]\ncert = "h1.key"\n'), "broker.ca"),
    ("interval too short", lambda t: t.replace("interval_s = 900", "interval_s = 10"), "community.interval_s"),
    ("negative interval", lambda t: t.replace("interval_s = 900", "interval_s = -5"), "community.interval_s"),
    ("unknown mechanism", lambda t: t.replace('mechanism = "admm"', 'mechanism = "magic"'), "market.mechanism"),
    ("bad admm setting", lambda t: t + "\n[market.admm]\nrho = -1.0\n", "market.admm"),
    ("sell above buy", lambda t: t.replace("sell_price = 0.08", "sell_price = 0.5"), "grid.sell_price"),
    ("no demand", lambda t: t.replace("[home.demand]\nvalue = 1.5\n", ""), "home.demand"),
    ("two demand sources", lambda t: t.replace("value = 1.5", 'value = 1.5\nmqtt = "a/b"'), "home.demand"),
    ("demand not a number", lambda t: t.replace("value = 1.5", 'value = "lots"'), "home.demand.value"),
    ("csv file missing", lambda t: t.replace("value = 1.5", 'csv = "none.csv"'), "home.demand.csv"),
    ("mqtt wildcard", lambda t: t.replace("value = 1.5", 'mqtt = "home/#"'), "home.demand.mqtt"),
    ("negative flex cost", lambda t: t.replace("flex_cost = 0.1", "flex_cost = -0.1"), "home.flex_cost"),
    ("unknown role", lambda t: t.replace("[home]\n", '[home]\nrole = "king"\n'), "home.role"),
    ("per-pair fees", lambda t: t + '\n[[fees]]\na = "h1"\nb = "h2"\nfee = 0.1\n', "fees"),
]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    keys = {"h1": generate_key(tmp_path / "h1.key"), "h2": generate_key(tmp_path / "h2.key")}
    write_roster(tmp_path / "roster.toml", keys)
    return tmp_path


def test_a_good_config_passes_the_check(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "h1.toml").write_text(GOOD)
    assert main(["peer", str(home / "h1.toml"), "--check"]) == 0
    assert "ok (peer h1, community street, every 900 s)" in capsys.readouterr().out


@pytest.mark.parametrize(("what", "edit", "key"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_config_is_one_line_naming_file_and_key(
    home: Path, capsys: pytest.CaptureFixture[str], what: str, edit: object, key: str
) -> None:
    # GIVEN a config with one mistake
    path = home / "h1.toml"
    path.write_text(edit(GOOD))  # type: ignore[operator]
    # WHEN it is checked
    status = main(["peer", str(path), "--check"])
    err = capsys.readouterr().err
    # THEN one line on stderr names the file and the key, and the exit status is 2
    assert status == 2, what
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"wattmesh: {path}"), err
    assert f": {key}:" in err or (not key and "TOML" in err), err


def test_a_key_that_is_not_the_rosters_is_refused(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN h1's config pointing at h2's key
    (home / "h1.toml").write_text(GOOD.replace('key = "h1.key"', 'key = "h2.key"'))
    # THEN the check refuses it in one line
    assert main(["peer", str(home / "h1.toml"), "--check"]) == 2
    assert "peer.key: this key is not the one the roster lists" in capsys.readouterr().err


def test_csv_profile_picks_the_row_of_the_interval(tmp_path: Path) -> None:
    # GIVEN a daily profile and a dated profile
    (tmp_path / "daily.csv").write_text("start,kwh\n00:00,0.5\n12:00,1.5\n12:15,-2.0\n")
    (tmp_path / "dated.csv").write_text("start,kwh\n2026-06-21T12:00:00,1.0\n2026-06-21T12:15:00+00:00,2.0\n")
    noon = dt.datetime(2026, 6, 21, 12, 7, tzinfo=dt.UTC).timestamp()
    # THEN the last row at or before the interval start is used
    assert DemandSource("csv", path=tmp_path / "daily.csv").from_csv(noon) == 1.5
    assert DemandSource("csv", path=tmp_path / "daily.csv").from_csv(noon + 8 * 60) == -2.0
    assert DemandSource("csv", path=tmp_path / "dated.csv").from_csv(noon + 8 * 60) == 2.0
    # AND an interval before the first row is an error naming the file
    with pytest.raises(ScenarioError, match="no row at or before"):
        DemandSource("csv", path=tmp_path / "dated.csv").from_csv(noon - 3600)


def test_mqtt_payloads_number_or_json_field() -> None:
    assert DemandSource("mqtt", topic="t").parse_mqtt(b" 2.5 ") == 2.5
    assert DemandSource("mqtt", topic="t", field="kwh").parse_mqtt(b'{"kwh": -1}') == -1.0
    for bad, field in ((b"nan", None), (b'{"w": 1}', "kwh"), (b'{"kwh": true}', "kwh"), (b"abc", None)):
        with pytest.raises(ValueError):
            DemandSource("mqtt", topic="t", field=field).parse_mqtt(bad)


def test_loaded_config_resolves_paths_next_to_the_file(home: Path) -> None:
    (home / "h1.toml").write_text(GOOD)
    config = load_gateway_config(home / "h1.toml")
    assert config.key_path == home / "h1.key" and config.state_dir == home / "state"
    assert config.peer_spec(2.0).min_kwh == 1.5 and config.peer_spec(2.0).max_kwh == 2.5
