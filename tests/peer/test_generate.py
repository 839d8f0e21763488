"""`wattmesh scenario generate`: communities from pvlib TMY weather and BDEW H25 loads.

Synchronous, no broker. Needs the ``demo`` extra (CI installs it: these tests fail, never
skip, without pvlib and demandlib). The first call parses a TMY file and a year of H25
(about 2 s); later calls hit the per-process caches.
"""

from __future__ import annotations

import sys
import time
import tomllib
from collections import deque
from pathlib import Path

import pytest

from wattmesh.peer.cli import main
from wattmesh.peer.generate import MissingDemoDependency, generate_community
from wattmesh.protocols.errors import WattmeshError
from wattmesh.protocols.scenario import parse_scenario

JUNE = "2026-06-21"


def _demands(text: str) -> dict[str, float]:
    return {peer["id"]: peer["demand"] for peer in tomllib.loads(text)["peers"]}


def _peers_section(text: str) -> str:
    return text[text.index("[[peers]]") :]


def _connected(links: dict[str, tuple[str, ...]]) -> bool:
    start = next(iter(links))
    seen, todo = {start}, deque([start])
    while todo:
        for other in links[todo.popleft()]:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return len(seen) == len(links)


def test_output_is_a_valid_scenario() -> None:
    # GIVEN 20 homes at noon on midsummer day in Greensboro
    text = generate_community(
        20, seed=1, date=JUNE, hour=13, grid=(0.3, 0.08), fee=0.002, name="street"
    )
    # WHEN the normal loader reads it
    scenario = parse_scenario(text, source="generated")
    # THEN it is a full community of household peers with the tariff and fee asked for
    public = scenario.public
    assert public.name == "street"
    assert public.mechanism == "admm"
    assert public.peer_ids == tuple(f"h{i:03d}" for i in range(1, 21))
    assert (public.grid.buy_price, public.grid.sell_price) == (0.3, 0.08)
    assert all(len(public.links[p]) == 19 for p in public.peer_ids)
    assert public.fee("h001", "h002") == 0.002
    assert all(spec.min_kwh < spec.max_kwh for spec in scenario.peers.values())
    # and the header names its sources and the command that reproduces it
    header = text[: text.index("[community]")]
    for source in ("723170TYA.CSV", "H25", "2026-06-21", "13:00-14:00", "Seed 1"):
        assert source in header
    assert "wattmesh scenario generate --homes 20 --seed 1 --date 2026-06-21 --hour 13" in header
    assert text.isascii()


def test_same_arguments_give_identical_text_and_seeds_differ() -> None:
    args = dict(homes=30, date=JUNE, hour=13, topology="random:4")
    first = generate_community(seed=7, **args)  # type: ignore[arg-type]
    assert generate_community(seed=7, **args) == first  # type: ignore[arg-type]
    other = generate_community(seed=8, **args)  # type: ignore[arg-type]
    assert _peers_section(other) != _peers_section(first)
    assert _demands(other) != _demands(first)


def test_home_k_is_the_same_home_whatever_the_size_of_the_street() -> None:
    small = _demands(generate_community(10, seed=3, date=JUNE, hour=13))
    large = _demands(generate_community(25, seed=3, date=JUNE, hour=13))
    assert {k: large[k] for k in small} == small


def test_pv_makes_net_producers_at_noon_but_hardly_any_in_the_evening() -> None:
    # GIVEN the same 100 homes at noon and at 20:00 on midsummer day
    noon = _demands(generate_community(100, seed=5, date=JUNE, hour=12))
    evening = _demands(generate_community(100, seed=5, date=JUNE, hour=20))
    # THEN at noon a good share produce more than they use, in the evening almost none
    assert sum(d < 0 for d in noon.values()) >= 40
    assert sum(d < 0 for d in evening.values()) <= 3
    assert sum(noon.values()) < 0 < sum(evening.values())


@pytest.mark.parametrize("location", ["greensboro", "miami", "sand-point"])
def test_every_location_has_sun_at_noon(location: str) -> None:
    demands = _demands(generate_community(40, seed=2, date=JUNE, hour=12, location=location))
    assert sum(d < 0 for d in demands.values()) >= 5


