"""``wattmesh broker``: run one broker in the foreground until Ctrl-C or SIGTERM.

Usage::

    wattmesh broker [--kind auto|embedded|mosquitto] [--host 127.0.0.1] [--port 1883]

It prints one line saying which broker listens at which URL. Failures (port in use,
Mosquitto asked for but missing, bad arguments) are one line on stderr and exit code 2.

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
from typing import Any

from wattmesh.broker.launch import KINDS, BrokerProcess
from wattmesh.protocols.errors import WattmeshError

__all__ = ["main"]

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
        default=1883,
        help="port to listen on, 0 = any free port (default: 1883)",
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
        return _run_foreground(options.kind, options.host, options.port or None)
    except _UsageError as exc:
        print(f"{_PROG}: {exc} (see --help)", file=sys.stderr)
    except WattmeshError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 130
    return 2


def _run_foreground(kind: str, host: str, port: int | None) -> int:
    """Start a broker child, announce it, and watch it until a signal arrives."""
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    process = BrokerProcess(kind, host, port)
    try:
        handle = process.start()
        print(f"{handle.kind} broker listening on {handle.url} (Ctrl-C to stop)", flush=True)
        while not stop.wait(_WATCH_SECONDS):
            process.check()
        return 0
    finally:
        process.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
