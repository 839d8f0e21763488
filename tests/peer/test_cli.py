"""The ``wattmesh`` command line: keygen output, and one clear line for user mistakes."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from wattmesh.peer.cli import main
from wattmesh.peer.keys import load_private_key
from wattmesh.protocols.identity import Roster

VALID_SCENARIO = """\
[community]
name = "street"
[grid]
buy_price = 0.30
sell_price = 0.08
[[peers]]
id = "h1"
demand = 1.0
flex = 1.0
flex_cost = 0.1
[[peers]]
id = "h2"
demand = -1.0
flex_cost = 0.1
"""

BROKEN_SCENARIO = VALID_SCENARIO + 'neighbors = ["h1", "h9"]\n'  # h2 names an unknown peer


def _the_one_error_line(err: str) -> str:
    """The single ``wattmesh: ...`` line on stderr (asserting there is exactly one)."""
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got {err!r}"
    assert err.startswith("wattmesh: ")
    return err.rstrip("\n")


def _public_hex(key_path: Path) -> str:
    key = load_private_key(key_path).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def test_keygen_writes_a_private_key_and_prints_its_roster_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h001.key"
    assert main(["keygen", "h001", "--out", str(path)]) == 0
    captured = capsys.readouterr()

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert captured.err == ""
    assert captured.out.splitlines() == [
        f"wrote {path} (mode 0600); roster line:",
        f'h001 = "{_public_hex(path)}"',
    ]
    roster = Roster.from_toml("[peers]\n" + captured.out.splitlines()[1])  # pastes as is
    assert list(roster) == ["h001"]


def test_keygen_defaults_to_peer_id_dot_key_in_the_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "shop-7"]) == 0
    assert (tmp_path / "shop-7.key").exists()
    assert capsys.readouterr().out.splitlines()[0] == "wrote shop-7.key (mode 0600); roster line:"


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h001.key"
    assert main(["keygen", "h001", "--out", str(path)]) == 0
    first = _public_hex(path)
    capsys.readouterr()

    assert main(["keygen", "h001", "--out", str(path)]) == 2
    captured = capsys.readouterr()
    assert _the_one_error_line(captured.err) == (
        f"wattmesh: {path} exists; refusing to overwrite a private key"
    )
    assert captured.out == ""
    assert _public_hex(path) == first

    assert main(["keygen", "h001", "--out", str(path), "--force"]) == 0
    assert _public_hex(path) != first


def test_keygen_rejects_a_bad_peer_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "H/1", "--out", str(tmp_path / "x.key")]) == 2
    line = _the_one_error_line(capsys.readouterr().err)
    assert line == "wattmesh: peer id 'H/1' must match [a-z0-9-]{1,64}"
    assert not (tmp_path / "x.key").exists()


def test_run_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert _the_one_error_line(captured.err) == (
        f"wattmesh: {path}: cannot read (No such file or directory)"
    )
    assert captured.out == ""


def test_run_on_a_broken_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN_SCENARIO)
    assert main(["run", str(path), "--out", str(tmp_path / "result.json")]) == 2
    captured = capsys.readouterr()
    assert _the_one_error_line(captured.err) == (
        f"wattmesh: {path}: peers[1].neighbors: unknown peer 'h9'"
    )
    assert captured.out == ""
    assert not (tmp_path / "result.json").exists()


def test_run_with_zero_peers_per_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "street.toml"
    path.write_text(VALID_SCENARIO)
    out = tmp_path / "result.json"
    assert main(["run", str(path), "--out", str(out), "--peers-per-process", "0"]) == 2
    line = _the_one_error_line(capsys.readouterr().err)
    assert "peers_per_process" in line and ">= 1" in line
    assert not out.exists()


def _console_script() -> str:
    """The installed ``wattmesh`` entry point (next to this interpreter, or on PATH)."""
    beside = Path(sys.executable).with_name("wattmesh")
    found = str(beside) if beside.exists() else shutil.which("wattmesh")
    assert found, "the wattmesh console script is not installed (pip install -e .)"
    return found


def test_console_script_reports_a_broken_scenario_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN_SCENARIO)
    child = subprocess.run(
        [_console_script(), "run", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert child.returncode == 2
    assert "Traceback" not in child.stderr
    assert child.stderr == f"wattmesh: {path}: peers[1].neighbors: unknown peer 'h9'\n"


BROKEN_CORPUS = sorted((Path(__file__).parents[1] / "protocols" / "broken_scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", BROKEN_CORPUS, ids=lambda p: p.stem)
def test_every_broken_scenario_of_the_corpus_is_one_line_and_exit_2_from_the_command(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a scenario file with one mistake (tests/protocols/broken_scenarios)
    expected = path.read_text(encoding="utf-8").splitlines()[0].removeprefix("# expect: ")
    out = tmp_path / "result.json"
    # WHEN `wattmesh run` is given it
    code = main(["run", str(path), "--out", str(out)])
    # THEN it exits 2 with one line naming the file and the mistake, and starts nothing
    captured = capsys.readouterr()
    assert code == 2
    line = _the_one_error_line(captured.err)
    assert line.startswith(f"wattmesh: {path}") and expected in line
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()
