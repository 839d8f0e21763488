"""A peer's durable contract ledger: one SQLite file, WAL journal, fsync on commit.

Write-ahead for settlement: the shell calls :meth:`Ledger.write` with a step's records
and only then sends its messages, so an acknowledged contract is on disk before the
counterparty hears of it and survives ``kill -9`` (``synchronous=FULL``: the WAL is
fsynced at every commit). A session's own report is kept too, so a peer restarted
during settlement resumes it instead of re-running a market its neighbours have left.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from wattmesh.protocols.contract import Contract
from wattmesh.protocols.errors import ProtocolError, WattmeshError
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.settlement import ContractRecord

__all__ = ["Ledger", "LedgerError", "audit"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contracts (
    session      TEXT NOT NULL,
    counterparty TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('buyer', 'seller')),
    kwh          REAL NOT NULL,
    price        REAL NOT NULL,
    status       TEXT NOT NULL,
    terms        BLOB,
    seller_sig   BLOB,
    buyer_sig    BLOB,
    deadline_ms  INTEGER NOT NULL,
    reason       TEXT,
    updated_ms   INTEGER NOT NULL,
    PRIMARY KEY (session, counterparty)
);
CREATE TABLE IF NOT EXISTS sessions (
    session     TEXT PRIMARY KEY,
    community   TEXT NOT NULL,
    mechanism   TEXT NOT NULL,
    report      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);
"""


_CONTRACT_COLUMNS = "session, counterparty, role, kwh, price, status, terms, seller_sig, buyer_sig, deadline_ms, reason"


class LedgerError(WattmeshError):
    """The ledger file cannot be opened or is not a wattmesh ledger."""


class Ledger:
    """Contracts and settled sessions of one peer."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """
        Args:
            read_only: inspect an existing ledger without changing the file at all
                (``wattmesh ledger`` on a file that may have been tampered with).
        """
        self.path = path
        try:
            if read_only:
                self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
            # a foreign database with tables of the same names is not a ledger
            self._db.execute(f"SELECT {_CONTRACT_COLUMNS} FROM contracts LIMIT 0")
            self._db.execute("SELECT session, community, mechanism, report, created_ms FROM sessions LIMIT 0")
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"{path}: cannot open the ledger ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ contracts
    def write(self, records: Iterable[ContractRecord]) -> None:
        """Store records in one transaction; durable when this returns."""
        rows = [
            (
                r.session, r.counterparty, r.role, r.kwh, r.price, r.status, r.terms_bytes,
                r.seller_signature, r.buyer_signature, r.deadline_ms, r.reason, int(time.time() * 1000),
            )
            for r in records
        ]  # fmt: skip
        if not rows:
            return
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO contracts VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def records(self, session: str | None = None) -> list[ContractRecord]:
        """Every record, or one session's, ordered by session and counterparty."""
        query = f"SELECT {_CONTRACT_COLUMNS} FROM contracts"
        args: tuple[Any, ...] = ()
        if session is not None:
            query += " WHERE session = ?"
            args = (session,)
        rows = self._db.execute(query + " ORDER BY session, counterparty", args).fetchall()
        return [ContractRecord(*row) for row in rows]

    def contracts(self, session: str | None = None) -> Iterator[Contract]:
        """Final contracts only (both signatures present)."""
        for record in self.records(session):
            contract = record.contract
            if contract is not None:
                yield contract

    # ------------------------------------------------------------------ sessions
    def save_session(self, session: str, community: str, mechanism: str, report: Mapping[str, Any]) -> None:
        """Keep this peer's market outcome for ``session`` (before settlement starts)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?)",
                (session, community, mechanism, json.dumps(report), int(time.time() * 1000)),
            )

    def session_report(self, session: str) -> dict[str, Any] | None:
        """The outcome saved for ``session``, or None when the market never cleared here."""
        row = self._db.execute("SELECT report FROM sessions WHERE session = ?", (session,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def sessions(self) -> list[tuple[str, str, str, int]]:
        """(session, community, mechanism, created_ms), oldest first."""
        return list(self._db.execute("SELECT session, community, mechanism, created_ms FROM sessions ORDER BY created_ms"))

    def _transaction(self) -> sqlite3.Connection:
        return _Transaction(self._db)  # type: ignore[return-value]


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def audit(records: Iterable[ContractRecord], roster: Roster) -> list[dict[str, Any]]:
    """One row per record for listing or export, each final contract's signatures checked.

    ``check`` is ``"ok"`` (both signatures verify and the terms match the record),
    ``"BAD: …"`` (they do not: the ledger was tampered with or is corrupt), or ``"-"``
    for records that are not final (nothing to verify, nothing to act on).
    """
    rows = []
    for r in records:
        check = "-"
        contract = r.contract
        if contract is not None and not all(
            isinstance(b, bytes) for b in (contract.terms_bytes, contract.seller_signature, contract.buyer_signature)
        ):
            check, contract = "BAD: terms or signatures are not bytes", None
        elif contract is not None:
            try:
                terms = contract.verify(roster)
                seller, buyer = (terms.seller, terms.buyer)
                if r.counterparty not in (seller, buyer) or (r.role == "buyer") != (r.counterparty == seller):
                    raise ProtocolError("the terms name other parties than the record")
                if terms.kwh != r.kwh or terms.price != r.price or terms.session != r.session:
                    raise ProtocolError("the terms differ from the record")
                check = "ok"
            except ProtocolError as exc:
                check = f"BAD: {exc}"
        elif r.status == "final":
            check = "BAD: final without both signatures"
        row: dict[str, Any] = {
            "session": r.session, "counterparty": r.counterparty, "role": r.role, "kwh": r.kwh,
            "price": r.price, "status": r.status, "check": check, "reason": r.reason,
        }  # fmt: skip
        if contract is not None and check == "ok":
            row["contract"] = contract.to_dict()
        rows.append(row)
    return rows
