"""A per-sender sequence counter that never reuses a number, even after kill -9.

Numbers are handed out from a block reserved on disk: the file holds the first number
*not* yet reserved. Reserving the next block is one small write + fsync every
``block`` messages, so a crash loses at most the unused rest of a block (numbers only
need to increase, not be contiguous).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SequenceStore"]


class SequenceStore:
    """Hands out strictly increasing sequence numbers backed by a file."""

    def __init__(self, path: Path | None, *, block: int = 1024) -> None:
        """
        Args:
            path: file holding the reservation mark; ``None`` keeps it in memory only
                (tests and simulations where nothing restarts).
            block: numbers reserved per disk write, at least 1.
        """
        if block < 1:  # 0 would use the very number on disk, which a restart repeats
            raise ValueError(f"block must be >= 1, got {block}")
        self._path = path
        self._block = block
        self._next = 1
        self._limit = 1
        if path is not None and path.exists():
            try:
                self._next = self._limit = int(path.read_text().strip())
                if self._next < 1:  # never written by a store; starting anywhere is a guess
                    raise ValueError
            except ValueError:
                raise ValueError(f"{path}: corrupt sequence file; refusing to guess a number") from None

    def next(self) -> int:
        """The next number; reserves a new block on disk first when needed."""
        if self._next >= self._limit:
            self._reserve(self._next + self._block)
        value = self._next
        self._next += 1
        return value

    def _reserve(self, limit: int) -> None:
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_name(self._path.name + ".tmp")
            with open(tmp, "w") as handle:
                handle.write(f"{limit}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path)
            # the rename itself is only durable once the directory is synced
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._limit = limit