def test_midnight_has_no_pv() -> None:
    # Loads depend on the date and hour only, PV on the weather: with no PV at midnight
    # the same street is the same market in all three places.
    texts = [
        generate_community(40, seed=4, date=JUNE, hour=0, location=location)
        for location in ("greensboro", "miami", "sand-point")
    ]
    assert all("PV 0.00 kWh" in text for text in texts)
    demands = [_demands(text) for text in texts]
    assert demands[0] == demands[1] == demands[2]
    assert all(d > 0 for d in demands[0].values())


def test_leap_day_and_date_objects() -> None:
    import datetime as dt

    text = generate_community(5, seed=1, date=dt.date(2028, 2, 29), hour=12)
    assert "2028-02-29 (Tuesday)" in text
    parse_scenario(text)


def test_ring_topology_links_k_nearest_on_each_side() -> None:
    text = generate_community(20, seed=1, date=JUNE, hour=13, topology="ring:2")
    links = parse_scenario(text).public.links
    for i in range(1, 21):
        expected = {f"h{(i - 1 + step) % 20 + 1:03d}" for step in (-2, -1, 1, 2)}
        assert set(links[f"h{i:03d}"]) == expected


@pytest.mark.parametrize(("homes", "k"), [(60, 4), (200, 8), (10, 7), (16, 30)])
def test_random_topology_is_symmetric_connected_with_the_asked_degree(homes: int, k: int) -> None:
    text = generate_community(homes, seed=9, date=JUNE, hour=13, topology=f"random:{k}")
    lists = {peer["id"]: peer["neighbors"] for peer in tomllib.loads(text)["peers"]}
    # the lists themselves are symmetric (not only the consented links)
    assert all(a in lists[b] for a, others in lists.items() for b in others)
    links = parse_scenario(text).public.links
    assert _connected(links)
    degree = sum(len(v) for v in links.values()) / homes
    assert degree == pytest.approx(min(k, homes - 1), abs=2 / homes)


def test_five_hundred_homes_are_quick() -> None:
    generate_community(2, seed=1, date=JUNE, hour=13)  # warm the caches
    started = time.perf_counter()
    text = generate_community(500, seed=1, date="2026-07-02", hour=15, topology="random:8")
    assert time.perf_counter() - started < 10
    assert len(parse_scenario(text).peers) == 500


def test_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "street-1.toml"
    argv = ["scenario", "generate", "--homes", "12", "--seed", "3", "--date", JUNE, "--hour", "13",
            "--topology", "ring:1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = out.read_text()
    assert parse_scenario(text).public.name == "street-1"  # named after the file
    assert text == generate_community(12, 3, JUNE, 13, topology="ring:1", name="street-1")
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"wrote {out}: 12 homes")
    assert main(argv) == 0 and out.read_text() == text  # byte-identical again


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--location", "paris"], "unknown location 'paris'"),
        (["--topology", "ring:x"], "bad topology 'ring:x'"),
        (["--topology", "random:1"], "random:K needs K >= 2"),
        (["--homes", "0"], "homes must be >= 1"),
        (["--date", "2026-02-30"], "bad date '2026-02-30'"),
        (["--hour", "24"], "hour must be 0-23"),
        (["--grid-sell", "0.5"], "exceeds buy price"),
        (["--name", "Main_Street"], "community name 'Main_Street'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "x.toml"
    argv = ["scenario", "generate", "--homes", "3", "--seed", "1", "--date", JUNE, "--hour", "13",
            "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wattmesh: ") and message in err
    assert not out.exists()


def test_cli_refuses_a_missing_output_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nowhere" / "x.toml"
    argv = ["scenario", "generate", "--homes", "3", "--seed", "1", "--date", JUNE, "--hour", "13",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"wattmesh: output directory {out.parent} does not exist\n"


@pytest.mark.parametrize("module", ["pvlib", "demandlib"])
def test_missing_demo_dependency_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    if module == "demandlib":
        monkeypatch.setitem(sys.modules, "demandlib.bdew", None)
    with pytest.raises(MissingDemoDependency) as caught:
        generate_community(3, seed=1, date=JUNE, hour=13)
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, WattmeshError)
    argv = ["scenario", "generate", "--homes", "3", "--seed", "1", "--date", JUNE, "--hour", "13",
            "--out", str(tmp_path / "x.toml")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"wattmesh: scenario generation needs {module}, which is not installed: "
        "pip install 'wattmesh[demo]'\n"
    )
