"""The contract ledger (peer/ledger.py) and ``wattmesh ledger`` (docs/contracts.md §7-8).

Records come from real Settlement cores exchanging real contract messages; tampering is
done the way an attacker or a corrupt disk would do it, on the SQLite file itself.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wattmesh.peer.cli import main
from wattmesh.peer.ledger import Ledger, LedgerError, audit
from wattmesh.protocols.contract import Contract
from wattmesh.protocols.identity import Roster
from wattmesh.protocols.settlement import ContractRecord, Settlement, SettlementStep
from wattmesh.protocols.wire import Envelope

COMMUNITY = "demo"
T0 = 1_748_779_200_000
KEYS = {
    pid: Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32)
    for n, pid in enumerate(("h001", "h002", "h003", "h004"), 31)
}
ROSTER = Roster({pid: key.public_key() for pid, key in KEYS.items()})


def _core(peer: str, session: str, trades: dict[str, tuple[float, float]]) -> Settlement:
    return Settlement(peer, KEYS[peer], ROSTER, community=COMMUNITY, session=session, trades=trades)


def _pass(step: SettlementStep, sender: str, session: str, receiver: Settlement, now: int) -> SettlementStep:
    """Hand the step's messages to ``receiver`` as verified envelopes would arrive."""
    result = SettlementStep()
    for n, out in enumerate(step.outgoing, start=1):
        if out.to == receiver.peer_id:
            envelope = Envelope(out.type, sender, COMMUNITY, session, n, now, dict(out.body))
            result = result + receiver.receive(envelope, now)
    return result


def settle(buyer_kwh: float = 1.5) -> tuple[list[ContractRecord], list[ContractRecord]]:
    """(h001's records, h002's records), in ledger order, after a session run-7 in which
    h001 sold 1.5 kWh to h002 at 0.12 (final) and offered 0.5 kWh to h003 (no answer:
    proposed), and a session run-8 in which h001 waited in vain to buy 0.25 kWh at 0.2
    from h004 (expired)."""
    seller = _core("h001", "run-7", {"h002": (-1.5, 0.12), "h003": (-0.5, 0.12)})
    buyer = _core("h002", "run-7", {"h001": (buyer_kwh, 0.12)})
    proposals = seller.start(T0)
    buyer.start(T0)
    accept = _pass(proposals, "h001", "run-7", buyer, T0 + 20)
    _pass(accept, "h002", "run-7", seller, T0 + 40)
    waiting = _core("h001", "run-8", {"h004": (0.25, 0.2)})
    waiting.start(T0)
    waiting.on_timer(T0 + 65_000)
    mine = sorted([*seller.records.values(), *waiting.records.values()], key=lambda r: (r.session, r.counterparty))
    return mine, list(buyer.records.values())


@pytest.fixture
def records() -> list[ContractRecord]:
    """h001's three records (final, proposed, expired)."""
    return settle()[0]


@pytest.fixture
def ledger_path(tmp_path: Path, records: list[ContractRecord]) -> Path:
    path = tmp_path / "state" / "h001.ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.write(records)
    return path


@pytest.fixture
def roster_path(tmp_path: Path) -> Path:
    path = tmp_path / "roster.toml"
    path.write_text(ROSTER.to_toml())
    return path


def tamper(path: Path, sql: str, *args: object) -> None:
    """Edit the ledger behind wattmesh's back, as `sqlite3 FILE "UPDATE ..."` would."""
    db = sqlite3.connect(path)
    with db:
        assert db.execute(sql, args).rowcount == 1
    db.close()


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


# ---------------------------------------------------------------- the Ledger


def test_records_round_trip(tmp_path: Path, records: list[ContractRecord]) -> None:
    # GIVEN a final, a proposed and an expired record  WHEN written and read back
    with Ledger(tmp_path / "h001.ledger.sqlite") as ledger:
        ledger.write(records)
        # THEN they are equal field by field (bytes, floats, None), ordered by session and counterparty
        assert ledger.records() == records
        assert [r.status for r in records] == ["final", "proposed", "expired"]
        assert ledger.records("run-8") == [records[2]]
        assert ledger.records("run-9") == []
        assert list(ledger.contracts()) == [records[0].contract]
        assert list(ledger.contracts("run-8")) == []


