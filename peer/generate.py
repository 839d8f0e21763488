"""Generate realistic communities from data shipped inside PyPI packages.

Theory of operation
-------------------
One scenario is one market hour [H:00, H+1:00) of one date, in the local standard time
of a weather station. Every home i gets, from a seeded stream of draws:

* an annual consumption E_i [kWh/year] and a PV array (none, or P_i kWp at tilt β_i and
  azimuth γ_i), a battery and/or an electric vehicle (EV);
* its load in the hour, from the BDEW 2025 household standard load profile H25
  (demandlib), normalised to 1 kWh/year over the calendar year of the date:

      L_i = E_i · Σ_{q=1..4} h25(t_q) · 0.25 h / ∫_year h25 dt          [kWh]

  (h25 in kW per 1 GWh/year, t_q the four quarter hours of the hour);
* its PV energy in the hour from a typical-year (TMY) weather file shipped with pvlib:
  solar position at mid-hour (NREL SPA), Hay-Davies transposition to the plane of
  array, physical incidence-angle modifier on the beam, SAPM cell temperature
  (close-mount glass/glass, i.e. rooftop), PVWatts DC with the PVWatts default system
  losses, PVWatts inverter (DC/AC ratio 1.2, 96 %):

      G_eff = G_beam · IAM(θ) + G_diffuse,   P_dc = (1 − losses) · P · G_eff/1000 ·
      (1 + γ_pdc (T_cell − 25 °C)),   PV_i = P_ac(P_dc) · 1 h            [kWh]

  (Dobos 2014, "PVWatts Version 5 Manual", NREL/TP-6A20-62641; Hay & Davies 1980;
  King et al. 2004, SAND2004-3535 for the cell temperature);
* household-form market parameters: demand d_i = L_i − PV_i, flex_i = s_i · L_i plus
  what a battery or EV can shift in the hour, flex_cost a_i log-uniform.

Why H25 for every home, not P25/S25: demandlib's P25 and S25 are the BDEW profiles of
the *grid purchase* of households with PV (and a battery) — their midday values are
already net of self-consumed PV and never negative. Subtracting pvlib's PV from them
would count the PV twice. H25 is gross household consumption, to which the PV
computed here is applied explicitly.

Randomness: :class:`random.Random` seeded with a string, using only ``random()``
(whose stream Python guarantees across versions), one independent stream for the homes
and one for the topology. Each home takes the same number of draws whatever it turns
out to be, so home k is the same home for every ``homes >= k`` and for every date,
hour and location: the same seed at 13:00 and at 20:00 is the same street.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattmesh.protocols.errors import WattmeshError
from wattmesh.protocols.identity import PEER_ID_PATTERN
from wattmesh.protocols.scenario import parse_scenario

__all__ = [
    "LOCATIONS",
    "MissingDemoDependency",
    "generate_community",
    "run_generate_command",
]

_log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'wattmesh[demo]'"


class MissingDemoDependency(WattmeshError, ImportError):
    """pvlib or demandlib (the ``demo`` extra) is not installed."""

    def __init__(self, module: str) -> None:
        super().__init__(
            f"scenario generation needs {module}, which is not installed: {_INSTALL_HINT}"
        )
        self.module = module


@dataclass(frozen=True, slots=True)
class _Location:
    file: str  # inside pvlib's data directory
    kind: str  # "tmy3" | "tmy2"


_LOCATIONS = {
    "greensboro": _Location("723170TYA.CSV", "tmy3"),  # Greensboro NC, TMY3
    "miami": _Location("12839.tm2", "tmy2"),  # Miami FL, TMY2
    "sand-point": _Location("703165TY.csv", "tmy3"),  # Sand Point AK, TMY3
}
LOCATIONS: tuple[str, ...] = tuple(_LOCATIONS)
"""Names of the typical-year weather files shipped in ``pvlib/data``."""

# --- draws (see docs/generate.md) -------------------------------------------------------
_ANNUAL_KWH = (2500.0, 6000.0)  # uniform [kWh/year]
_PV_SHARE = 0.65  # probability a home has PV
_PV_KWP = (3.0, 10.0)  # uniform [kWp]
_TILT_DEG = (25.0, 15.0)  # triangular: centre ± half-width [deg]
_AZIMUTH_DEG = (180.0, 45.0)  # triangular around south [deg, clockwise from north]
_BATTERY_SHARE_OF_PV = 0.35  # batteries only with PV
_BATTERY_FLEX_KWH = (1.5, 4.0)  # uniform: energy it can shift in the hour [kWh]
_EV_SHARE = 0.20
_EV_FLEX_KWH = (1.0, 3.7)  # uniform: charging it can shift in the hour [kWh]
_FLEX_SHARE = (0.10, 0.40)  # uniform: share of the load that can move [-]
_FLEX_COST = (0.05, 0.5)  # log-uniform [currency/kWh²]
_FLEX_COST_STORAGE = (0.05, 0.2)  # log-uniform, homes with a battery or an EV
_DRAWS_PER_HOME = 13

# --- PV system constants (PVWatts defaults) ----------------------------------------------
_GAMMA_PDC = -0.0037  # [1/K], PVWatts version 8 "standard" module
_DC_AC_RATIO = 1.2
_ETA_INVERTER = 0.96
_ALBEDO = 0.2  # the TMY3 albedo column is 0 (missing) at Greensboro; one value for all
_TEMPERATURE_MODEL = "close_mount_glass_glass"  # rooftop


@dataclass(frozen=True, slots=True)
class _Weather:
    """One hour of a typical-year file: irradiance [W/m²], air temperature [°C], wind [m/s]."""

    ghi: float
    dni: float
    dhi: float
    temp_air: float
    wind_speed: float
    row: str  # the file's own timestamp of the row, for the header


@dataclass(frozen=True, slots=True)
class _Station:
    name: str
    latitude: float
    longitude: float
    altitude: float
    utc_offset_h: float
    hours: dict[tuple[int, int, int], _Weather]  # (month, day, hour starting) -> weather


@dataclass(frozen=True, slots=True)
class _Home:
    peer_id: str
    annual_kwh: float
    pv_kwp: float  # 0 = no PV
    tilt_deg: float
    azimuth_deg: float
    battery: bool
    ev: bool
    battery_flex_kwh: float  # either way [kWh]
    ev_flex_kwh: float  # extra charging only [kWh]
    flex_share: float
    flex_cost: float


# ----------------------------------------------------------------------------------------
# public API


def generate_community(
    homes: int,
    seed: int,
    date: str | dt.date,
    hour: int,
    location: str = "greensboro",
    topology: str = "full",
    grid: tuple[float, float] = (0.30, 0.08),
    fee: float = 0.0,
    name: str = "community",
) -> str:
    """Generate a scenario file for one hour of a street of prosumers.

    Args:
        homes: number of homes (peers ``h001``…), >= 1.
        seed: seed of every random draw; same arguments give byte-identical text.
        date: the day, ``YYYY-MM-DD`` or a :class:`datetime.date`.
        hour: the market hour [hour, hour+1) in local standard time, 0–23.
        location: one of :data:`LOCATIONS` (a TMY weather file inside pvlib).
        topology: ``full`` (no ``neighbors``), ``ring:K`` (K nearest on each side) or
            ``random:K`` (ring:1 plus random links, average degree about K).
        grid: (buy_price, sell_price) [currency/kWh], buy >= sell.
        fee: ``market.fee`` [currency/kWh], >= 0.
        name: ``community.name``, ``[a-z0-9-]{1,64}``.

    Returns:
        The TOML text; it passes :func:`~wattmesh.protocols.scenario.parse_scenario`.

    Raises:
        ValueError: a bad argument (one line saying which and why).
        MissingDemoDependency: pvlib or demandlib is not installed.
    """
    started = time.perf_counter()
    day = _check_date(date)
    homes, seed, hour = _check_int("homes", homes, 1), _check_int("seed", seed), _check_hour(hour)
    if location not in _LOCATIONS:
        raise ValueError(f"unknown location {location!r} (choose: {', '.join(LOCATIONS)})")
    topology, links = _parse_topology(topology)  # validate before the slow part
    if not isinstance(grid, tuple | list) or len(grid) != 2:
        raise ValueError(f"grid must be (buy_price, sell_price), got {grid!r}")
    buy, sell = _check_number("grid buy price", grid[0]), _check_number("grid sell price", grid[1])
    if sell > buy:
        raise ValueError(f"grid sell price {sell} exceeds buy price {buy} (free money)")
    fee = _check_number("fee", fee)
    if fee < 0:
        raise ValueError(f"fee must be >= 0, got {fee}")
    if not isinstance(name, str) or not PEER_ID_PATTERN.match(name):
        raise ValueError(f"community name {name!r} must match [a-z0-9-]{{1,64}}")
    pvlib, demandlib = _import_demo_dependencies()

    station = _station(location)
    weather = station.hours.get(_tmy_key(day, hour))
    if weather is None:  # pragma: no cover - every TMY file has 8760 hours
        raise ValueError(f"{_LOCATIONS[location].file} has no row for {day} {hour}:00")
    population = _draw_homes(homes, seed)
    load_per_annual_kwh = _h25_hourly(day.year)[_hour_of_year(day, hour)]
    loads = [home.annual_kwh * load_per_annual_kwh for home in population]
    pv = _pv_energy_kwh(location, weather, day, hour, population)
    neighbors = links(homes, random.Random(f"wattmesh-topology-{seed}"))

    command = _command_line(homes, seed, day, hour, location, topology, buy, sell, fee, name)
    text = _render(
        name=name, command=command, seed=seed, day=day, hour=hour, location=location,
        station=station, weather=weather, population=population, loads=loads, pv=pv,
        neighbors=neighbors, buy=buy, sell=sell, fee=fee,
        versions=(pvlib.__version__, demandlib.__version__),
    )  # fmt: skip
    parse_scenario(text, source="generated scenario")  # a bug here must not reach a file
    _log.debug("generated %d homes in %.3f s", homes, time.perf_counter() - started)
    return text


def run_generate_command(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    """Handler of ``wattmesh scenario generate``: write the file, report one line."""
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory, not a file")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist")
    name = args.name
    if name is None:  # the file's stem when it is a valid id, so `run` names results after it
        name = out.stem if PEER_ID_PATTERN.match(out.stem) else "community"
    grid = (args.grid_buy, args.grid_sell)
    text = generate_community(
        args.homes, args.seed, args.date, args.hour, location=args.location,
        topology=args.topology, grid=grid, fee=args.fee, name=name,
    )  # fmt: skip
    out.write_text(text, encoding="utf-8")
    say(f"wrote {out}: {_summary_line(text)}")
    return 0


# ----------------------------------------------------------------------------------------
# argument checks


def _check_date(date: str | dt.date) -> dt.date:
    if isinstance(date, dt.datetime):
        return date.date()
    if isinstance(date, dt.date):
        return date
    try:
        return dt.date.fromisoformat(str(date).strip())
    except ValueError:
        raise ValueError(f"bad date {date!r}: expected a real day as YYYY-MM-DD") from None


def _check_int(what: str, value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


def _check_hour(hour: object) -> int:
    hour = _check_int("hour", hour)
    if not 0 <= hour <= 23:
        raise ValueError(f"hour must be 0-23 (the hour [H:00, H+1:00) of the day), got {hour}")
    return hour


def _check_number(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


_Topology = Callable[[int, random.Random], list[list[int]] | None]


def _parse_topology(spec: str) -> tuple[str, _Topology]:
    """``full`` | ``ring:K`` | ``random:K`` → (canonical spec, builder of adjacency lists)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "full" and not arg:
        return "full", lambda n, rng: None
    if kind in ("ring", "random") and arg.isascii() and arg.isdigit():
        k = int(arg)
        if kind == "ring" and k >= 1:
            return f"ring:{k}", lambda n, rng: _sorted(_ring(n, k))
        if kind == "random" and k >= 2:
            return f"random:{k}", lambda n, rng: _sorted(_random_links(n, k, rng))
        if kind == "random":
            raise ValueError(
                f"bad topology {spec!r}: random:K needs K >= 2 (its ring has degree 2)"
            )
    raise ValueError(
        f"bad topology {spec!r}: expected full, ring:K or random:K (K an integer >= 1)"
    )


