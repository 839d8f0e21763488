"""``wattmesh broker``: run one broker in the foreground until Ctrl-C or SIGTERM.

Usage::

    wattmesh broker [--kind auto|embedded|mosquitto] [--host 127.0.0.1] [--port 1883]
    wattmesh broker --secure --roster ROSTER.toml --community NAME --out DIR
                    [--monitor ID ...] [--tls CA_DIR] [--host ...] [--port ...]

It prints one line saying which broker listens at which URL. Failures (port in use,
Mosquitto asked for but missing, bad arguments) are one line on stderr and exit code 2.

``--secure`` runs Mosquitto with per-peer identities and the community's ACL
(docs/security.md): it writes ``DIR/acl``, ``DIR/passwords`` and one
``DIR/credentials/<id>.password`` per peer and monitor (reused when they exist, so a
restart keeps the passwords already handed out) and prints where they are. SIGHUP
re-reads the roster, rewrites the files and reloads Mosquitto (a removed peer is
refused from then on). With
``--tls CA_DIR`` (made by ``wattmesh ca init``) the listener speaks TLS and takes each
peer's identity from its client certificate instead of a password.

:func:`register_subcommands` adds ``wattmesh ca init DIR`` and ``wattmesh ca issue DIR
PEER_ID...`` (:mod:`wattmesh.broker.ca`) to the main ``wattmesh`` parser.

The hidden form ``python -m wattmesh.broker embedded --host H --port P`` is the body of
the embedded broker's child process (see :mod:`wattmesh.broker.launch`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from wattmesh.broker.launch import KINDS, BrokerHandle, BrokerProcess, resolve_kind
from wattmesh.broker.mosquitto import MosquittoConfig, MosquittoSecurity, mosquitto_config_text
from wattmesh.broker.security import DEFAULT_MONITOR, SecurityFiles, write_security
from wattmesh.protocols.errors import ScenarioError, WattmeshError
from wattmesh.protocols.identity import Roster

__all__ = ["main", "register_subcommands"]

_PROG = "wattmesh broker"
# How often the foreground command looks whether its broker is still alive [s].
_WATCH_SECONDS = 0.5


class _UsageError(Exception):
    """A bad command line; argparse would print the usage block and exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's signature says NoReturn
        raise _UsageError(message)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def _parser() -> _Parser:
    parser = _Parser(prog=_PROG, description="Run an MQTT broker for a wattmesh community.")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="auto = Mosquitto when installed, else the embedded amqtt broker (default: auto)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        help="port to listen on, 0 = any free port (default: 1883, 8883 with --tls)",
    )
    secure = parser.add_argument_group("access control (Mosquitto only, see docs/security.md)")
    secure.add_argument(
        "--secure", action="store_true", help="per-peer identities and the community's ACL; no anonymous clients"
    )
    secure.add_argument("--roster", type=Path, help="the community roster: one identity per peer id")
    secure.add_argument("--community", help="the community id (topic root wattmesh/v1/<community>)")
    secure.add_argument("--out", type=Path, help="directory for the ACL, password file and per-peer credentials")
    secure.add_argument(
        "--monitor",
        action="append",
        help=f"a read-only identity (repeatable; default: {DEFAULT_MONITOR})",
    )
    secure.add_argument(
        "--tls",
        type=Path,
        metavar="CA_DIR",
        help="TLS listener; identities from client certificates of this CA (wattmesh ca init/issue)",
    )
    return parser


def _embedded_parser() -> _Parser:
    parser = _Parser(prog="python -m wattmesh.broker embedded")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=_port, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``wattmesh broker`` command.

    Args:
        argv: arguments after the command name; ``None`` reads ``sys.argv``.

    Returns:
        The exit code: 0 after Ctrl-C or SIGTERM, 2 on any failure (one line on
        stderr), 130 for Ctrl-C before the broker was up.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args[:1] == ["embedded"]:
            options = _embedded_parser().parse_args(args[1:])
            return _run_embedded(options.host, options.port)
        options = _parser().parse_args(args)
        return _run_foreground(options)
    except _UsageError as exc:
        print(f"{_PROG}: {exc} (see --help)", file=sys.stderr)
    except WattmeshError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130
    return 2


def _run_foreground(options: argparse.Namespace) -> int:
    """Start a broker child, announce it, and watch it until a signal arrives."""
    security, files = _prepare_security(options) if options.secure else (None, None)
    if not options.secure:
        given = [f"--{name}" for name in ("roster", "community", "out", "monitor", "tls") if getattr(options, name)]
        if given:
            raise _UsageError(f"{given[0]} needs --secure")
    port = options.port
    if port is None:
        port = 8883 if options.tls else 1883
    stop, reload = threading.Event(), threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    if security is not None:  # kill -HUP: the roster changed, rewrite the files and reload
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload.set())
    process = BrokerProcess(options.kind, options.host, port or None, security=security)
    try:
        handle = process.start()
        if security is not None and files is not None:
            _announce_security(options, security, files, handle)
        hint = ", kill -HUP to reload the roster" if security is not None else ""
        print(f"{handle.kind} broker listening on {handle.url} (Ctrl-C to stop{hint})", flush=True)
        while not stop.wait(_WATCH_SECONDS):
            process.check()
            if reload.is_set():
                reload.clear()
                _reload_security(options, process)
        return 0
    finally:
        process.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _prepare_security(options: argparse.Namespace) -> tuple[MosquittoSecurity, SecurityFiles]:
    """Check the ``--secure`` options and write the ACL and credentials they ask for."""
    missing = [f"--{name}" for name in ("roster", "community", "out") if getattr(options, name) is None]
    if missing:
        raise _UsageError(f"--secure needs {', '.join(missing)}")
    if resolve_kind(options.kind) != "mosquitto":
        raise _UsageError("--secure needs Mosquitto (per-peer ACLs); the embedded broker has none")
    roster = _load_roster(options.roster)
    monitors = options.monitor or [DEFAULT_MONITOR]
    out = options.out.resolve()
    files = write_security(out, options.community, roster, monitors, passwords=options.tls is None)
    if options.tls is None:
        assert files.password_file is not None
        return MosquittoSecurity(files.acl, password_path=files.password_file), files
    from wattmesh.broker.ca import server_files

    tls = server_files(options.tls.resolve())
    for path in (tls.ca, tls.cert, tls.key):
        if not path.is_file():
            raise WattmeshError(f"{path} is missing: make the CA with 'wattmesh ca init {options.tls}'")
    return MosquittoSecurity(files.acl, tls=tls), files