def test_a_later_record_of_the_same_trade_replaces_the_earlier(tmp_path: Path, records: list[ContractRecord]) -> None:
    final = records[0]
    proposed = replace(final, status="proposed", buyer_signature=None)
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.write([proposed])
        ledger.write([final])
        assert ledger.records() == [final]


def test_a_batch_is_one_transaction(tmp_path: Path, records: list[ContractRecord]) -> None:
    # GIVEN a batch whose second record violates the schema (role must be buyer or seller)
    broken = replace(records[1], role="broker")
    with Ledger(tmp_path / "l.sqlite") as ledger:
        # WHEN written  THEN it fails and nothing of the batch is stored
        with pytest.raises(sqlite3.IntegrityError):
            ledger.write([records[0], broken])
        assert ledger.records() == []
        ledger.write([])  # an empty step writes nothing
        assert ledger.records() == []


def test_records_survive_closing_and_reopening(tmp_path: Path, records: list[ContractRecord]) -> None:
    path = tmp_path / "deep" / "state" / "h001.ledger.sqlite"  # parent folders are created
    ledger = Ledger(path)
    ledger.write(records)
    # committed when write() returns: another connection sees it while the ledger is open
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*) FROM contracts").fetchone() == (3,)
    other.close()
    ledger.close()
    with Ledger(path) as reopened:
        assert reopened.records() == records


