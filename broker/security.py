"""Per-peer broker identities for Mosquitto: passwords, the password file and the ACL.

Theory of operation (threat model and ACL table: ``docs/security.md``). The broker is
a relay and is never trusted with correctness: signatures and per-sender sequence
numbers protect integrity and replay whatever the broker does. The ACL protects what
signatures cannot: who may *occupy* a topic (another peer's presence, market, report
and telemetry topics) and who may *read* a peer's inbox. Every identity is a Mosquitto
username equal to its peer id; with ``use_username_as_clientid`` the client id is
forced to it as well, so a peer can never take over another peer's session.

The ACL (Mosquitto ``acl_file`` syntax) grants, for community ``c`` and peer ``p``:

- write: ``presence/p``, ``market/p``, ``telemetry/p``, ``report/p``, ``state/p`` (its
  own topics), ``broadcast`` and ``inbox/q`` for every roster peer ``q`` (directed
  messages);
- read: ``inbox/p`` (its own inbox only), ``presence/+``, ``market/+``, ``report/+``,
  ``state/+``, ``broadcast``;
- a monitor identity (also: a home's energy manager reading ``state``) reads
  ``presence/+``, ``market/+``, ``telemetry/+``, ``report/+``, ``state/+`` and
  ``broadcast`` and writes nothing.

Everything else is denied. Mosquitto checks read access per delivered message, so a
``#`` subscription is accepted but delivers only what the subscriber may read.

The inbox grants are ``pattern`` lines, one per roster peer (Mosquitto applies
``pattern`` lines to every user), rather than ``inbox/+``: a wildcard grant would let
a peer leave retained messages on an unbounded number of made-up inbox topics, which
the broker keeps in memory. The cost is one warning per roster peer in Mosquitto's log
at start-up ("ACL pattern ... does not contain '%c' or '%u'") and a ``deny`` line
that keeps monitors from using those grants.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wattmesh.protocols.identity import check_peer_id

__all__ = [
    "DEFAULT_MONITOR",
    "PEER_READ_CHANNELS",
    "PEER_WRITE_CHANNELS",
    "SecurityFiles",
    "TlsFiles",
    "acl_text",
    "new_password",
    "password_file_line",
    "password_file_text",
    "read_password",
    "write_security",
]

DEFAULT_MONITOR = "monitor"
"""Username of the read-only monitor identity ``wattmesh broker --secure`` creates."""

PEER_WRITE_CHANNELS = ("presence", "market", "telemetry", "report", "state")
"""Per-peer channels only their owner may publish on (``<channel>/<own id>``)."""

PEER_READ_CHANNELS = ("presence", "market", "report", "state")
"""Per-peer channels every peer of the community may read (public, signed)."""

MONITOR_READ_CHANNELS = ("presence", "market", "telemetry", "report", "state")
"""Per-peer channels a monitor may read; telemetry is for monitors only."""

# Mosquitto 2.0's PBKDF2-SHA512 password hash: "$7$<iterations>$<b64 salt>$<b64 hash>",
# the format `mosquitto_passwd` writes (101 iterations, 12-byte salt). The passwords
# are random 192-bit strings, so the iteration count adds nothing against guessing;
# Mosquitto's own default keeps each CONNECT cheap.
_PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of one TLS identity: the CA to trust, the own certificate and its key.

    The broker's server identity and each peer's client identity have this shape
    (``wattmesh.broker.ca`` writes them).

    Attributes:
        ca: PEM certificate of the community CA (trusted to sign the other side).
        cert: PEM certificate of this side, signed by the CA.
        key: PEM private key of ``cert`` (unencrypted, mode 0600).
    """

    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client ``SSLContext``: trust only ``ca``, check the broker's name, present ``cert``."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass(frozen=True, slots=True)
class SecurityFiles:
    """What :func:`write_security` wrote.

    Attributes:
        directory: where everything is.
        acl: the Mosquitto ACL file.
        password_file: the Mosquitto password file (hashes only); ``None`` when the
            identities come from TLS client certificates instead.
        credentials: identity -> file holding its clear-text password (mode 0600),
            to hand to that peer; the username is the identity itself.
        peers: the roster's peer ids.
        monitors: the read-only identities.
    """

    directory: Path
    acl: Path
    password_file: Path | None
    credentials: Mapping[str, Path] = field(default_factory=dict)
    peers: tuple[str, ...] = ()
    monitors: tuple[str, ...] = ()


def new_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def password_file_line(username: str, password: str, *, salt: bytes | None = None) -> str:
    """One line of a Mosquitto 2.0 password file, as ``mosquitto_passwd -U`` writes it.

    Args:
        username: the identity (a peer id).
        password: its clear-text password; must not contain ``:`` or a line break.
        salt: 12 bytes, random by default (tests pass one to compare outputs).

    Returns:
        ``username:$7$101$<salt>$<hash>`` without a line break, where hash is
        PBKDF2-HMAC-SHA512 of ``password`` (base64).
    """
    check_peer_id(username, what="username")
    if any(ch in password for ch in ":\r\n") or not password:
        raise ValueError("a password must be non-empty and contain no ':' or line break")
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    encoded_salt, encoded_hash = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"{username}:$7${_PBKDF2_ITERATIONS}${encoded_salt}${encoded_hash}"


