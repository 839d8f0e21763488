"""The ``wattmesh`` command line. It owns all terminal output.

Every :class:`WattmeshError` (bad scenario, unreachable broker, failed run) becomes one
line on stderr and exit status 2; a traceback means a bug in wattmesh.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

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
    from wattmesh.peer.launcher import RunOptions, load_scenario, run_scenario

    scenario = load_scenario(Path(args.scenario))
    out = Path(args.out or f"{scenario.name}-result.json")
    options = RunOptions(
        broker=args.broker, out=out, peers_per_process=args.peers_per_process,
        timeout_s=args.timeout, progress=_say,
    )  # fmt: skip
    _say(f"{scenario.name}: {len(scenario.peers)} peers, mechanism {scenario.public.mechanism}")
    result = asyncio.run(run_scenario(scenario, options))
    _say(_summary(result))
    _say(f"result: {out}")
    return 0 if result["converged"] else 1


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

    run = sub.add_parser("run", help="run every peer of a scenario on this host")
    run.add_argument("scenario", help="scenario TOML file")
    run.add_argument(
        "--broker", default="auto",
        help="auto (Mosquitto if installed, else embedded), embedded, mosquitto, or mqtt://host:port",
    )  # fmt: skip
    run.add_argument("--out", help="result JSON (default: NAME-result.json)")
    run.add_argument("--peers-per-process", type=int, default=1, metavar="K", help="packed mode: K peers per OS process")
    run.add_argument("--timeout", type=float, default=900.0, help="deadline for the whole run [s]")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
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