def test_the_ledger_is_wal_with_fsync_at_every_commit(ledger_path: Path) -> None:
    db = sqlite3.connect(ledger_path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persistent in the file
    db.close()
    with Ledger(ledger_path) as ledger:
        assert ledger._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL (per connection)


def test_session_reports(tmp_path: Path) -> None:
    report = {"converged": True, "trades": {"h002": [-1.5, 0.12]}, "payment": -0.18}
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        assert ledger.session_report("run-7") is None
        ledger.save_session("run-7", COMMUNITY, "admm", report)
        ledger.save_session("run-8", COMMUNITY, "negotiation", {"trades": {}})
        assert ledger.session_report("run-7") == report
    with Ledger(path) as ledger:
        assert ledger.session_report("run-7") == report
        assert [s[:3] for s in ledger.sessions()] == [("run-7", COMMUNITY, "admm"), ("run-8", COMMUNITY, "negotiation")]
        ledger.save_session("run-7", COMMUNITY, "admm", {"trades": {}})  # saved again: replaced
        assert ledger.session_report("run-7") == {"trades": {}}
        assert len(ledger.sessions()) == 2


@pytest.mark.parametrize("content", [b"hello, not a database" * 10, None], ids=["not SQLite", "a directory"])
def test_what_is_not_a_ledger_is_a_ledger_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.sqlite"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        Ledger(path)
    if content is not None:
        assert path.read_bytes() == content


# ---------------------------------------------------------------- audit


def test_audit_checks_finals_and_lists_the_rest(records: list[ContractRecord]) -> None:
    rows = audit(records, ROSTER)
    assert [(r["counterparty"], r["status"], r["check"]) for r in rows] == [
        ("h002", "final", "ok"),
        ("h003", "proposed", "-"),
        ("h004", "expired", "-"),
    ]
    assert rows[2]["reason"] == "no acceptable proposal before the deadline"
    assert "contract" in rows[0] and "contract" not in rows[1]
    assert Contract.from_dict(rows[0]["contract"]).verify(ROSTER).kwh == 1.5


def test_audit_of_the_buyers_ledger() -> None:
    _, buyer_records = settle()
    assert [(r["role"], r["check"]) for r in audit(buyer_records, ROSTER)] == [("buyer", "ok")]


@pytest.mark.parametrize(
    ("sql", "value", "why"),
    [
        ("UPDATE contracts SET terms = ? WHERE counterparty = 'h002'", "flip terms", "does not verify"),
        ("UPDATE contracts SET seller_sig = ? WHERE counterparty = 'h002'", "flip seller_sig", "does not verify"),
        ("UPDATE contracts SET buyer_sig = ? WHERE counterparty = 'h002'", "flip buyer_sig", "does not verify"),
        ("UPDATE contracts SET kwh = ? WHERE counterparty = 'h002'", 15.0, "terms differ from the record"),
        ("UPDATE contracts SET price = ? WHERE counterparty = 'h002'", 0.01, "terms differ from the record"),
        ("UPDATE contracts SET role = ? WHERE counterparty = 'h002'", "buyer", "other parties"),
        ("UPDATE contracts SET counterparty = ? WHERE counterparty = 'h002'", "h003x", "other parties"),
        ("UPDATE contracts SET buyer_sig = ? WHERE counterparty = 'h002'", None, "final without both signatures"),
        ("UPDATE contracts SET status = ? WHERE counterparty = 'h003'", "final", "final without both signatures"),
    ],
    ids=["terms", "seller sig", "buyer sig", "kwh", "price", "role", "counterparty", "no buyer sig", "proposed->final"],
)
def test_audit_flags_a_tampered_row(ledger_path: Path, sql: str, value: object, why: str) -> None:
    # GIVEN a row edited in the SQLite file
    with Ledger(ledger_path) as ledger:
        row = ledger.records("run-7")[0]
    column = {
        "flip terms": row.terms_bytes,
        "flip seller_sig": row.seller_signature,
        "flip buyer_sig": row.buyer_signature,
    }
    if isinstance(value, str) and value in column:
        original = column[value]
        assert original is not None
        value = _flip_last(original)
    tamper(ledger_path, sql, value)
    # WHEN audited  THEN exactly that row is BAD, naming why
    with Ledger(ledger_path) as ledger:
        rows = audit(ledger.records(), ROSTER)
    bad = [r for r in rows if r["check"].startswith("BAD")]
    assert len(bad) == 1 and why in bad[0]["check"], rows


def test_audit_flags_a_contract_whose_party_is_not_in_the_roster(records: list[ContractRecord]) -> None:
    partial = Roster({pid: key for pid, key in ROSTER.public_keys.items() if pid != "h002"})
    assert audit(records, partial)[0]["check"] == "BAD: unknown_sender: contract party not in roster (sender h002)"


@pytest.mark.parametrize(
    ("sql", "value"),
    [
        ("UPDATE contracts SET terms = substr(terms, 1, 10) WHERE counterparty = 'h002'", None),
        ("UPDATE contracts SET terms = ? WHERE counterparty = 'h002'", "89a7"),
        ("UPDATE contracts SET buyer_sig = ? WHERE counterparty = 'h002'", "0da2"),
    ],
    ids=["truncated terms", "terms as TEXT", "signature as TEXT"],
)
def test_audit_flags_undecodable_rows_instead_of_raising(ledger_path: Path, sql: str, value: object) -> None:
    """BUG: audit() calls contract.to_dict() for the JSON export after the check; for
    terms that do not decode it raises DecodeError (so `wattmesh ledger` prints no
    listing and exits 2 'malformed', not 1), and for a signature stored as TEXT
    (sqlite3 CLI: SET buyer_sig = '…') it raises AttributeError (a traceback)."""
    tamper(ledger_path, sql, *([] if value is None else [value]))
    with Ledger(ledger_path) as ledger:
        rows = audit(ledger.records(), ROSTER)
    assert [r["check"][:3] for r in rows] == ["BAD", "-", "-"]


def test_a_contract_accepted_within_the_kwh_tolerance_passes_the_buyers_audit() -> None:
    """BUG: the buyer countersigns terms within kwh_tolerance of its cleared figures
    (docs/contracts.md §6.3), but keeps its *cleared* kWh in the final record; audit()
    compares terms and record exactly and calls the buyer's own valid contract BAD
    (`wattmesh ledger` exits 1)."""
    _, buyer_records = settle(buyer_kwh=1.5 * (1 + 1e-10))
    (record,) = buyer_records
    assert record.status == "final" and record.contract is not None
    assert record.contract.verify(ROSTER).kwh == 1.5
    assert audit(buyer_records, ROSTER)[0]["check"] == "ok"


# ---------------------------------------------------------------- wattmesh ledger


def _the_one_error_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got {err!r}"
    assert err.startswith("wattmesh: ")
    return err.rstrip("\n")


TABLE = [
    "session                      counterparty   role          kWh     price  status    check",
    "run-7                        h002           seller     1.5000   0.12000  final     ok",
    "run-7                        h003           seller     0.5000   0.12000  proposed  -",
    "run-8                        h004           buyer      0.2500   0.20000  expired   -",
    "3 records, 1 final contracts, 0 failing verification",
]


def test_ledger_command_lists_and_checks(
    ledger_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == TABLE
    assert captured.err == ""
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path), "--session", "run-8"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        TABLE[0],
        TABLE[3],
        "1 records, 0 final contracts, 0 failing verification",
    ]


