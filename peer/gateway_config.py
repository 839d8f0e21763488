"""The home gateway's config file (``wattmesh peer CONFIG``) and this home's inputs.

One TOML file per home (docs/deploy.md has a full example)::

    [peer]       id, key, roster, state_dir
    [broker]     url, username, password_file, ca, cert, key      (credentials/TLS optional)
    [community]  name, interval_s, join_window_s, view_window_s
    [market]     mechanism, fee, [market.<mechanism>]    (as in a scenario file)
    [grid]       buy_price, sell_price                   (as in a scenario file)
    [home]       flex | min/max, flex_cost, role, neighbors
    [home.demand]  exactly one of: value = 2.5
                                   csv = "profile.csv" (+ column, time_column)
                                   mqtt = "home/meter/forecast" (+ field, max_age_s, broker)

The community part must be the same in every home's file: its SHA-256 digest travels
in each join and peers with another digest do not trade together. Paths are relative
to the config file. Every mistake is a :class:`ScenarioError` naming file, key, reason.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattmesh.protocols.errors import ScenarioError
from wattmesh.protocols.identity import PEER_ID_PATTERN
from wattmesh.protocols.membership import MembershipTiming
from wattmesh.protocols.scenario import PeerSpec, Scenario, parse_scenario_data

__all__ = ["DemandSource", "GatewayConfig", "load_gateway_config"]

_TOP = {"peer", "broker", "community", "market", "grid", "fees", "home"}
_HOME = {"flex", "flex_cost", "min", "max", "role", "neighbors", "demand"}


@dataclass(frozen=True, slots=True)
class DemandSource:
    """Where the home's net demand [kWh per interval] comes from."""

    kind: str  # "value" | "csv" | "mqtt"
    value: float | None = None
    path: Path | None = None
    column: str = "kwh"
    time_column: str = "start"
    topic: str | None = None
    field: str | None = None  # JSON field of an MQTT payload; None: the payload is a number
    max_age_s: float = 3600.0
    broker: str | None = None  # the home's own broker for an MQTT source; None: the community broker

    def from_csv(self, start_s: float) -> float:
        """The row for the interval starting at ``start_s``: the last row whose start is
        at or before it. Starts are ISO 8601 timestamps (naive = UTC) or ``HH:MM`` (a
        daily profile).

        Raises:
            ScenarioError: unreadable file or no row for this interval.
        """
        assert self.path is not None
        where = str(self.path)
        try:
            with open(self.path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        except OSError as exc:
            raise ScenarioError(where, "", f"cannot read ({exc.strerror})") from None
        when = dt.datetime.fromtimestamp(start_s, tz=dt.UTC)
        best: tuple[float, float] | None = None
        for index, row in enumerate(rows, start=2):
            try:
                stamp, kwh = row[self.time_column].strip(), float(row[self.column])
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ScenarioError(where, f"line {index}", f"needs columns {self.time_column!r} and a number in {self.column!r}") from None
            if not math.isfinite(kwh):
                raise ScenarioError(where, f"line {index}", "demand must be finite")
            at = _row_time(stamp, when, where, index)
            if at <= start_s and (best is None or at >= best[0]):
                best = (at, kwh)
        if best is None:
            raise ScenarioError(where, "", f"no row at or before {when:%Y-%m-%d %H:%M} UTC")
        return best[1]

    def parse_mqtt(self, payload: bytes) -> float:
        """A number, or a JSON object whose ``field`` is a number.

        Raises:
            ValueError: the payload carries no finite number.
        """
        text = payload.decode("utf-8", errors="replace").strip()
        value: Any = json.loads(text) if self.field else float(text)
        if self.field:
            if not isinstance(value, dict) or self.field not in value:
                raise ValueError(f"payload has no field {self.field!r}")
            value = value[self.field]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("payload is not a finite number")
        return float(value)


def _row_time(stamp: str, when: dt.datetime, where: str, index: int) -> float:
    try:
        if len(stamp) <= 5 and ":" in stamp:
            hours, minutes = (int(x) for x in stamp.split(":"))
            return when.replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()
        parsed = dt.datetime.fromisoformat(stamp)
    except ValueError:
        raise ScenarioError(where, f"line {index}", f"{stamp!r} is neither ISO 8601 nor HH:MM") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A validated gateway config. ``community_terms`` is the public part every home shares."""

    source: str
    peer_id: str
    key_path: Path
    roster_path: Path
    state_dir: Path
    url: str
    username: str | None
    password_file: Path | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    community: str
    interval_s: float
    timing: MembershipTiming
    community_terms: Mapping[str, Any]  # {"community", "market", "grid", "fees"} as in a scenario
    home: Mapping[str, Any]  # [home] without demand
    neighbours: tuple[str, ...] | None
    demand: DemandSource

    def peer_spec(self, demand_kwh: float) -> PeerSpec:
        """This home's private model for one interval, validated like a scenario peer."""
        return self.scenario_data(demand_kwh).peers[self.peer_id]

    def scenario_data(self, demand_kwh: float) -> Scenario:
        """A one-home scenario: validates the community terms with this home's model."""
        peer = {"id": self.peer_id, **self.home, "demand": demand_kwh}
        data = {**self.community_terms, "peers": [peer]}
        data.pop("fees", None)  # pairs are known only once the session's members are
        try:
            return parse_scenario_data(data, source=self.source)
        except ScenarioError as exc:
            key = exc.key.replace("peers[0].", "home.")
            raise ScenarioError(self.source, key, exc.reason) from None


def load_gateway_config(path: Path) -> GatewayConfig:
    """Read and validate a gateway config file.

    Raises:
        ScenarioError: naming the file, the key and why.
    """
    source = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(source, "", f"cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, "", f"not valid TOML ({exc})") from None
    base = path.parent

    def fail(key: str, reason: str) -> ScenarioError:
        return ScenarioError(source, key, reason)

    def table(name: str, keys: set[str], required: bool = True) -> dict[str, Any]:
        value = data.get(name, None if required else {})
        if not isinstance(value, dict):
            raise fail(name, "missing table" if value is None else "must be a table")
        for key in value:
            if key not in keys:
                raise fail(f"{name}.{key}", f"unknown key (allowed: {', '.join(sorted(keys))})")
        return value

    def text(t: Mapping[str, Any], name: str, key: str, default: str | None = None) -> str:
        value = t.get(key, default)
        if not isinstance(value, str) or not value:
            raise fail(f"{name}.{key}", "required" if value is None else "must be a non-empty string")
        return value

    def seconds(t: Mapping[str, Any], name: str, key: str, default: float) -> float:
        value = t.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise fail(f"{name}.{key}", "must be a positive number of seconds")
        return float(value)

    def file(t: Mapping[str, Any], name: str, key: str, *, must_exist: bool = True) -> Path | None:
        if key not in t:
            return None
        p = base / text(t, name, key)
        if must_exist and not p.is_file():
            raise fail(f"{name}.{key}", f"no such file: {p}")
        return p

    for key in data:
        if key not in _TOP:
            raise fail(key, f"unknown table (allowed: {', '.join(sorted(_TOP))})")
    peer = table("peer", {"id", "key", "roster", "state_dir"})
    peer_id = text(peer, "peer", "id")
    if not PEER_ID_PATTERN.match(peer_id):
        raise fail("peer.id", f"{peer_id!r} must match [a-z0-9-]{{1,64}}")
    key_path, roster_path = file(peer, "peer", "key"), file(peer, "peer", "roster")
    if key_path is None or roster_path is None:
        raise fail("peer.key" if key_path is None else "peer.roster", "required")
    state_dir = base / text(peer, "peer", "state_dir", "state")

    broker = table("broker", {"url", "username", "password_file", "ca", "cert", "key"})
    url = text(broker, "broker", "url")
    if not url.startswith(("mqtt://", "mqtts://")):
        raise fail("broker.url", "must look like mqtt://host:port or mqtts://host:port")
    username = broker.get("username")
    if username is not None and not isinstance(username, str):
        raise fail("broker.username", "must be a string")
    tls = [file(broker, "broker", k) for k in ("ca", "cert", "key")]
    if any(tls) and not tls[0]:
        raise fail("broker.ca", "TLS needs the community CA certificate")

    community = table("community", {"name", "interval_s", "join_window_s", "view_window_s"})
    name = text(community, "community", "name")
    interval_s = seconds(community, "community", "interval_s", 900.0)
    defaults = MembershipTiming()
    timing = MembershipTiming(
        seconds(community, "community", "join_window_s", defaults.join_window_s),
        seconds(community, "community", "view_window_s", defaults.view_window_s),
    )
    if timing.join_window_s + timing.view_window_s >= interval_s / 2:
        raise fail("community.interval_s", "must be more than twice join_window_s + view_window_s (time to trade)")

    home = table("home", _HOME)
    demand_table = home.get("demand")
    if not isinstance(demand_table, dict):
        raise fail("home.demand", "required: a table with one of value, csv or mqtt")
    demand = _demand_source(demand_table, fail, base)
    neighbours = home.get("neighbors")
    if neighbours is not None and (not isinstance(neighbours, list) or not all(isinstance(n, str) for n in neighbours)):
        raise fail("home.neighbors", "must be a list of peer ids")
    static_home = {k: v for k, v in home.items() if k not in ("demand", "neighbors")}
    terms = {"community": {"name": name}, "market": data.get("market", {}), **({"grid": data["grid"]} if "grid" in data else {})}
    if "fees" in data:
        raise fail("fees", "per-pair fees are not supported for gateway peers yet; use market.fee")
    config = GatewayConfig(
        source, peer_id, key_path, roster_path, state_dir, url, username, file(broker, "broker", "password_file"),
        tls[0], tls[1], tls[2], name, interval_s, timing, terms, static_home,
        None if neighbours is None else tuple(neighbours), demand,
    )  # fmt: skip
    # the community terms and this home's model must make a valid scenario (any demand)
    config.peer_spec(demand.value if demand.value is not None else 0.0)
    return config


def _demand_source(t: Mapping[str, Any], fail: Any, base: Path) -> DemandSource:
    kinds = [k for k in ("value", "csv", "mqtt") if k in t]
    if len(kinds) != 1:
        raise fail("home.demand", "give exactly one of value, csv or mqtt")
    allowed = {"value": {"value"}, "csv": {"csv", "column", "time_column"}, "mqtt": {"mqtt", "field", "max_age_s", "broker"}}[kinds[0]]
    for key in t:
        if key not in allowed:
            raise fail(f"home.demand.{key}", f"unknown key for a {kinds[0]} source (allowed: {', '.join(sorted(allowed))})")
    if kinds[0] == "value":
        value = t["value"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise fail("home.demand.value", "must be a number [kWh]")
        return DemandSource("value", value=float(value))
    if kinds[0] == "csv":
        path = base / str(t["csv"])
        if not path.is_file():
            raise fail("home.demand.csv", f"no such file: {path}")
        return DemandSource("csv", path=path, column=str(t.get("column", "kwh")), time_column=str(t.get("time_column", "start")))
    topic = t["mqtt"]
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        raise fail("home.demand.mqtt", "must be one MQTT topic (no wildcards)")
    max_age = t.get("max_age_s", 3600.0)
    if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age <= 0:
        raise fail("home.demand.max_age_s", "must be a positive number of seconds")
    field = t.get("field")
    if field is not None and not isinstance(field, str):
        raise fail("home.demand.field", "must be a string")
    broker = t.get("broker")
    if broker is not None and (not isinstance(broker, str) or not broker.startswith("mqtt://")):
        raise fail("home.demand.broker", "must look like mqtt://host:port (the home's own broker)")
    return DemandSource("mqtt", topic=topic, field=field, max_age_s=float(max_age), broker=broker)
