"""The README's main job: ``wattmesh demo`` completes and writes every file it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wattmesh.peer.cli import main
from wattmesh.peer.report import REPORT_FILES


def test_demo_completes_and_writes_every_report_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a fresh directory
    directory = tmp_path / "demo"
    # WHEN the demo runs exactly as the README runs it (about 20 homes, broker "auto")
    status = main(["demo", "--dir", str(directory)])
    captured = capsys.readouterr()
    out = captured.out
    # THEN it converged and wrote the scenario, the result and every report file
    assert status == 0, out + captured.err + _log_tails(directory / "result.d" / "logs")
    result = json.loads((directory / "result.json").read_text())
    assert result["converged"] and len(result["peers"]) == 20
    assert not result["disputes"] and not result["missing_peers"]
    assert result["history"] and result["history"][-1]["iteration"] == result["iterations"]
    for name in REPORT_FILES:
        path = directory / "result-report" / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in (f for f in REPORT_FILES if f.endswith(".png")):
        assert (directory / "result-report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (directory / "result-report" / "summary.txt").read_text()
    assert "saving with sharing" in summary and "self-consumption" in summary
    assert "broker: " in out
    assert f"files: {directory}/" in out


def _log_tails(logs: Path) -> str:
    """The last lines of every worker log, so a failure in CI says why."""
    tails = []
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-5:]
        if lines:
            tails.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(tails)