def test_ledger_command_exports_json(ledger_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path), "--export", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["counterparty"], r["status"], r["check"]) for r in rows] == [
        ("h002", "final", "ok"), ("h003", "proposed", "-"), ("h004", "expired", "-"),
    ]  # fmt: skip
    # an exported contract is verifiable on its own, by anyone with the roster
    terms = Contract.from_dict(rows[0]["contract"]).verify(ROSTER)
    assert (terms.seller, terms.buyer, terms.kwh, terms.price) == ("h001", "h002", 1.5, 0.12)
    assert rows[0]["contract"]["seller"] == "h001" and rows[0]["contract"]["time_ms"] == T0


def test_ledger_command_exports_csv(ledger_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path), "--export", "csv"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "session,counterparty,role,kwh,price,status,check,reason"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["counterparty"], r["kwh"], r["status"], r["check"], r["reason"]) for r in rows] == [
        ("h002", "1.5", "final", "ok", ""),
        ("h003", "0.5", "proposed", "-", ""),
        ("h004", "0.25", "expired", "-", "no acceptable proposal before the deadline"),
    ]


@pytest.mark.parametrize("export", [None, "json", "csv"])
def test_ledger_command_writes_to_a_file(
    ledger_path: Path, roster_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], export: str | None
) -> None:
    args = ["ledger", str(ledger_path), "--roster", str(roster_path)] + (["--export", export] if export else [])
    assert main(args) == 0
    shown = capsys.readouterr().out
    out = tmp_path / "export.txt"
    assert main([*args, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 3 records to {out}\n"
    assert out.read_text() == shown  # the same text, ending in one newline


def test_ledger_command_on_a_tampered_ledger_exits_1(
    ledger_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the final contract's kWh raised in the file
    with Ledger(ledger_path) as ledger:
        terms = ledger.records("run-7")[0].terms_bytes
    assert terms is not None
    tamper(ledger_path, "UPDATE contracts SET terms = ? WHERE counterparty = 'h002'", _flip_last(terms))
    # WHEN listed  THEN the listing shows it BAD, and one stderr line says so
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[1].startswith("run-7                        h002           seller")
    assert "final     BAD: bad_signature: contract signature does not verify" in lines[1]
    assert lines[-1] == "3 records, 1 final contracts, 1 failing verification"
    assert _the_one_error_line(captured.err) == f"wattmesh: 1 contract(s) in {ledger_path} fail verification"


def test_ledger_command_with_json_export_on_a_tampered_ledger_exits_1(
    ledger_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper(ledger_path, "UPDATE contracts SET price = 0.5 WHERE counterparty = 'h002'")
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path), "--export", "json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["check"] == "BAD: protocol: the terms differ from the record"
    _the_one_error_line(captured.err)


def test_ledger_command_on_a_missing_ledger(
    tmp_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.ledger.sqlite"
    assert main(["ledger", str(path), "--roster", str(roster_path)]) == 2
    captured = capsys.readouterr()
    assert _the_one_error_line(captured.err) == f"wattmesh: {path}: no such ledger file"
    assert captured.out == "" and not path.exists()


def test_ledger_command_on_a_file_that_is_not_sqlite(
    tmp_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h001.ledger.sqlite"
    path.write_text("[peers]\nh001 = 'not a ledger'\n")
    assert main(["ledger", str(path), "--roster", str(roster_path)]) == 2
    line = _the_one_error_line(capsys.readouterr().err)
    assert line == f"wattmesh: {path}: cannot open the ledger (file is not a database)"
    assert path.read_text() == "[peers]\nh001 = 'not a ledger'\n"


def test_ledger_command_on_another_programs_sqlite_file(
    tmp_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """BUG: an SQLite file with its own ``contracts`` table (another program's, or an
    older ledger format) ends in a traceback (sqlite3.OperationalError: no such column:
    session) instead of one line: Ledger checks the file only by running CREATE TABLE
    IF NOT EXISTS."""
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE contracts (id INTEGER PRIMARY KEY, customer TEXT)")
    db.close()
    assert main(["ledger", str(path), "--roster", str(roster_path)]) == 2
    assert "other.sqlite" in _the_one_error_line(capsys.readouterr().err)


def test_ledger_command_to_an_unwritable_out_file(
    ledger_path: Path, roster_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """BUG: --out in a folder that does not exist ends in a FileNotFoundError traceback
    (an OSError is neither a WattmeshError nor a ValueError in cli.main)."""
    out = tmp_path / "no-such-folder" / "export.json"
    assert main(["ledger", str(ledger_path), "--roster", str(roster_path), "--out", str(out)]) == 2
    assert str(out) in _the_one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "{path}: cannot read roster (No such file or directory)"),
        ("peers = [", "{path}: not valid TOML ("),
        ("[peers]\n", "{path}: peers: missing or empty [peers] table"),
        ('[peers]\nh001 = "abc"\n', "{path}: peers.h001: expected 64 hex digits (raw Ed25519 public key)"),
        (b"\xff\xfe[peers]", "{path}: not a roster (not UTF-8 text)"),
        ("dir", "{path}: cannot read roster (Is a directory)"),
    ],
    ids=["missing", "not TOML", "empty", "bad key", "not UTF-8", "a directory"],
)
def test_ledger_command_with_a_missing_or_bad_roster(
    ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes | None, expected: str
) -> None:
    path = tmp_path / "roster.toml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["ledger", str(ledger_path), "--roster", str(path)]) == 2
    captured = capsys.readouterr()
    assert _the_one_error_line(captured.err).startswith("wattmesh: " + expected.format(path=path))
    assert captured.out == ""


def test_ledger_command_with_a_roster_that_lacks_a_party(
    ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other-roster.toml"
    path.write_text(Roster({"h001": ROSTER["h001"]}).to_toml())
    assert main(["ledger", str(ledger_path), "--roster", str(path)]) == 1
    captured = capsys.readouterr()
    assert "BAD: unknown_sender: contract party not in roster (sender h002)" in captured.out
    _the_one_error_line(captured.err)


def test_the_docs_example_is_what_the_command_prints(
    tmp_path: Path, roster_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/contracts.md §8: h001 sold 1.5 kWh to h002 and waited in vain to buy 0.4 kWh
    from h003, in session run-7; the console block is the command's real output."""
    seller = _core("h001", "run-7", {"h002": (-1.5, 0.12), "h003": (0.4, 0.12)})
    buyer = _core("h002", "run-7", {"h001": (1.5, 0.12)})
    buyer.start(T0)
    _pass(_pass(seller.start(T0), "h001", "run-7", buyer, T0 + 40), "h002", "run-7", seller, T0 + 80)
    seller.on_timer(T0 + 65_000)
    path = tmp_path / "result.d" / "state" / "h001.ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.write(seller.records.values())
    doc = (Path(__file__).resolve().parents[2] / "docs" / "contracts.md").read_text(encoding="utf-8")
    block = doc.split("```console\n", 1)[1].split("```", 1)[0]
    shown: list[str] = []
    for line in block.splitlines():
        if line.startswith("$ wattmesh ledger "):
            args = line.removeprefix("$ wattmesh ").split()
            args[1], args[3] = str(path), str(roster_path)
            assert main(args) == 0
            shown += ["$ " + line[2:], *capsys.readouterr().out.splitlines()]
    assert shown == block.splitlines()
