"""Key files and roster files on disk (wattmesh.peer.keys)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from wattmesh.peer.keys import (
    describe_key,
    generate_key,
    load_private_key,
    load_roster,
    write_roster,
)
from wattmesh.protocols.errors import ScenarioError
from wattmesh.protocols.identity import Roster


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_key_file_is_private_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "h001.key"  # the directory is created
    key = generate_key(path)

    assert _mode(path) == 0o600
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n") and bytes.fromhex(text)
    assert _public_bytes(load_private_key(path)) == _public_bytes(key)
    assert list(path.parent.iterdir()) == [path]  # no tmp file left behind


def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "h001.key"
        generate_key(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_leftover_tmp_file_does_not_widen_the_mode(tmp_path: Path) -> None:
    """A crash may leave ``h001.key.tmp`` behind, perhaps world-readable."""
    leftover = tmp_path / "h001.key.tmp"
    leftover.write_text("old\n")
    leftover.chmod(0o644)

    generate_key(tmp_path / "h001.key")

    assert _mode(tmp_path / "h001.key") == 0o600


def test_a_symlink_in_place_of_the_tmp_file_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "public" / "stolen"
    elsewhere.parent.mkdir()
    (tmp_path / "h001.key.tmp").symlink_to(elsewhere)

    generate_key(tmp_path / "h001.key")

    assert not elsewhere.exists()
    assert not (tmp_path / "h001.key").is_symlink()


def test_generate_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    path = tmp_path / "h001.key"
    first = generate_key(path)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_key(path)
    assert _public_bytes(load_private_key(path)) == _public_bytes(first)

    second = generate_key(path, overwrite=True)
    assert _public_bytes(second) != _public_bytes(first)
    assert _public_bytes(load_private_key(path)) == _public_bytes(second)
    assert _mode(path) == 0o600


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "not a wattmesh key file (expected 64 hex digits)"),
        ("zz" * 32, "not a wattmesh key file (expected 64 hex digits)"),
        ("ab" * 31, "not a wattmesh key file (expected 64 hex digits)"),
        ("ab" * 33, "not a wattmesh key file (expected 64 hex digits)"),
        ("-----BEGIN PRIVATE KEY-----", "not a wattmesh key file (expected 64 hex digits)"),
    ],
)
def test_malformed_key_file_is_a_scenario_error(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "h001.key"
    path.write_text(content)
    with pytest.raises(ScenarioError) as caught:
        load_private_key(path)
    assert (caught.value.source, caught.value.reason) == (str(path), reason)
    assert str(caught.value) == f"{path}: {reason}"


def test_binary_key_file_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "h001.key"
    path.write_bytes(b"\xff\xfe" * 40)
    with pytest.raises(ScenarioError, match="not a wattmesh key file"):
        load_private_key(path)


def test_missing_key_file_is_a_scenario_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(ScenarioError) as caught:
        load_private_key(path)
    assert str(caught.value) == f"{path}: cannot read key file (No such file or directory)"


def test_roster_round_trip(tmp_path: Path) -> None:
    keys = {pid: Ed25519PrivateKey.generate() for pid in ("h002", "h001", "shop-7")}
    path = tmp_path / "roster.toml"

    written = write_roster(path, keys)
    loaded = load_roster(path)

    assert isinstance(loaded, Roster)
    assert sorted(loaded) == ["h001", "h002", "shop-7"]
    for pid, key in keys.items():
        raw = loaded[pid].public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert raw == _public_bytes(key)
        assert f'{pid} = "{describe_key(key)}"' in path.read_text().splitlines()
    assert written.to_toml() == loaded.to_toml() == path.read_text()


def test_write_roster_refuses_a_bad_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "roster.toml"
    with pytest.raises(ValueError, match="must match"):
        write_roster(path, {"H/1": Ed25519PrivateKey.generate()})
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("[peers]\n", "peers"),
        ('[peers]\nh001 = "abc"\n', "peers.h001"),
        ("peers = [", ""),
        ('[peers]\nh001 = "' + "ab" * 32 + '"\n[extra]\n', "extra"),
    ],
)
def test_bad_roster_is_a_scenario_error_naming_the_key(
    tmp_path: Path, content: str, key: str
) -> None:
    path = tmp_path / "roster.toml"
    path.write_text(content)
    with pytest.raises(ScenarioError) as caught:
        load_roster(path)
    assert (caught.value.source, caught.value.key) == (str(path), key)


def test_unreadable_roster_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read roster"):
        load_roster(tmp_path / "absent.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    with pytest.raises(ScenarioError) as caught:
        load_roster(binary)
    assert str(caught.value) == f"{binary}: not a roster (not UTF-8 text)"
