"""Start and stop a broker in its own OS process, and know when it is ready.

Each broker is a child process, Mosquitto as ``mosquitto -c <generated config>`` and the
embedded amqtt broker as ``python -m wattmesh.broker embedded``, so it gets its own CPU
core (the peers' signature checks keep the parent's busy) and a broker crash never
takes the caller down. The child runs in its own session: Ctrl-C in a terminal reaches
only the caller, which stops the broker after its peers have said goodbye.

Ready means: the child is alive and answers an MQTT CONNECT on its port. Everything the
child says (stderr, Mosquitto's log) goes to files in a private temporary directory,
never to a pipe nobody reads (a full pipe would freeze the broker), and its last lines
go into :class:`BrokerUnavailable` when it does not come up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, NoReturn, cast, get_args

from wattmesh.broker.errors import BrokerUnavailable
from wattmesh.broker.mosquitto import MosquittoConfig, MosquittoSecurity, find_mosquitto, mosquitto_config_text

__all__ = [
    "KINDS",
    "BrokerHandle",
    "BrokerKind",
    "BrokerProcess",
    "format_address",
    "free_port",
    "resolve_kind",
    "start_broker",
]

logger = logging.getLogger(__name__)

BrokerKind = Literal["embedded", "mosquitto"]
KINDS: tuple[str, ...] = ("auto", *get_args(BrokerKind))

_POLL_SECONDS = 0.02
_STOP_SECONDS = 5.0
_TAIL_LINES = 5


def format_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 literal in brackets as in URLs and amqtt's ``bind``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def die_with_parent() -> None:
    """``preexec_fn`` for child processes: SIGTERM the child when its parent dies.

    A launcher killed outright (kill -9, a crashed terminal) would otherwise leave its
    broker and peer processes running on the machine. Linux only; elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    The port is only free until someone else takes it; callers bind it at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def resolve_kind(kind: str) -> BrokerKind:
    """The concrete broker for ``kind``: ``"auto"`` is Mosquitto when installed, else embedded.

    Raises:
        ValueError: ``kind`` is not ``"auto"``, ``"embedded"`` or ``"mosquitto"``.
    """
    if kind == "auto":
        binary = find_mosquitto()
        if binary:
            logger.info("auto broker: Mosquitto (%s)", binary)
            return "mosquitto"
        logger.info("auto broker: Mosquitto is not installed, using the embedded amqtt broker")
        return "embedded"
    if kind not in KINDS:
        raise ValueError(f"broker kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return cast(BrokerKind, kind)


@dataclass(frozen=True, slots=True)
class BrokerHandle:
    """Where a started broker listens; what clients need to reach it.

    Attributes:
        kind: what was started (``"auto"`` already resolved).
        host: listening address.
        port: listening port.
        tls: the listener speaks TLS (and wants a client certificate).
    """

    kind: BrokerKind
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        """``mqtt://host:port``, or ``mqtts://host:port`` for a TLS listener."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{format_address(self.host, self.port)}"


class BrokerProcess:
    """One broker child process; synchronous, for the CLI, benchmarks and threads.

    Use as ``with BrokerProcess("auto") as handle: ...`` or call :meth:`start` and
    :meth:`stop`. In asyncio code use :func:`start_broker`.

    Args:
        kind: ``"auto"``, ``"embedded"`` or ``"mosquitto"``.
        host: address to listen on.
        port: port to listen on; ``None`` picks a free one at :meth:`start`.
        ready_timeout: seconds the broker may take to answer [s].
        security: Mosquitto only: passwords or client certificates and an ACL
            (:mod:`wattmesh.broker.security`); ``None`` = anyone may connect.

    Raises:
        ValueError: unknown ``kind``, or ``security`` for a broker that is not Mosquitto.
    """

    def __init__(
        self,
        kind: str = "auto",
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        ready_timeout: float = 10.0,
        security: MosquittoSecurity | None = None,
    ) -> None:
        self.kind: BrokerKind = resolve_kind(kind)
        if security is not None and self.kind != "mosquitto":
            raise ValueError(f"access control needs Mosquitto, not the {self.kind} broker")
        self.security = security
        self.host = host
        self._requested_port = port
        self._ready_timeout = ready_timeout
        self._handle: BrokerHandle | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None

    @property
    def handle(self) -> BrokerHandle:
        """Where the started broker listens.

        Raises:
            RuntimeError: not started.
        """
        if self._handle is None:
            raise RuntimeError("broker not started")
        return self._handle

    @property
    def config_path(self) -> Path | None:
        """The generated ``mosquitto.conf`` while a Mosquitto runs, else ``None``."""
        if self.kind != "mosquitto" or self._workdir is None:
            return None
        return self._workdir / "mosquitto.conf"

    def check(self) -> None:
        """Raise if the started broker has exited since; for callers that watch it.

        Raises:
            BrokerUnavailable: it exited (the message quotes its last output); its
                files are removed before raising.
            RuntimeError: not started.
        """
        if self._process is None:
            raise RuntimeError("broker not started")
        if (code := self._process.poll()) is not None:
            self._fail(f"exited unexpectedly with code {code}")

    def start(self) -> BrokerHandle:
        """Start the broker and wait until it answers.

        Raises:
            BrokerUnavailable: Mosquitto missing, port in use, or the broker exited or
                stayed deaf past ``ready_timeout``; nothing is left running.
            RuntimeError: already started.
        """
        deadline = self._spawn()
        try:
            while not self._is_ready(deadline):
                time.sleep(_POLL_SECONDS)
        except BaseException:  # Ctrl-C while waiting must not leave an orphan broker
            self.stop()
            raise
        return self.handle

    def reload(self) -> None:
        """Make Mosquitto re-read its ACL and password file (SIGHUP).

        For a changed roster: rewrite the files (:func:`~wattmesh.broker.security.write_security`),
        then reload. Mosquitto applies the new ACL to connected clients too, refuses
        new logins of removed identities and, with ``check_retain_source``, stops
        delivering what they left retained. It reloads asynchronously.

        Raises:
            RuntimeError: not started, or not Mosquitto.
        """
        if self._process is None:
            raise RuntimeError("broker not started")
        if self.kind != "mosquitto":
            raise RuntimeError(f"the {self.kind} broker has no configuration to reload")
        self._process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s) and remove its files.

        Safe to call more than once and on a broker that never started. A broker that
        had crashed, or exits with an error, is logged as a warning with its last output.
        """
        self._stop(report_crash=True)

    def _stop(self, *, report_crash: bool) -> None:
        process, self._process = self._process, None
        if process is not None:
            stopping = process.poll() is None
            if stopping:
                process.terminate()
                try:
                    process.wait(_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "%s broker ignored SIGTERM for %.0f s, killing it", self.kind, _STOP_SECONDS
                    )
                    process.kill()
                    process.wait()
            # Dying of our SIGTERM (or SIGKILL, reported above) is a clean stop.
            expected = (0, -signal.SIGTERM, -signal.SIGKILL) if stopping else (0,)
            if report_crash and process.returncode not in expected:
                logger.warning(
                    "%s broker exited with code %s: %s",
                    self.kind,
                    process.returncode,
                    self._output_tail(),
                )
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._handle = None

    def __enter__(self) -> BrokerHandle:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> float:
        """Launch the child without waiting for it; return the readiness deadline."""
        if self._process is not None:
            raise RuntimeError("broker already started")
        mosquitto = find_mosquitto() if self.kind == "mosquitto" else None
        if self.kind == "mosquitto" and mosquitto is None:
            raise BrokerUnavailable(
                "mosquitto is not installed (looked on PATH and in the usual sbin directories); "
                "install it or use the embedded broker",
                kind=self.kind,
            )
        port = self._requested_port or free_port(self.host)
        address = format_address(self.host, port)
        self._check_port_free(port, address)

        self._workdir = Path(tempfile.mkdtemp(prefix=f"wattmesh-{self.kind}-"))
        if mosquitto is not None:
            log_path = self._workdir / "mosquitto.log"
            config = MosquittoConfig(port, self.host, log_path=log_path, security=self.security)
            config_path = self._workdir / "mosquitto.conf"
            config_path.write_text(mosquitto_config_text(config))
            argv = [mosquitto, "-c", str(config_path)]
        else:
            argv = [
                sys.executable,
                "-m",
                "wattmesh.broker",
                "embedded",
                "--host",
                self.host,
                "--port",
                str(port),
            ]
        with open(self._workdir / "stderr.log", "wb") as stderr:
            # The child keeps its own copy of the descriptor.
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        tls = self.security is not None and self.security.tls is not None
        self._handle = BrokerHandle(self.kind, self.host, port, tls=tls)
        logger.info("starting %s broker on %s (pid %d)", self.kind, address, self._process.pid)
        return time.monotonic() + self._ready_timeout

    def _check_port_free(self, port: int, address: str) -> None:
        """Refuse a port someone already listens on.

        Without this the readiness probe would connect to the *other* listener and
        report success for a broker that is about to exit. The probe binds the way
        both brokers do (SO_REUSEADDR), so a port left in TIME_WAIT counts as free.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, port))
            except OSError as exc:
                reason = f"cannot listen: {exc.strerror or exc}"
                raise BrokerUnavailable(reason, kind=self.kind, address=address) from exc

    def _is_ready(self, deadline: float) -> bool:
        """One readiness check: ``True`` once the broker answers an MQTT CONNECT.

        Raises:
            BrokerUnavailable: the child exited, or ``deadline`` passed; the child is
                stopped and its files removed before raising.
        """
        handle, process = self.handle, self._process
        assert process is not None, "_spawn() first"
        # A TLS listener answers nothing before a handshake with a client certificate;
        # accepting the TCP connection shows it is up (Mosquitto binds after loading
        # its config, certificates included).
        accepting = (_accepts_tcp if handle.tls else _answers_mqtt)(handle.host, handle.port)
        # Polled after the probe: a child that died right after accepting is not ready.
        code = process.poll()
        if code is None:
            if accepting:
                logger.info("%s broker ready at %s", handle.kind, handle.url)
                return True
            if time.monotonic() < deadline:
                return False
            reason = f"did not answer an MQTT CONNECT within {self._ready_timeout:g} s"
        else:
            reason = f"exited with code {code} while starting"
        self._fail(reason)

    def _fail(self, reason: str) -> NoReturn:
        """Stop the child, remove its files, raise with its last words."""
        handle, output = self.handle, self._output_tail()
        self._stop(report_crash=False)  # the exception below reports it
        address = format_address(handle.host, handle.port)
        raise BrokerUnavailable(reason, kind=handle.kind, address=address, output=output)

    def _output_tail(self) -> str:
        """The last lines the child wrote to stderr and to its log, as one line."""
        if self._workdir is None:
            return ""
        lines: list[str] = []
        for name in ("stderr.log", "mosquitto.log"):
            with contextlib.suppress(OSError):
                text = (self._workdir / name).read_text(errors="replace")
                lines += [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-_TAIL_LINES:])


# MQTT 3.1.1 CONNECT: clean session, no keep-alive, empty client id (the broker picks one).
_PROBE_CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00"
_PROBE_DISCONNECT = b"\xe0\x00"
_CONNACK = 0x20


def _accepts_tcp(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers_mqtt(host: str, port: int) -> bool:
    """Whether a CONNECT to ``host:port`` gets a CONNACK.

    A bare TCP connect would do for readiness, but amqtt logs an ERROR for every
    connection that closes without a CONNECT, and those lines would crowd the stderr
    tail quoted in errors. Any CONNACK counts, a refusal too: the broker is serving.
    """
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(_PROBE_CONNECT)
            reply = sock.recv(4)
            sock.sendall(_PROBE_DISCONNECT)
    except OSError:
        return False
    return reply[:1] == bytes([_CONNACK])


@contextlib.asynccontextmanager
async def start_broker(
    kind: str = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    ready_timeout: float = 10.0,
    security: MosquittoSecurity | None = None,
) -> AsyncIterator[BrokerHandle]:
    """Run a broker child process for the duration of an ``async with`` block.

    Readiness is probed in a thread, so other tasks (peers connecting with retries,
    a progress display) keep running while the broker starts.

    Args:
        kind: ``"auto"`` (Mosquitto when installed, else embedded), ``"embedded"``
            or ``"mosquitto"``; :attr:`BrokerHandle.kind` says what ``"auto"`` chose.
        host: address to listen on.
        port: port to listen on; ``None`` picks a free one.
        ready_timeout: seconds the broker may take to answer [s].
        security: Mosquitto only: access control (see :class:`BrokerProcess`).

    Yields:
        Where the broker listens.

    Raises:
        BrokerUnavailable: it could not be started (see :meth:`BrokerProcess.start`).
        ValueError: unknown ``kind``, or ``security`` for a broker that is not Mosquitto.
    """
    process = BrokerProcess(kind, host, port, ready_timeout=ready_timeout, security=security)
    try:
        deadline = process._spawn()
        while not await asyncio.to_thread(process._is_ready, deadline):
            await asyncio.sleep(_POLL_SECONDS)
        yield process.handle
    finally:
        # Waiting for the child to exit may take a moment; keep the loop responsive.
        await asyncio.to_thread(process.stop)