def password_file_text(credentials: Mapping[str, str]) -> str:
    """The whole password file for ``credentials`` (identity -> clear-text password)."""
    return "".join(password_file_line(user, credentials[user]) + "\n" for user in sorted(credentials))


def acl_text(community: str, peers: Iterable[str], monitors: Iterable[str] = (DEFAULT_MONITOR,)) -> str:
    """The Mosquitto ACL file of one community (see the module docstring for the rules).

    Args:
        community: the community id (topic root ``wattmesh/v1/<community>``).
        peers: the roster's peer ids.
        monitors: read-only identities; must not be roster peers.

    Raises:
        ValueError: an invalid id, no peers, or an id that is both peer and monitor.
    """
    check_peer_id(community, what="community id")
    peer_ids = sorted({check_peer_id(p) for p in peers})
    monitor_ids = sorted({check_peer_id(m, what="monitor id") for m in monitors})
    if not peer_ids:
        raise ValueError("an ACL needs at least one peer")
    if both := sorted(set(peer_ids) & set(monitor_ids)):
        raise ValueError(f"{both[0]!r} cannot be both a peer and a monitor")
    root = f"wattmesh/v1/{community}"
    lines = [
        f"# wattmesh ACL of community {community!r}; written from its roster, regenerate rather than edit.",
        "# A user may do what any line grants it; everything else is denied. Read access is",
        "# checked for every delivered message, so wildcard subscriptions grant nothing extra.",
    ]
    for peer in peer_ids:
        lines += ["", f"user {peer}", f"topic read {root}/inbox/{peer}"]
        lines += [f"topic read {root}/{channel}/+" for channel in PEER_READ_CHANNELS]
        lines += [f"topic readwrite {root}/broadcast"]
        lines += [f"topic write {root}/{channel}/{peer}" for channel in PEER_WRITE_CHANNELS]
    for monitor in monitor_ids:
        lines += [
            "",
            f"user {monitor}",
            "# read-only; the deny line (checked before any grant) cancels the inbox patterns below",
            f"topic deny {root}/inbox/#",
        ]
        lines += [f"topic read {root}/{channel}/+" for channel in MONITOR_READ_CHANNELS]
        lines += [f"topic read {root}/broadcast"]
    lines += ["", "# Directed messages: any peer may write to any roster peer's inbox (one line per peer,"]
    lines += ["# not inbox/+, so nobody can park retained messages on made-up inbox topics)."]
    lines += [f"pattern write {root}/inbox/{peer}" for peer in peer_ids]
    return "\n".join(lines) + "\n"


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def read_password(directory: Path, identity: str) -> str:
    """The clear-text password of ``identity`` written by :func:`write_security`.

    Raises:
        FileNotFoundError: no credentials for ``identity`` in ``directory``.
    """
    path = Path(directory) / "credentials" / f"{check_peer_id(identity)}.password"
    return path.read_text().strip()


def write_security(
    directory: Path,
    community: str,
    peers: Iterable[str],
    monitors: Iterable[str] = (DEFAULT_MONITOR,),
    *,
    passwords: bool = True,
) -> SecurityFiles:
    """Write the credentials, password file and ACL of one community into ``directory``.

    Layout: ``acl``, ``passwords`` (Mosquitto hashes) and ``credentials/<id>.password``
    (clear text, one per identity, mode 0600). Existing credential files are reused, so
    running it again (a restart, a peer added to the roster) keeps every password that
    was already handed out. Identities no longer listed lose access: they are left out
    of the password file and the ACL, and their credential files are deleted (a
    running broker needs :meth:`~wattmesh.broker.BrokerProcess.reload`).

    Args:
        directory: where to write (created if missing).
        community: the community id.
        peers: the roster's peer ids.
        monitors: read-only identities.
        passwords: write credentials and the password file; ``False`` writes the ACL
            only, for a broker whose identities come from TLS client certificates.

    Raises:
        ValueError: see :func:`acl_text`.
    """
    peer_ids, monitor_ids = tuple(sorted(set(peers))), tuple(sorted(set(monitors)))
    acl = acl_text(community, peer_ids, monitor_ids)  # validates every id first
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    acl_path = directory / "acl"
    write_private_file(acl_path, acl)
    if not passwords:
        return SecurityFiles(directory, acl_path, None, {}, peer_ids, monitor_ids)
    clear_text: dict[str, str] = {}
    credential_files: dict[str, Path] = {}
    identities = [*peer_ids, *monitor_ids]
    for stale in (directory / "credentials").glob("*.password"):
        if stale.stem not in identities:  # removed from the community: a new password if it comes back
            stale.unlink()
    for identity in identities:
        path = directory / "credentials" / f"{identity}.password"
        password = path.read_text().strip() if path.exists() else ""
        if not password:
            password = new_password()
            write_private_file(path, password + "\n")
        clear_text[identity], credential_files[identity] = password, path
    password_path = directory / "passwords"
    write_private_file(password_path, password_file_text(clear_text))
    return SecurityFiles(directory, acl_path, password_path, credential_files, peer_ids, monitor_ids)
