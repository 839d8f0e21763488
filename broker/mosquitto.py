"""Mosquitto: find the binary and write its configuration.

wattmesh never relies on a system ``mosquitto.conf``: it writes one per broker from a
:class:`MosquittoConfig`, so the settings the market's latency and correctness depend on
(``set_tcp_nodelay``, queue limits, where it listens) are always what this file says.
New settings (bridges, ...) are a new field plus the lines it produces in
:func:`mosquitto_config_text`. Access control (:class:`MosquittoSecurity`, files from
:mod:`wattmesh.broker.security` and :mod:`wattmesh.broker.ca`) is one such field.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from wattmesh.broker.security import TlsFiles

__all__ = ["MosquittoConfig", "MosquittoSecurity", "find_mosquitto", "mosquitto_available", "mosquitto_config_text"]

# Debian/Ubuntu install the broker to /usr/sbin, which is not on a normal user's PATH;
# source builds and Homebrew use the others.
_FALLBACK_BINARIES = (
    "/usr/sbin/mosquitto",
    "/usr/local/sbin/mosquitto",
    "/opt/homebrew/sbin/mosquitto",
)


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` executable: on ``PATH`` first, then the usual sbin dirs."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((path for path in _FALLBACK_BINARIES if os.access(path, os.X_OK)), None)


def mosquitto_available() -> bool:
    """Whether a ``mosquitto`` executable is installed (see :func:`find_mosquitto`)."""
    return find_mosquitto() is not None


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass(frozen=True, slots=True)
class MosquittoSecurity:
    """Who may connect to the listener and what each identity may do (docs/security.md).

    Exactly one way to authenticate: a password file, or TLS client certificates whose
    Common Name becomes the username. Either way the client id is forced to the
    username, so nobody can take over another identity's session, and anonymous
    clients are refused.

    Attributes:
        acl_path: the ACL file (:func:`wattmesh.broker.security.acl_text`).
        password_path: Mosquitto password file; clients log in with username/password.
        tls: the broker's certificate and key and the CA whose client certificates are
            accepted; the listener then speaks TLS only and requires a certificate.
    """

    acl_path: Path
    password_path: Path | None = None
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        if (self.password_path is None) == (self.tls is None):
            raise ValueError("give exactly one of password_path (passwords) and tls (client certificates)")
        paths = [self.acl_path, self.password_path]
        if self.tls is not None:
            paths += [self.tls.ca, self.tls.cert, self.tls.key]
        if any("\n" in str(path) or "\r" in str(path) for path in paths if path is not None):
            raise ValueError("a path in the Mosquitto config cannot contain a line break")


@dataclass(frozen=True, slots=True)
class MosquittoConfig:
    """Settings of one wattmesh-launched Mosquitto.

    Attributes:
        port: TCP port of the single listener.
        host: address of that listener; the loopback default keeps a local market
            off the network until someone asks for more.
        log_path: file for Mosquitto's own log, or ``None`` for stderr.
        user: account to run as. Mosquitto started as root otherwise switches to the
            ``mosquitto`` account, which cannot write the log into the caller's private
            temporary directory; a launched broker runs as its caller, like the
            embedded one. Ignored by Mosquitto when not started as root.
        max_queued_messages: per-client queue. Mosquitto's default of 1000 silently
            drops the excess, which a round of a large community can exceed.
        max_inflight_messages: QoS 1/2 messages in flight per client; 0 = no limit,
            so a burst to a distant peer is not paced by its PUBACK round trips.
        security: authentication and ACL; ``None`` lets anyone who reaches the
            listener connect and do anything (the default for a local market).
    """

    port: int
    host: str = "127.0.0.1"
    log_path: Path | None = None
    user: str = field(default_factory=_current_user)
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 0
    security: MosquittoSecurity | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_queued_messages < 0 or self.max_inflight_messages < 0:
            raise ValueError("message limits must be >= 0")


def mosquitto_config_text(config: MosquittoConfig) -> str:
    """The ``mosquitto.conf`` text for ``config`` (Mosquitto 2.0 syntax).

    Args:
        config: what to write.

    Returns:
        The file's text, one directive per line.
    """
    lines = [
        "# Written by wattmesh; regenerated on every start, do not edit.",
        f"user {config.user}",
        *_listener_lines(config),
        # Nagle's algorithm adds ~40 ms per request/response round (FIELD-NOTES).
        "set_tcp_nodelay true",
        # The broker relays a market round; it is not a durable store.
        "persistence false",
        f"max_queued_messages {config.max_queued_messages}",
        f"max_inflight_messages {config.max_inflight_messages}",
        f"log_dest file {config.log_path}" if config.log_path else "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    return "\n".join(lines) + "\n"


def _listener_lines(config: MosquittoConfig) -> list[str]:
    """The listener and the settings that control access to it."""
    security = config.security
    if security is None:
        # Anyone who reaches the (loopback by default) listener may connect.
        return [f"listener {config.port} {config.host}", "allow_anonymous true"]
    lines = [
        # Authentication and ACL belong to the listener below, not to any other one
        # (a bridge or a listener added by hand gets none of these grants).
        "per_listener_settings true",
        # A retained message is re-checked against its publisher's current rights
        # before it reaches a new subscriber (CVE-2018-12546): revoking a peer also
        # silences what it left retained. Mosquitto's default; written out on purpose.
        "check_retain_source true",
        f"listener {config.port} {config.host}",
        "allow_anonymous false",
        # The client id is the username: nobody can connect as another peer's client
        # id and kick its session (a takeover only ever hits one's own session).
        "use_username_as_clientid true",
        f"acl_file {security.acl_path}",
    ]
    if security.password_path is not None:
        lines.append(f"password_file {security.password_path}")
    if security.tls is not None:
        lines += [
            f"cafile {security.tls.ca}",
            f"certfile {security.tls.cert}",
            f"keyfile {security.tls.key}",
            # Only clients with a certificate from the community CA; its Common Name
            # (the peer id) is the username the ACL is written for.
            "require_certificate true",
            "use_identity_as_username true",
        ]
    return lines
