"""The scenario loader (docs/scenario.md), written as GIVEN / WHEN / THEN.

The corpus ``broken_scenarios/*.toml`` holds one mistake per file; the first line of
each says ``# expect: <part of the error message>``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattmesh.protocols.admm import AdmmSettings
from wattmesh.protocols.errors import ScenarioError
from wattmesh.protocols.scenario import (
    Grid,
    PeerSpec,
    PublicScenario,
    Scenario,
    parse_scenario,
)

CORPUS = Path(__file__).parent / "broken_scenarios"

COMMUNITY = '[community]\nname = "demo"\n'
GRID = "[grid]\nbuy_price = 0.30\nsell_price = 0.08\n"


def peer(pid: str, **keys: Any) -> str:
    lines = [f'[[peers]]\nid = "{pid}"']
    lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def load(*parts: str) -> Scenario:
    return parse_scenario("".join(parts), source="given.toml")


# ---------------------------------------------------------------- cost forms


def test_household_form_with_flex() -> None:
    # GIVEN a household preferring 2.5 kWh, ±1 kWh flexible at 0.12 per kWh²
    scenario = load(COMMUNITY, GRID, peer("h1", demand=2.5, flex=1.0, flex_cost=0.12))
    # WHEN its private model is read
    spec = scenario.peers["h1"]
    # THEN the limits are demand ∓ flex and C(y) = a/2 (y − d)², zero at d
    assert (spec.min_kwh, spec.max_kwh) == (1.5, 3.5)
    assert spec.cost_quadratic == 0.12
    assert spec.cost_linear == pytest.approx(-0.12 * 2.5)
    assert spec.cost(2.5) == pytest.approx(0.0, abs=1e-12)
    assert spec.cost(3.5) == pytest.approx(0.06)
    assert spec.cost(1.5) == pytest.approx(0.06)
    assert spec.role == "flexible"


def test_household_form_with_explicit_limits_and_defaults() -> None:
    # GIVEN one household with min/max, one with only min, one fixed load
    scenario = load(
        COMMUNITY,
        GRID,
        peer("a", demand=1.0, min=0.0, max=4.0, flex_cost=0.1),
        peer("b", demand=1.0, min=-1.0, flex_cost=0.1),
        peer("c", demand=-0.5, flex_cost=0.0),
    )
    # THEN a missing bound defaults to the demand itself
    assert (scenario.peers["a"].min_kwh, scenario.peers["a"].max_kwh) == (0.0, 4.0)
    assert (scenario.peers["b"].min_kwh, scenario.peers["b"].max_kwh) == (-1.0, 1.0)
    assert (scenario.peers["c"].min_kwh, scenario.peers["c"].max_kwh) == (-0.5, -0.5)


def test_general_form_linear_cost() -> None:
    # GIVEN a generator with a linear cost: a = 0, b = 0.05 per kWh, output up to 3 kWh
    scenario = load(COMMUNITY, GRID, peer("pv", cost={"a": 0.0, "b": 0.05}, min=-3.0, max=0.0))
    spec = scenario.peers["pv"]
    # THEN C(y) = b·y on [min, max], with no constant
    assert (spec.cost_quadratic, spec.cost_linear, spec.cost_constant) == (0.0, 0.05, 0.0)
    assert (spec.min_kwh, spec.max_kwh) == (-3.0, 0.0)
    assert spec.cost(-2.0) == pytest.approx(-0.1)


def test_general_form_quadratic_cost_b_defaults_to_zero() -> None:
    scenario = load(COMMUNITY, GRID, peer("x", cost={"a": 0.2}, min=-1.0, max=1.0))
    assert scenario.peers["x"].cost(1.0) == pytest.approx(0.1)
    assert scenario.peers["x"].cost_linear == 0.0


def test_integers_are_accepted_where_numbers_are_expected() -> None:
    scenario = load(COMMUNITY, GRID, peer("x", demand=2, flex=1, flex_cost=1))
    assert scenario.peers["x"].max_kwh == 3.0
    assert isinstance(scenario.peers["x"].max_kwh, float)


# ---------------------------------------------------------------- roles


def test_roles_are_stored_privately_default_flexible() -> None:
    # GIVEN a buyer, a seller and a peer with no role
    scenario = load(
        COMMUNITY,
        GRID,
        peer("b", demand=2.0, flex_cost=0.1, role="buyer"),
        peer("s", demand=-2.0, flex_cost=0.1, role="seller"),
        peer("f", demand=0.0, flex_cost=0.1),
        peer("g", demand=0.0, flex_cost=0.1, role="flexible"),
    )
    # THEN each spec carries its role, and the public part does not
    assert [scenario.peers[p].role for p in "bsfg"] == ["buyer", "seller", "flexible", "flexible"]
    assert "buyer" not in json.dumps(scenario.public.to_dict())


# ---------------------------------------------------------------- neighbours


def test_no_neighbour_lists_means_everyone_is_linked() -> None:
    scenario = load(COMMUNITY, GRID, *(peer(p, demand=0.0, flex_cost=0.1) for p in "cab"))
    assert scenario.public.peer_ids == ("c", "a", "b")  # file order
    assert scenario.public.links == {"a": ("b", "c"), "b": ("a", "c"), "c": ("a", "b")}


def test_a_link_needs_consent_from_both_sides() -> None:
    # GIVEN a wants b and c; b wants only a; c wants only d; d has no list
    scenario = load(
        COMMUNITY,
        GRID,
        peer("a", demand=0.0, flex_cost=0.1, neighbors=["b", "c"]),
        peer("b", demand=0.0, flex_cost=0.1, neighbors=["a"]),
        peer("c", demand=0.0, flex_cost=0.1, neighbors=["d"]),
        peer("d", demand=0.0, flex_cost=0.1),
    )
    links = scenario.public.links
    # THEN a–b (both listed), c–d (c lists d, d accepts everyone);
    # a–c is one-sided (c does not list a): no link, and not an error
    assert links == {"a": ("b",), "b": ("a",), "c": ("d",), "d": ("c",)}
    # AND links are symmetric and sorted
    for pid, others in links.items():
        assert list(others) == sorted(others)
        assert all(pid in links[o] for o in others)


def test_an_empty_list_means_no_partner() -> None:
    scenario = load(
        COMMUNITY,
        GRID,
        peer("a", demand=1.0, flex_cost=0.1, neighbors=[]),
        peer("b", demand=-1.0, flex_cost=0.1),
    )
    assert scenario.public.links == {"a": (), "b": ()}
    assert scenario.public.fees == {}


# ---------------------------------------------------------------- fees


def test_default_fee_applies_to_every_link_and_pairs_override_it() -> None:
    # GIVEN a default fee of 0.01 and an override for the pair c–a, written b before a
    scenario = load(
        COMMUNITY,
        "[market]\nfee = 0.01\n",
        GRID,
        *(peer(p, demand=0.0, flex_cost=0.1) for p in "abc"),
        '[[fees]]\na = "c"\nb = "a"\nfee = 0.05\n',
    )
    public = scenario.public
    # THEN every link has exactly one fee entry, keyed (smaller id, larger id)
    assert public.fees == {("a", "b"): 0.01, ("a", "c"): 0.05, ("b", "c"): 0.01}
    # AND the lookup is symmetric
    assert public.fee("c", "a") == public.fee("a", "c") == 0.05


def test_fee_defaults_to_zero() -> None:
    scenario = load(COMMUNITY, GRID, *(peer(p, demand=0.0, flex_cost=0.1) for p in "ab"))
    assert scenario.public.fees == {("a", "b"): 0.0}


def test_fees_exist_only_for_links() -> None:
    scenario = load(
        COMMUNITY,
        "[market]\nfee = 0.02\n",
        GRID,
        peer("a", demand=0.0, flex_cost=0.1, neighbors=["b"]),
        peer("b", demand=0.0, flex_cost=0.1),
        peer("c", demand=0.0, flex_cost=0.1, neighbors=["b"]),
    )
    assert set(scenario.public.fees) == {("a", "b"), ("b", "c")}


# ---------------------------------------------------------------- market, grid


def test_mechanism_defaults_to_admm_with_default_settings() -> None:
    scenario = load(COMMUNITY, GRID, peer("a", demand=0.0, flex_cost=0.1))
    assert scenario.public.mechanism == "admm"
    assert scenario.public.settings == {}
    assert AdmmSettings.from_mapping(scenario.public.settings) == AdmmSettings()


def test_admm_settings_are_validated_and_kept_public() -> None:
    # GIVEN [market.admm] with some settings
    scenario = load(
        COMMUNITY,
        '[market]\nmechanism = "admm"\n[market.admm]\nrho = 1\neps_rel = 1e-3\n'
        "max_iterations = 500\nadapt_rho = false\ninitial_price = 0.2\n",
        GRID,
        peer("a", demand=0.0, flex_cost=0.1),
    )
    # THEN they reach the public scenario and build AdmmSettings
    admm = AdmmSettings.from_mapping(scenario.public.settings)
    assert (admm.rho, admm.eps_rel, admm.max_iterations) == (1, 1e-3, 500)
    assert admm.adapt_rho is False and admm.initial_price == 0.2
    assert admm.round_timeout_s == AdmmSettings().round_timeout_s


def test_admm_setting_defaults_are_the_documented_ones() -> None:
    """docs/scenario.md lists these; change both together."""
    assert dataclasses.asdict(AdmmSettings()) == {
        "rho": 0.1,
        "eps_rel": 1e-4,
        "eps_abs": 1e-6,
        "max_iterations": 2000,
        "adapt_rho": True,
        "adapt_until": 500,
        "initial_price": None,
        "round_timeout_s": 10.0,
        "neighbour_timeout_s": 30.0,
    }
    doc = (Path(__file__).resolve().parents[2] / "docs" / "scenario.md").read_text()
    for name in dataclasses.asdict(AdmmSettings()):
        assert f"`{name}`" in doc, name


def test_grid_tariff() -> None:
    scenario = load(COMMUNITY, GRID, peer("a", demand=1.0, flex_cost=0.1))
    grid = scenario.public.grid
    assert grid == Grid(0.30, 0.08)
    assert grid.cost(2.0) == pytest.approx(0.6)
    assert grid.cost(-2.0) == pytest.approx(-0.16)
    assert grid.cost(0.0) == 0.0


def test_equal_buy_and_sell_price_is_allowed() -> None:
    scenario = load(
        COMMUNITY,
        "[grid]\nbuy_price = 0.2\nsell_price = 0.2\n",
        peer("a", demand=1.0, flex_cost=0.1),
    )
    assert scenario.public.grid == Grid(0.2, 0.2)


def test_without_grid_a_balanced_community_is_feasible() -> None:
    # GIVEN no [grid], one peer short 1 kWh and one with 1 kWh to spare
    scenario = load(
        COMMUNITY,
        peer("a", demand=1.0, flex_cost=0.1, role="buyer"),
        peer("b", demand=-1.0, flex=0.5, flex_cost=0.1, role="seller"),
    )
    # THEN it loads, with no grid
    assert scenario.public.grid is None
    assert scenario.name == "demo"


def test_without_grid_a_peer_with_zero_in_its_limits_may_be_isolated() -> None:
    scenario = load(
        COMMUNITY,
        peer("a", demand=0.0, flex=1.0, flex_cost=0.1, neighbors=[]),
        peer("b", demand=0.5, flex=1.0, flex_cost=0.1),
    )
    assert scenario.public.links["a"] == ()


# ---------------------------------------------------------------- public / private


def test_public_scenario_holds_no_cost_parameters() -> None:
    # GIVEN a community whose private numbers are easy to spot
    scenario = load(
        COMMUNITY,
        GRID,
        peer("a", demand=7.123456, flex=1.654321, flex_cost=0.987654, role="buyer"),
        peer("b", cost={"a": 0.0, "b": 0.313131}, min=-4.242424, max=0.0),
    )
    public = scenario.public
    # THEN the public part's fields are only ids, links, fees, tariff, settings
    assert [f.name for f in dataclasses.fields(PublicScenario)] == [
        "name",
        "mechanism",
        "peer_ids",
        "links",
        "fees",
        "grid",
        "settings",
    ]
    # AND none of the private numbers appear in its serialised form
    text = json.dumps(public.to_dict())
    for secret in ("7.12", "1.65", "0.98", "0.31", "4.24", "buyer", "8.77", "5.46"):
        assert secret not in text


def test_public_scenario_round_trips_through_a_dict_and_json() -> None:
    scenario = load(
        COMMUNITY,
        "[market]\nfee = 0.01\n[market.admm]\nrho = 0.5\n",
        GRID,
        peer("a", demand=1.0, flex_cost=0.1, neighbors=["b", "c"]),
        peer("b", demand=0.0, flex_cost=0.1),
        peer("c", demand=-1.0, flex_cost=0.1),
        '[[fees]]\na = "a"\nb = "c"\nfee = 0.03\n',
    )
    data = json.loads(json.dumps(scenario.public.to_dict()))
    assert PublicScenario.from_dict(data) == scenario.public


def test_public_scenario_round_trip_without_grid() -> None:
    scenario = load(COMMUNITY, peer("a", demand=0.0, flex_cost=0.1))
    data = json.loads(json.dumps(scenario.public.to_dict()))
    assert data["grid"] is None
    assert PublicScenario.from_dict(data) == scenario.public


def test_peer_spec_round_trips_through_a_dict() -> None:
    scenario = load(COMMUNITY, GRID, peer("a", demand=1.5, flex=0.5, flex_cost=0.2, role="seller"))
    spec = scenario.peers["a"]
    assert PeerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ---------------------------------------------------------------- the corpus


def corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.toml"))


def test_the_corpus_is_large_and_every_file_says_what_it_expects() -> None:
    files = corpus()
    assert len(files) >= 25
    for path in files:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# expect: ") and len(first) > len("# expect: "), path.name


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.stem)
def test_broken_scenario_is_refused_with_a_clear_message(path: Path) -> None:
    # GIVEN a scenario file with one mistake
    text = path.read_text(encoding="utf-8")
    expected = text.splitlines()[0].removeprefix("# expect: ")
    # WHEN it is loaded
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, source=str(path))
    # THEN the error names the file and says why
    message = str(caught.value)
    assert path.name in message
    assert expected in message
    assert caught.value.source == str(path)


# ---------------------------------------------------------------- fuzzing

_VALUES = (
    st.none()  # None: leave the key out
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats()  # includes nan and ±inf, which TOML can spell
    | st.sampled_from(["a", "b", "c", "", "A", "buyer", "seller", "x y"])
    | st.lists(st.sampled_from(["a", "b", "c", "z", "A", 1]), max_size=3)  # type: ignore[list-item]
    | st.fixed_dictionaries(
        {}, optional={"a": st.floats(-1, 1), "b": st.floats(-1, 1), "c": st.just(1)}
    )
)
_PEER_KEYS = ["demand", "flex", "flex_cost", "min", "max", "cost", "role", "neighbors"]


def _toml_value(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return _toml(value)


@settings(max_examples=int(os.environ.get("WATTMESH_FUZZ_EXAMPLES", "150")), deadline=None)
@given(
    peers=st.lists(
        st.dictionaries(st.sampled_from(_PEER_KEYS), _VALUES, max_size=6), min_size=1, max_size=3
    ),
    fee=_VALUES,
    grid=st.booleans(),
    admm=st.dictionaries(
        st.sampled_from(["rho", "max_iterations", "adapt_rho", "initial_price", "bogus"]),
        _VALUES,
        max_size=2,
    ),
)
def test_any_scenario_loads_or_raises_scenario_error(
    peers: list[dict[str, Any]], fee: Any, grid: bool, admm: dict[str, Any]
) -> None:
    parts = [COMMUNITY]
    if fee is not None:
        parts.append(f"[market]\nfee = {_toml_value(fee)}\n")
    admm = {k: v for k, v in admm.items() if v is not None}
    if admm:
        parts.append(
            "[market.admm]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in admm.items())
        )
    if grid:
        parts.append(GRID)
    for pid, keys in zip("abc", peers, strict=False):
        parts.append(f'[[peers]]\nid = "{pid}"\n')
        parts += [f"{k} = {_toml_value(v)}\n" for k, v in keys.items() if v is not None]
    try:
        scenario = parse_scenario("".join(parts), source="fuzz.toml")
    except ScenarioError as error:
        assert str(error).startswith("fuzz.toml")
        return
    for spec in scenario.peers.values():
        assert spec.min_kwh <= spec.max_kwh
        assert all(math.isfinite(v) for v in (spec.min_kwh, spec.max_kwh, spec.cost_quadratic))
