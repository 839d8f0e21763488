"""Peer ids and the community roster's text form (docs/wire.md §9)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.protocols.errors import ScenarioError, WattmeshError
from wattmesh.protocols.identity import PEER_ID_PATTERN, Roster, check_peer_id, public_key_hex

KEYS = {
    pid: Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)
    for n, pid in enumerate(["h002", "a", "0-9", "h001"], start=1)
}
HEX = {pid: public_key_hex(key.public_key()) for pid, key in KEYS.items()}
GOOD = HEX["h001"]


def test_public_key_hex_is_64_lowercase_hex_digits_of_the_raw_key() -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = KEYS["a"].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert HEX["a"] == raw.hex()
    assert len(HEX["a"]) == 64 and HEX["a"] == HEX["a"].lower()


def test_roster_round_trips_through_its_text_form() -> None:
    roster = Roster({pid: key.public_key() for pid, key in KEYS.items()})
    text = roster.to_toml()
    again = Roster.from_toml(text)
    assert sorted(again) == sorted(roster)
    assert {pid: public_key_hex(again[pid]) for pid in again} == HEX
    assert again.to_toml() == text


def test_roster_text_is_sorted_with_one_line_per_peer() -> None:
    text = Roster({pid: key.public_key() for pid, key in KEYS.items()}).to_toml()
    lines = text.splitlines()
    assert lines[0].startswith("#")
    assert lines[1] == "[peers]"
    assert lines[2:] == [f'{pid} = "{HEX[pid]}"' for pid in ["0-9", "a", "h001", "h002"]]
    assert text.endswith("\n")


def test_roster_accepts_uppercase_hex() -> None:
    roster = Roster.from_toml(f'[peers]\nh001 = "{GOOD.upper()}"\n')
    assert public_key_hex(roster["h001"]) == GOOD


def test_roster_behaves_as_a_mapping_everywhere() -> None:
    # regression: a dataclass field named ``keys`` shadowed Mapping.keys()
    roster = Roster({pid: key.public_key() for pid, key in KEYS.items()})
    assert sorted(roster.keys()) == sorted(KEYS)
    assert dict(roster) == {**roster} == dict(roster.items())
    assert Roster(dict(roster)) == roster
    assert Roster(public_keys=dict(roster)) == roster


def test_roster_is_a_read_only_mapping() -> None:
    roster = Roster({"h001": KEYS["h001"].public_key()})
    assert len(roster) == 1 and "h001" in roster and "h002" not in roster
    with pytest.raises(KeyError):
        roster["h002"]


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[peers\n", "", "not valid TOML"),
        ("", "peers", "missing or empty"),
        ("[peers]\n", "peers", "missing or empty"),
        ("peers = 5\n", "peers", "missing or empty"),
        (f'[peers]\nh001 = "{GOOD}"\n[extra]\n', "extra", "unknown key"),
        (f'[peers]\nH001 = "{GOOD}"\n', "peers.H001", "must match"),
        (f'[peers]\n"h_1" = "{GOOD}"\n', "peers.h_1", "must match"),
        (f'[peers]\n"h001\\n" = "{GOOD}"\n', "peers.h001\n", "must match"),
        ('[peers]\nh001 = "zz"\n', "peers.h001", "64 hex digits"),
        (f'[peers]\nh001 = "{"g" * 64}"\n', "peers.h001", "64 hex digits"),
        (f'[peers]\nh001 = "{GOOD[:-2]}"\n', "peers.h001", "64 hex digits"),
        (f'[peers]\nh001 = "{GOOD}00"\n', "peers.h001", "64 hex digits"),
        (f'[peers]\nh001 = "{GOOD[:2]} {GOOD[2:]}"\n', "peers.h001", "64 hex digits"),
        (f'[peers]\nh001 = "0x{GOOD[2:]}"\n', "peers.h001", "64 hex digits"),
        ("[peers]\nh001 = 5\n", "peers.h001", "64 hex digits"),
        (f'[peers.h001]\nkey = "{GOOD}"\n', "peers.h001", "64 hex digits"),
        (f'[peers]\nh001 = "{GOOD}"\nh001 = "{GOOD}"\n', "", "not valid TOML"),
    ],
    ids=[
        "bad toml",
        "empty text",
        "empty table",
        "peers not a table",
        "unknown top key",
        "uppercase id",
        "underscore id",
        "newline id",
        "bad hex",
        "non-hex letters",
        "too short",
        "too long",
        "space inside",
        "0x prefix",
        "not a string",
        "sub-table",
        "duplicate id",
    ],
)
def test_roster_errors_name_the_key(text: str, key: str, why: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        Roster.from_toml(text, source="community.roster")
    error = caught.value
    assert isinstance(error, WattmeshError)
    assert error.source == "community.roster"
    assert error.key == key
    assert why in error.reason
    assert str(error).startswith("community.roster")
    if key:
        assert key in str(error)


@pytest.mark.parametrize("good", ["a", "0", "h001", "peer-7", "-", "x" * 64])
def test_valid_peer_ids(good: str) -> None:
    assert check_peer_id(good) == good
    assert PEER_ID_PATTERN.match(good)


@pytest.mark.parametrize(
    "bad", ["", "H1", "h_1", "h 1", "h/1", "h+1", "#", "x" * 65, "h1\n", "\nh1", "é", 5, None]
)
def test_invalid_peer_ids(bad: object) -> None:
    with pytest.raises(ValueError, match="must match"):
        check_peer_id(bad, what="sender")
    if isinstance(bad, str):
        assert not PEER_ID_PATTERN.match(bad)


def test_roster_constructor_checks_ids() -> None:
    with pytest.raises(ValueError):
        Roster({"Bad": KEYS["a"].public_key()})