def _ring(n: int, k: int) -> list[set[int]]:
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for i in range(n):
        for step in range(1, k + 1):
            j = (i + step) % n
            if j != i:
                adjacency[i].add(j)
                adjacency[j].add(i)
    return adjacency


def _random_links(n: int, k: int, rng: random.Random) -> list[set[int]]:
    """ring:1 (so connected) plus uniformly drawn extra links up to k·n/2 links in all."""
    adjacency = _ring(n, 1)
    have = sum(len(a) for a in adjacency) // 2
    target = min(round(k * n / 2), n * (n - 1) // 2)
    if target - have > (n * (n - 1) // 2 - have) // 2:  # dense: shuffle the free pairs
        free = [(i, j) for i in range(n) for j in range(i + 1, n) if j not in adjacency[i]]
        for pos in range(len(free) - 1, 0, -1):  # Fisher-Yates on random() only
            swap = int(rng.random() * (pos + 1))
            free[pos], free[swap] = free[swap], free[pos]
        chosen = free[: target - have]
    else:  # sparse: rejection sampling
        chosen = []
        while have + len(chosen) < target:
            i, j = int(rng.random() * n), int(rng.random() * n)
            if i != j and j not in adjacency[i]:
                adjacency[i].add(j)
                adjacency[j].add(i)
                chosen.append((i, j))
        return adjacency
    for i, j in chosen:
        adjacency[i].add(j)
        adjacency[j].add(i)
    return adjacency


def _sorted(adjacency: list[set[int]]) -> list[list[int]]:
    return [sorted(a) for a in adjacency]


# ----------------------------------------------------------------------------------------
# data: weather, sun, load profile (cached per process)


def _import_demo_dependencies() -> tuple[Any, Any]:
    try:
        import pvlib
    except ImportError:
        raise MissingDemoDependency("pvlib") from None
    try:
        import demandlib.bdew
    except ImportError:
        raise MissingDemoDependency("demandlib") from None
    return pvlib, demandlib


def _tmy_key(day: dt.date, hour: int) -> tuple[int, int, int]:
    """Typical years have no 29 February: that day takes 28 February's weather."""
    if (day.month, day.day) == (2, 29):
        return (2, 28, hour)
    return (day.month, day.day, hour)


@functools.cache
def _station(location: str) -> _Station:
    """Parse a TMY file once into {(month, day, hour starting): weather}.

    The two formats label hours differently in pvlib: ``read_tmy3`` keeps the files'
    hour-ending stamps (01:00 … 24:00 → 00:00 of the next day), ``read_tmy2`` subtracts
    one hour (00:00 … 23:00). Both rows describe the hour that *starts* at the key.
    """
    import pvlib

    spec = _LOCATIONS[location]
    path = os.path.join(pvlib.__path__[0], "data", spec.file)
    hours: dict[tuple[int, int, int], _Weather] = {}
    if spec.kind == "tmy3":
        data, meta = pvlib.iotools.read_tmy3(path, coerce_year=1990, map_variables=True)
        name = str(meta["Name"]).strip('"') + f", {meta['State']}"
        offset = float(meta["TZ"])
        for stamp, ghi, dni, dhi, temp, wind in zip(
            data.index, data["ghi"], data["dni"], data["dhi"], data["temp_air"],
            data["wind_speed"], strict=True,
        ):  # fmt: skip
            start = stamp - dt.timedelta(hours=1)
            label = f"{start.month:02d}-{start.day:02d} {start.hour + 1:02d}:00"  # as in the file
            hours[(start.month, start.day, start.hour)] = _Weather(
                float(ghi), float(dni), float(dhi), float(temp), float(wind), label
            )
    else:  # TMY2: temperatures in 0.1 °C and wind in 0.1 m/s, column names not mapped
        data, meta = pvlib.iotools.read_tmy2(path)
        name = f"{meta['City']}, {meta['State']}"
        offset = float(meta["TZ"])
        for stamp, ghi, dni, dhi, temp, wind in zip(
            data.index, data["GHI"], data["DNI"], data["DHI"], data["DryBulb"], data["Wspd"],
            strict=True,
        ):  # fmt: skip
            label = f"{stamp.month:02d}-{stamp.day:02d} {stamp.hour + 1:02d}:00"
            hours[(stamp.month, stamp.day, stamp.hour)] = _Weather(
                float(ghi), float(dni), float(dhi), float(temp) / 10, float(wind) / 10, label
            )
    return _Station(
        name=name, latitude=float(meta["latitude"]), longitude=float(meta["longitude"]),
        altitude=float(meta["altitude"]), utc_offset_h=offset, hours=hours,
    )  # fmt: skip


def _hour_of_year(day: dt.date, hour: int) -> int:
    return (day.timetuple().tm_yday - 1) * 24 + hour


@functools.cache
def _h25_hourly(year: int) -> tuple[float, ...]:
    """H25 energy per hour of ``year`` for 1 kWh/year [kWh]: Σ of 4 quarter hours, normalised.

    demandlib scales the profile to kW for 1 GWh/year, but its day-of-year
    "dynamisation" factor makes the year's integral differ slightly (≈ 0.995 GWh in
    2026), so the drawn annual consumption is honoured exactly by normalising here.
    No holidays are set (a Sunday is the only "FT" day type).
    """
    import pandas as pd
    from demandlib import bdew

    index = pd.date_range(f"{year}-01-01", f"{year + 1}-01-01", freq="15min", inclusive="left")
    kw = bdew.H25(index).to_numpy(dtype=float)
    quarter_kwh = kw * 0.25
    total = float(quarter_kwh.sum())
    hourly = quarter_kwh.reshape(-1, 4).sum(axis=1) / total
    return tuple(float(x) for x in hourly)


@functools.cache
def _sun(location: str, day: dt.date, hour: int) -> tuple[float, float, float]:
    """(apparent zenith, azimuth [deg], extraterrestrial DNI [W/m²]) at mid-hour."""
    import pandas as pd
    from pvlib import irradiance, solarposition

    station = _station(location)
    tz = dt.timezone(dt.timedelta(hours=station.utc_offset_h))
    mid = dt.datetime(day.year, day.month, day.day, hour, 30, tzinfo=tz)
    times = pd.DatetimeIndex([pd.Timestamp(mid)])
    position = solarposition.get_solarposition(
        times, station.latitude, station.longitude, altitude=station.altitude
    )
    dni_extra = irradiance.get_extra_radiation(day.timetuple().tm_yday)  # [W/m²], by day of year
    return (
        float(position["apparent_zenith"].iloc[0]),
        float(position["azimuth"].iloc[0]),
        float(dni_extra),
    )


def _pv_energy_kwh(
    location: str, weather: _Weather, day: dt.date, hour: int, population: Sequence[_Home]
) -> list[float]:
    """PV energy of each home in the hour [kWh], vectorised over the homes with PV."""
    import numpy as np
    from pvlib import iam, inverter, irradiance, pvsystem, temperature

    energy = [0.0] * len(population)
    with_pv = [i for i, home in enumerate(population) if home.pv_kwp > 0]
    if not with_pv or weather.ghi <= 0:
        return energy
    zenith, azimuth, dni_extra = _sun(location, day, hour)
    tilt = np.array([population[i].tilt_deg for i in with_pv])
    surface_azimuth = np.array([population[i].azimuth_deg for i in with_pv])
    kwp = np.array([population[i].pv_kwp for i in with_pv])

    poa = irradiance.get_total_irradiance(
        tilt, surface_azimuth, zenith, azimuth, weather.dni, weather.ghi, weather.dhi,
        dni_extra=dni_extra, albedo=_ALBEDO, model="haydavies",
    )  # fmt: skip
    aoi = irradiance.aoi(tilt, surface_azimuth, zenith, azimuth)
    effective = poa["poa_direct"] * iam.physical(aoi) + poa["poa_diffuse"]
    params = temperature.TEMPERATURE_MODEL_PARAMETERS["sapm"][_TEMPERATURE_MODEL]
    cell = temperature.sapm_cell(poa["poa_global"], weather.temp_air, weather.wind_speed, **params)
    losses = pvsystem.pvwatts_losses() / 100
    dc_w = (1 - losses) * pvsystem.pvwatts_dc(effective, cell, kwp * 1000, _GAMMA_PDC)
    # pvlib's inverter pdc0 is the DC input limit; its AC rating is eta_inv_nom · pdc0.
    inverter_pdc0 = kwp * 1000 / _DC_AC_RATIO / _ETA_INVERTER
    ac_w = np.clip(inverter.pvwatts(dc_w, inverter_pdc0, eta_inv_nom=_ETA_INVERTER), 0, None)
    for i, watts in zip(with_pv, ac_w, strict=True):
        energy[i] = float(watts) / 1000  # constant power over 1 h
    return energy


# ----------------------------------------------------------------------------------------
# draws


def _draw_homes(n: int, seed: int) -> list[_Home]:
    rng = random.Random(f"wattmesh-homes-{seed}")
    width = max(3, len(str(n)))
    population = []
    for index in range(n):
        u = [rng.random() for _ in range(_DRAWS_PER_HOME)]
        has_pv = u[1] < _PV_SHARE
        battery = has_pv and u[7] < _BATTERY_SHARE_OF_PV
        ev = u[9] < _EV_SHARE
        cost_range = _FLEX_COST_STORAGE if (battery or ev) else _FLEX_COST
        population.append(
            _Home(
                peer_id=f"h{index + 1:0{width}d}",
                annual_kwh=_uniform(_ANNUAL_KWH, u[0]),
                pv_kwp=_uniform(_PV_KWP, u[2]) if has_pv else 0.0,
                tilt_deg=_triangular(_TILT_DEG, u[3], u[4]),
                azimuth_deg=_triangular(_AZIMUTH_DEG, u[5], u[6]),
                battery=battery,
                ev=ev,
                battery_flex_kwh=_uniform(_BATTERY_FLEX_KWH, u[8]) if battery else 0.0,
                ev_flex_kwh=_uniform(_EV_FLEX_KWH, u[10]) if ev else 0.0,
                flex_share=_uniform(_FLEX_SHARE, u[11]),
                flex_cost=_log_uniform(cost_range, u[12]),
            )
        )
    return population


def _uniform(bounds: tuple[float, float], u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * u


def _triangular(centre_half_width: tuple[float, float], u1: float, u2: float) -> float:
    centre, half_width = centre_half_width
    return centre + half_width * (u1 - u2)


def _log_uniform(bounds: tuple[float, float], u: float) -> float:
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(low + (high - low) * u)


# ----------------------------------------------------------------------------------------
# output


def _kwh(value: float) -> str:
    """Three decimals (Wh); never "-0.000"."""
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


def _command_line(
    homes: int, seed: int, day: dt.date, hour: int, location: str, topology: str,
    buy: float, sell: float, fee: float, name: str,
) -> str:  # fmt: skip
    return (
        f"wattmesh scenario generate --homes {homes} --seed {seed} --date {day.isoformat()} "
        f"--hour {hour} --location {location} --topology {topology} --grid-buy {buy!r} "
        f"--grid-sell {sell!r} --fee {fee!r} --name {name} --out FILE.toml"
    )


def _render(
    *, name: str, command: str, seed: int, day: dt.date, hour: int, location: str,
    station: _Station, weather: _Weather, population: Sequence[_Home], loads: Sequence[float],
    pv: Sequence[float], neighbors: list[list[int]] | None, buy: float, sell: float,
    fee: float, versions: tuple[str, str],
) -> str:  # fmt: skip
    demand = [round(load - solar, 3) for load, solar in zip(loads, pv, strict=True)]
    with_pv = [h for h in population if h.pv_kwp > 0]
    sign = "+" if station.utc_offset_h >= 0 else "-"
    utc = f"UTC{sign}{abs(station.utc_offset_h):g}"
    spec = _LOCATIONS[location]
    lines = [
        "# Generated by `wattmesh scenario generate`; regenerate rather than edit.",
        f"# {command}",
        f"# Hour: {day.isoformat()} ({day.strftime('%A')}) {hour:02d}:00-{hour + 1:02d}:00 "
        f"local standard time ({utc}). Seed {seed}.",
        f"# Weather: pvlib {versions[0]} data/{spec.file} ({spec.kind.upper()}, {station.name}, "
        f"lat {station.latitude:g}, lon {station.longitude:g}), row {weather.row} (hour ending):",
        f"#   GHI {weather.ghi:g}, DNI {weather.dni:g}, DHI {weather.dhi:g} W/m2, "
        f"{weather.temp_air:g} degC, wind {weather.wind_speed:g} m/s.",
        "# PV: pvlib NREL SPA sun at mid-hour, Hay-Davies POA, physical IAM, SAPM cell temp "
        "(close mount),",
        f"#   PVWatts DC (gamma {_GAMMA_PDC * 100:g} %/K, "
        f"losses {_pvwatts_losses_percent():.1f} %), "
        f"PVWatts inverter (DC/AC {_DC_AC_RATIO:g}, {_ETA_INVERTER:.0%}).",
        f"# Load: demandlib {versions[1]} BDEW H25 household profile (4 quarter hours), "
        "scaled to each home's kWh/year.",
        f"# {len(population)} homes: {len(with_pv)} with PV "
        f"({sum(h.pv_kwp for h in with_pv):.1f} kWp), "
        f"{sum(h.battery for h in population)} batteries, {sum(h.ev for h in population)} EVs. "
        f"In the hour: load {sum(loads):.2f} kWh, PV {sum(pv):.2f} kWh, "
        f"net demand {sum(loads) - sum(pv):.2f} kWh, {sum(d < 0 for d in demand)} net producers.",
        "",
        "[community]",
        f'name = "{name}"',
        "",
        "[market]",
        'mechanism = "admm"',
        f"fee = {fee!r}",
        "",
        "[grid]",
        f"buy_price = {buy!r}",
        f"sell_price = {sell!r}",
    ]
    for i, home in enumerate(population):
        symmetric = home.flex_share * loads[i] + home.battery_flex_kwh
        parts = [f"{home.annual_kwh:.0f} kWh/year, load {_kwh(loads[i])}"]
        if home.pv_kwp > 0:
            parts.append(
                f"PV {home.pv_kwp:.1f} kWp tilt {home.tilt_deg:.0f} az {home.azimuth_deg:.0f} "
                f"-> {_kwh(pv[i])}"
            )
        parts += [label for label, has in (("battery", home.battery), ("EV", home.ev)) if has]
        lines += ["", f"# {', '.join(parts)}", "[[peers]]", f'id = "{home.peer_id}"']
        lines.append(f"demand = {_kwh(demand[i])}")
        if home.ev_flex_kwh > 0:  # an EV can charge more than planned, not feed back
            lines.append(f"min = {_kwh(demand[i] - symmetric)}")
            lines.append(f"max = {_kwh(demand[i] + symmetric + home.ev_flex_kwh)}")
        else:
            lines.append(f"flex = {_kwh(symmetric)}")
        lines.append(f"flex_cost = {home.flex_cost:.3f}")
        if neighbors is not None:
            ids = ", ".join(f'"{population[j].peer_id}"' for j in neighbors[i])
            lines.append(f"neighbors = [{ids}]")
    return "\n".join(lines) + "\n"


def _pvwatts_losses_percent() -> float:
    from pvlib import pvsystem

    return float(pvsystem.pvwatts_losses())


def _summary_line(text: str) -> str:
    """The header's totals line, for the CLI's one-line report."""
    for line in text.splitlines():
        if line.startswith("# ") and " homes: " in line:
            return line[2:]
    return "done"  # pragma: no cover
