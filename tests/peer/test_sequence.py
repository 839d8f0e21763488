"""SequenceStore: strictly increasing numbers that survive restarts and kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wattmesh.peer.sequence import SequenceStore

# Takes numbers as fast as it can and prints each one; killed from outside.
_CHILD = """
import sys
from pathlib import Path
from wattmesh.peer.sequence import SequenceStore

store = SequenceStore(Path(sys.argv[1]), block=int(sys.argv[2]))
while True:
    print(store.next(), flush=True)
"""


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_numbers_strictly_increase(tmp_path: Path, block: int) -> None:
    for store in (SequenceStore(None, block=block), SequenceStore(tmp_path / "a.seq", block=block)):
        numbers = [store.next() for _ in range(20)]
        assert numbers == list(range(1, 21))


def test_restart_never_reuses_a_number(tmp_path: Path) -> None:
    path = tmp_path / "state" / "a.seq"  # the directory is created on first use
    first = SequenceStore(path, block=10)
    before = [first.next() for _ in range(25)]  # crosses two block boundaries

    second = SequenceStore(path, block=10)
    after = [second.next() for _ in range(5)]

    assert min(after) > max(before)
    assert after == sorted(set(after))
    assert min(after) <= max(before) + 10 + 1  # at most the rest of one block is lost


def test_restart_after_one_number_skips_its_block(tmp_path: Path) -> None:
    path = tmp_path / "a.seq"
    assert SequenceStore(path, block=100).next() == 1
    assert SequenceStore(path, block=100).next() == 101
    assert SequenceStore(path, block=100).next() == 201


@pytest.mark.parametrize("block", [4, 64])
def test_kill_9_mid_run_never_leads_to_a_reused_number(tmp_path: Path, block: int) -> None:
    """GIVEN a process taking numbers from a sequence file
    WHEN it is killed with SIGKILL mid-way (no cleanup of any kind)
    THEN the next store on that file starts above every number it ever printed."""
    path = tmp_path / "a.seq"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(block)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stderr is not None
    printed: list[int] = []
    try:
        while len(printed) < 200:  # blocks on the pipe: no sleep, no polling
            line = child.stdout.readline()
            assert line.endswith("\n"), f"child stopped early: {child.stderr.read()}"
            printed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
    rest = child.stdout.read()  # whatever it wrote before dying, up to the pipe's size
    child.wait()
    child.stderr.close()
    child.stdout.close()
    printed += [int(line) for line in rest.splitlines(keepends=True) if line.endswith("\n")]

    assert child.returncode == -signal.SIGKILL
    assert printed == list(range(1, len(printed) + 1))
    following = SequenceStore(path, block=block).next()
    assert following > max(printed)
    assert following <= max(printed) + block + 1


@pytest.mark.parametrize("text", ["twelve\n", "12abc", "", "0\n", "-5\n", "\xff\xfe"])
def test_corrupt_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "a.seq"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as caught:
        SequenceStore(path)
    assert str(caught.value) == f"{path}: corrupt sequence file; refusing to guess a number"


def test_block_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block must be >= 1"):
        SequenceStore(None, block=0)
