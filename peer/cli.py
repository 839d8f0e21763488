"""The ``wattmesh`` command line. It owns all terminal output.

Every :class:`WattmeshError` (bad scenario, unreachable broker, failed run) becomes one
line on stderr and exit status 2; a traceback means a bug in wattmesh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from wattmesh.protocols.errors import WattmeshError
from wattmesh.protocols.identity import check_peer_id

__all__ = ["main"]


def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from wattmesh.peer.keys import describe_key, generate_key

    check_peer_id(args.peer_id)
    path = Path(args.out or f"{args.peer_id}.key")
    try:
        key = generate_key(path, overwrite=args.force)
    except FileExistsError as exc:
        raise WattmeshError(str(exc)) from None
    _say(f"wrote {path} (mode 0600); roster line:")
    _say(f'{args.peer_id} = "{describe_key(key)}"')
    return 0


def _cmd_broker(args: argparse.Namespace) -> int:
    from wattmesh.broker.command import main as broker_main

    return broker_main(args.rest)


def _cmd_run(args: argparse.Namespace) -> int:
    from wattmesh.peer.launcher import load_scenario

    scenario = load_scenario(Path(args.scenario))
    out = Path(args.out or f"{scenario.name}-result.json")
    return _run_with_view(scenario, out, args.broker, args.peers_per_process, args.timeout, report=not args.no_report)


def _cmd_peer(args: argparse.Namespace) -> int:
    import signal

    from wattmesh.peer.gateway import Gateway
    from wattmesh.peer.gateway_config import load_gateway_config

    config = load_gateway_config(Path(args.config))
    gateway = Gateway(config)  # checks the key against the roster, opens the ledger
    if args.check:
        gateway.close()
        _say(f"{args.config}: ok (peer {config.peer_id}, community {config.community}, every {config.interval_s:g} s)")
        return 0
    # a service's log: plain sentences, journald adds the time
    logging.getLogger().setLevel(logging.INFO if not args.quiet else logging.WARNING)

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def terminate() -> None:
            logging.getLogger("wattmesh.peer.gateway").info("%s: SIGTERM: stopping", config.peer_id)
            stop.set()
            task.cancel()  # a session in progress ends now; its ledger writes are atomic

        loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            results = await gateway.serve(intervals=args.intervals, stop=stop, not_before=args.not_before)
        except asyncio.CancelledError:
            return 0
        return 0 if all(r.status != "failed" for r in results) or args.intervals is None else 1

    try:
        return asyncio.run(serve())
    finally:
        gateway.close()


def _cmd_ledger(args: argparse.Namespace) -> int:
    import csv

    from wattmesh.peer.keys import load_roster
    from wattmesh.peer.ledger import Ledger, LedgerError, audit

    path = Path(args.ledger)
    if not path.is_file():
        raise LedgerError(f"{path}: no such ledger file")
    roster = load_roster(Path(args.roster))
    with Ledger(path, read_only=True) as ledger:
        rows = audit(ledger.records(args.session), roster)
    bad = [r for r in rows if r["check"].startswith("BAD")]
    if args.export == "json":
        text = json.dumps(rows, indent=1)
    elif args.export == "csv":
        import io

        buffer = io.StringIO()
        fields = ["session", "counterparty", "role", "kwh", "price", "status", "check", "reason"]
        writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        lines = [f"{'session':<28} {'counterparty':<14} {'role':<6} {'kWh':>10} {'price':>9}  {'status':<9} check"]
        for r in rows:
            lines.append(
                f"{r['session'][:28]:<28} {r['counterparty'][:14]:<14} {r['role']:<6} {r['kwh']:>10.4f} "
                f"{r['price']:>9.5f}  {r['status']:<9} {r['check']}"
            )
        finals = sum(r["status"] == "final" for r in rows)
        lines.append(f"{len(rows)} records, {finals} final contracts, {len(bad)} failing verification")
        text = "\n".join(lines)
    if args.out:
        try:
            Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
        except OSError as exc:
            raise WattmeshError(f"{args.out}: cannot write ({exc.strerror})") from None
        _say(f"wrote {len(rows)} records to {args.out}")
    else:
        _say(text.rstrip("\n"))
    if bad:
        print(f"wattmesh: {len(bad)} contract(s) in {path} fail verification", file=sys.stderr)
        return 1
    return 0


def _run_with_view(scenario: Any, out: Path, broker: str, per_process: int, timeout: float, *, report: bool) -> int:
    """Run a scenario showing the live monitor view (or progress lines when not a terminal)."""
    from wattmesh.peer.launcher import RunOptions, run_scenario

    _say(f"{scenario.name}: {len(scenario.peers)} peers, mechanism {scenario.public.mechanism}")
    live, watch = _live_view()
    options = RunOptions(
        broker=broker, out=out, peers_per_process=per_process, timeout_s=timeout,
        progress=_say if live is None else live.console.print, watch=watch,
    )  # fmt: skip
    try:
        if live is not None:
            with live:
                result = asyncio.run(run_scenario(scenario, options))
        else:
            result = asyncio.run(run_scenario(scenario, options))
    finally:
        if live is not None:
            live.stop()
    _say(_summary(result))
    _say(f"result: {out}")
    if report:
        _write_report(result, out)
    return 0 if result["converged"] else 1


def _live_view() -> tuple[Any, Any]:
    """A rich Live view when stdout is a terminal and rich is installed, else (None, None)."""
    if not sys.stdout.isatty():
        return None, None
    try:
        from rich.live import Live

        from wattmesh.peer.monitor import render
    except ImportError:
        return None, None
    live = Live(refresh_per_second=4, transient=False)

    def watch(state: Any, now: float) -> None:
        live.update(render(state.snapshot(now)))

    return live, watch


def _write_report(result: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib  # noqa: F401

        from wattmesh.peer.report import write_report
    except ImportError:
        _say("report: plots need the demo extra: pip install 'wattmesh[demo]'")
        return []
    directory = out.with_name(f"{out.stem}-report")
    files = write_report(result, directory)
    _say(f"report: {directory}/ ({', '.join(f.name for f in files)})")
    return files


def _cmd_monitor(args: argparse.Namespace) -> int:
    from wattmesh.peer.keys import load_private_key, load_roster
    from wattmesh.peer.monitor import watch

    roster = load_roster(Path(args.roster))
    if args.key:
        key = load_private_key(Path(args.key))
    else:  # a throw-away identity: the monitor only reads
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
    state = asyncio.run(
        watch(args.broker, args.community, roster, key, peer_id=args.id, expected_peers=args.peers,
              until_settled=not args.follow, timeout_s=args.timeout)
    )  # fmt: skip
    if args.out:
        import dataclasses

        Path(args.out).write_text(json.dumps([dataclasses.asdict(h) for h in state.history()], indent=1))
        _say(f"history: {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from wattmesh.peer.generate import generate_community
    from wattmesh.protocols.scenario import parse_scenario

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    text = generate_community(
        homes=args.homes, seed=args.seed, date="2026-06-21", hour=13, location="greensboro",
        topology="full", grid=(0.30, 0.08), fee=0.002, name="demo",
    )  # fmt: skip
    scenario_path = directory / "demo.toml"
    scenario_path.write_text(text)
    _say(f"demo community: {args.homes} homes on 21 June 13:00 (PV from pvlib TMY, loads from BDEW) -> {scenario_path}")
    scenario = parse_scenario(text, source=str(scenario_path))
    out = directory / "result.json"
    status = _run_with_view(scenario, out, args.broker, 1, 300.0, report=True)
    _say(f"files: {directory}/ (demo.toml, result.json, result-report/, result.d/ keys+logs)")
    return status


def _cmd_scenario_generate(args: argparse.Namespace) -> int:
    from wattmesh.peer.generate import run_generate_command

    return run_generate_command(args, _say)


def _summary(result: dict[str, object]) -> str:
    social, alone = result["social_cost"], result["grid_only_cost"]
    saving = ""
    if isinstance(alone, float) and isinstance(social, float):
        saving = f", saving {alone - social:.4f} vs grid only ({alone:.4f})"
    state = "converged" if result["converged"] else "NOT converged"
    return (
        f"{state} in {result['iterations']} iterations, {result['wall_seconds']} s; "
        f"social cost {social:.4f}{saving}; {len(result['trades'])} trades; "  # type: ignore[arg-type]
        f"{result['messages']['published']} messages"  # type: ignore[index]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wattmesh", description="Peer-to-peer energy sharing with no central optimizer."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = sub.add_parser("keygen", help="create a peer's Ed25519 key file")
    keygen.add_argument("peer_id", help="the peer's id ([a-z0-9-])")
    keygen.add_argument("--out", help="key file (default: PEER_ID.key)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.set_defaults(func=_cmd_keygen)

    broker = sub.add_parser("broker", help="run an MQTT broker (embedded amqtt or Mosquitto)", add_help=False)
    broker.add_argument("rest", nargs=argparse.REMAINDER)
    broker.set_defaults(func=_cmd_broker)
    from wattmesh.broker.command import register_subcommands  # `wattmesh ca init|issue`

    register_subcommands(sub)

    run = sub.add_parser("run", help="run every peer of a scenario on this host")
    run.add_argument("scenario", help="scenario TOML file")
    run.add_argument(
        "--broker", default="auto",
        help="auto (Mosquitto if installed, else embedded), embedded, mosquitto, or mqtt://host:port",
    )  # fmt: skip
    run.add_argument("--out", help="result JSON (default: NAME-result.json)")
    run.add_argument("--peers-per-process", type=int, default=1, metavar="K", help="packed mode: K peers per OS process")
    run.add_argument("--timeout", type=float, default=900.0, help="deadline for the whole run [s]")
    run.add_argument("--no-report", action="store_true", help="skip the PNG plots and summary")
    run.set_defaults(func=_cmd_run)

    peer = sub.add_parser("peer", help="run one home's peer: trade every market interval (home gateway)")
    peer.add_argument("config", help="the home's config file (docs/deploy.md)")
    peer.add_argument("--intervals", type=int, help="stop after this many intervals (default: run until SIGTERM)")
    peer.add_argument("--check", action="store_true", help="validate the config and exit")
    peer.add_argument(
        "--not-before", type=float, metavar="EPOCH_S",
        help="first trade in the interval starting at or after this Unix time (homes rolled out together)",
    )  # fmt: skip
    peer.add_argument("--quiet", action="store_true", help="log warnings only")
    peer.set_defaults(func=_cmd_peer)

    ledger = sub.add_parser("ledger", help="list, export and verify a peer's signed contracts")
    ledger.add_argument("ledger", help="the peer's ledger file (e.g. result.d/state/h01.ledger.sqlite)")
    ledger.add_argument("--roster", required=True, help="community roster: every signature is checked against it")
    ledger.add_argument("--session", help="only this market session")
    ledger.add_argument("--export", choices=("json", "csv"), help="machine-readable output instead of a table")
    ledger.add_argument("--out", help="write to this file instead of stdout")
    ledger.set_defaults(func=_cmd_ledger)

    demo = sub.add_parser("demo", help="a realistic community of ~20 homes, live view and report")
    demo.add_argument("--homes", type=int, default=20)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--broker", default="auto", help="auto, embedded, mosquitto or mqtt://host:port")
    demo.add_argument("--dir", default="wattmesh-demo", help="where the files go")
    demo.set_defaults(func=_cmd_demo)

    monitor = sub.add_parser("monitor", help="watch a community's market live (read-only peer)")
    monitor.add_argument("--broker", required=True, help="mqtt://host:port")
    monitor.add_argument("--community", required=True)
    monitor.add_argument("--roster", required=True, help="the community roster (verifies every message)")
    monitor.add_argument("--key", help="the monitor's own key file (default: a throw-away key)")
    monitor.add_argument("--id", default="monitor", help="the monitor's peer id")
    monitor.add_argument("--peers", type=int, help="how many peers to expect")
    monitor.add_argument("--follow", action="store_true", help="keep watching after the market settles")
    monitor.add_argument("--timeout", type=float, help="stop after this many seconds")
    monitor.add_argument("--out", help="write the per-iteration history as JSON")
    monitor.set_defaults(func=_cmd_monitor)

    scenario = sub.add_parser("scenario", help="work with scenario files")
    scenario_sub = scenario.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = scenario_sub.add_parser(
        "generate", help="a community from pvlib weather and BDEW load profiles (needs [demo])"
    )
    add = generate.add_argument
    add("--homes", type=int, required=True, help="number of homes (h001, ...)")
    add("--seed", type=int, required=True, help="seed of every random draw")
    add("--date", required=True, help="day, YYYY-MM-DD")
    add("--hour", type=int, required=True, help="market hour H = [H:00, H+1:00), 0-23")
    add("--location", default="greensboro", help="greensboro, miami or sand-point")
    add("--topology", default="full", help="full, ring:K or random:K")
    add("--grid-buy", type=float, default=0.30, help="grid buy price [currency/kWh]")
    add("--grid-sell", type=float, default=0.08, help="grid sell price [currency/kWh]")
    add("--fee", type=float, default=0.0, help="market.fee [currency/kWh]")
    add("--name", help="community name (default: the file's stem if valid, else community)")
    add("--out", required=True, help="scenario TOML file to write")
    generate.set_defaults(func=_cmd_scenario_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["broker"]:  # its own parser: argparse's REMAINDER refuses leading options (--kind ...)
        return _cmd_broker(argparse.Namespace(rest=argv[1:]))
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except WattmeshError as exc:
        print(f"wattmesh: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad argument values from the command line
        print(f"wattmesh: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wattmesh: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