def _reload_security(options: argparse.Namespace, process: BrokerProcess) -> None:
    """Rewrite ACL and credentials from the (changed) roster and make Mosquitto re-read them."""
    try:
        files = _prepare_security(options)[1]
    except (WattmeshError, ValueError, _UsageError) as exc:
        print(f"{_PROG}: reload failed, the broker keeps its previous files: {exc}", file=sys.stderr, flush=True)
        return
    process.reload()
    print(f"reloaded: {len(files.peers)} peer(s) of community {options.community}", flush=True)


def _load_roster(path: Path) -> Roster:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(str(path), "", f"cannot read roster ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ScenarioError(str(path), "", "not a roster (not UTF-8 text)") from None
    return Roster.from_toml(text, source=str(path))


def _announce_security(
    options: argparse.Namespace, security: MosquittoSecurity, files: SecurityFiles, handle: BrokerHandle
) -> None:
    """Say where everything is, and keep a copy of the config runnable without wattmesh."""
    config = MosquittoConfig(handle.port, handle.host, security=security)
    config_path = files.directory / "mosquitto.conf"
    config_path.write_text(mosquitto_config_text(config))
    identities = f"{len(files.peers)} peer(s), read-only: {', '.join(files.monitors)}"
    print(f"access control: community {options.community}, {identities}; ACL {files.acl}", flush=True)
    if security.tls is None:
        print(
            f"credentials: {files.directory / 'credentials'}/<id>.password "
            "(username = id; give each peer only its own file)",
            flush=True,
        )
    else:
        print(
            f"client certificates: wattmesh ca issue {options.tls} PEER_ID (identity = certificate CN)",
            flush=True,
        )
    print(f"config: {config_path} (also runs as: mosquitto -c {config_path})", flush=True)


def register_subcommands(subparsers: Any) -> None:
    """Add ``wattmesh ca ...`` to the main parser's subcommands (``peer/cli.py``).

    The handlers return an exit code and raise :class:`WattmeshError` or
    ``ValueError`` for user mistakes, which the main command turns into one line.
    """
    ca = subparsers.add_parser("ca", help="a community CA: TLS certificates for the broker and the peers")
    actions = ca.add_subparsers(dest="ca_action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create the CA and the broker's server certificate in DIR")
    init.add_argument("dir", type=Path, help="directory for the CA (created if missing)")
    init.add_argument(
        "--name",
        action="append",
        help="a host name or IP address clients use to reach the broker (repeatable; "
        "default: localhost, 127.0.0.1, ::1)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA (revokes all its certificates)")
    init.set_defaults(func=_cmd_ca_init)
    issue = actions.add_parser("issue", help="issue client certificates (Common Name = peer id)")
    issue.add_argument("dir", type=Path, help="the CA directory")
    issue.add_argument("peer_ids", nargs="+", metavar="PEER_ID", help="peer or monitor id(s)")
    issue.add_argument("--force", action="store_true", help="replace existing certificates and keys")
    issue.set_defaults(func=_cmd_ca_issue)


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from wattmesh.broker.ca import DEFAULT_SERVER_NAMES, init_ca

    names = args.name or list(DEFAULT_SERVER_NAMES)
    try:
        files = init_ca(args.dir, server_names=names, overwrite=args.force)
    except (FileExistsError, FileNotFoundError) as exc:
        raise WattmeshError(str(exc)) from None
    print(f"CA: {files.ca} (key {args.dir / 'ca.key'}, mode 0600: keep it off the broker if you can)", flush=True)
    print(f"broker certificate: {files.cert} and {files.key} for {', '.join(names)}", flush=True)
    print(f"next: wattmesh ca issue {args.dir} PEER_ID ...; wattmesh broker --secure --tls {args.dir} ...", flush=True)
    return 0


def _cmd_ca_issue(args: argparse.Namespace) -> int:
    from wattmesh.broker.ca import issue_peer

    for peer_id in args.peer_ids:
        try:
            files = issue_peer(args.dir, peer_id, overwrite=args.force)
        except (FileExistsError, FileNotFoundError) as exc:
            raise WattmeshError(str(exc)) from None
        print(f"{peer_id}: {files.cert} and {files.key} (with {files.ca})", flush=True)
    return 0


class _OneLineFormatter(logging.Formatter):
    """Log records without tracebacks.

    amqtt logs expected failures (port in use, a client resetting its connection)
    with ``logger.exception``; one line per record keeps the stderr tail that
    ``BrokerUnavailable`` quotes readable.
    """

    def formatException(self, ei: Any) -> str:
        return ""


def _run_embedded(host: str, port: int) -> int:
    """Serve the embedded broker in this process until SIGINT or SIGTERM."""
    # Imported here: amqtt is only loaded by the broker child itself.
    from wattmesh.broker.embedded import serve

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    asyncio.run(serve(host, port))
    return 0
