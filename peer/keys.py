"""Key files and roster files on disk (the I/O side of ``wattmesh.protocols.identity``).

A private key file holds the 32-byte Ed25519 seed as 64 hex digits and is created
with mode 0600; the public key goes into the community roster.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from wattmesh.protocols.errors import ScenarioError
from wattmesh.protocols.identity import Roster, check_peer_id, public_key_hex

__all__ = ["generate_key", "load_private_key", "load_roster", "write_roster"]


def generate_key(path: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create a new key file (mode 0600, written atomically) and return the key.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is false.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite a private key")
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # A leftover tmp file keeps its own mode (e.g. 0644) under O_CREAT, and a symlink
    # there would be followed: start from no file, and create it exclusively.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(seed.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a key file written by :func:`generate_key`.

    Raises:
        ScenarioError: missing, unreadable or malformed file (one clear line in the CLI).
    """
    try:
        text = path.read_text().strip()
        seed = bytes.fromhex(text)
        if len(seed) != 32:
            raise ValueError
    except OSError as exc:
        raise ScenarioError(str(path), "", f"cannot read key file ({exc.strerror})") from None
    except ValueError:
        raise ScenarioError(str(path), "", "not a wattmesh key file (expected 64 hex digits)") from None
    return Ed25519PrivateKey.from_private_bytes(seed)


def load_roster(path: Path) -> Roster:
    """Read a roster file; errors name the file and the key."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(str(path), "", f"cannot read roster ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ScenarioError(str(path), "", "not a roster (not UTF-8 text)") from None
    return Roster.from_toml(text, source=str(path))


def write_roster(path: Path, keys: dict[str, Ed25519PrivateKey]) -> Roster:
    """Write the roster of the given peers' public keys and return it."""
    for peer_id in keys:
        check_peer_id(peer_id)
    roster = Roster({pid: key.public_key() for pid, key in keys.items()})
    path.write_text(roster.to_toml())
    return roster


def describe_key(key: Ed25519PrivateKey) -> str:
    """The public half, as it goes into a roster."""
    return public_key_hex(key.public_key())
