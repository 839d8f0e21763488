"""A small certificate authority for one community: broker and peer TLS certificates.

``wattmesh ca init DIR`` makes the CA and the broker's server certificate,
``wattmesh ca issue DIR PEER_ID`` a client certificate whose Common Name is the peer
id. Mosquitto's TLS listener (``require_certificate true``, ``use_identity_as_username
true``) then takes the peer id from the certificate, so the ACL of
:mod:`wattmesh.broker.security` applies unchanged and no password is needed.

Layout of ``DIR``::

    ca.crt  ca.key                 the CA (the key signs every certificate: keep it offline)
    server.crt  server.key         the broker's identity, names in subjectAltName
    peers/<id>.crt  peers/<id>.key one per peer

Keys are ECDSA P-256 (fast handshakes on a Raspberry Pi, supported by every OpenSSL
Mosquitto links against); private keys are unencrypted PEM, mode 0600. Every
certificate the CA signs is accepted by the broker: issuing one is granting access.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wattmesh.broker.security import TlsFiles, write_private_file
from wattmesh.protocols.identity import check_peer_id

__all__ = ["DEFAULT_SERVER_NAMES", "init_ca", "issue_peer", "peer_files", "server_files"]

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
"""Names in the broker certificate by default: the loopback addresses."""

_CA_DAYS = 3650
_LEAF_DAYS = 825  # the longest validity common TLS clients accept for leaf certificates
_CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid a little before "now" for slow clocks


def server_files(directory: Path) -> TlsFiles:
    """Where :func:`init_ca` put the broker's certificate, key and the CA certificate."""
    directory = Path(directory)
    return TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")


def peer_files(directory: Path, peer_id: str) -> TlsFiles:
    """Where :func:`issue_peer` put ``peer_id``'s certificate and key (and the CA certificate)."""
    directory = Path(directory)
    peers = directory / "peers"
    check_peer_id(peer_id)
    return TlsFiles(directory / "ca.crt", peers / f"{peer_id}.crt", peers / f"{peer_id}.key")


def init_ca(
    directory: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    common_name: str = "wattmesh community CA",
    overwrite: bool = False,
) -> TlsFiles:
    """Create a CA and the broker's server certificate in ``directory``.

    Args:
        directory: where to write (created if missing).
        server_names: host names and IP addresses clients use to reach the broker;
            each becomes a DNS or IP subjectAltName (clients check it).
        common_name: the CA's name, shown by TLS tools.
        overwrite: replace an existing CA (every certificate it issued stops working).

    Returns:
        The broker's files (CA certificate, server certificate and key).

    Raises:
        FileExistsError: a CA is already there and ``overwrite`` is false.
        ValueError: no server name.
    """
    directory = Path(directory)
    if not server_names:
        raise ValueError("the server certificate needs at least one name")
    ca_cert_path, ca_key_path = directory / "ca.crt", directory / "ca.key"
    if ca_key_path.exists() and not overwrite:
        raise FileExistsError(f"{ca_key_path} exists (a CA is already there; overwrite to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_file(ca_key_path, _pem_key(key))
    ca_cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files = server_files(directory)
    alt_names = [_alt_name(server_name) for server_name in server_names]
    _issue(directory, files, f"wattmesh broker {server_names[0]}", x509.SubjectAlternativeName(alt_names),
           ExtendedKeyUsageOID.SERVER_AUTH)  # fmt: skip
    return files


def issue_peer(directory: Path, peer_id: str, *, overwrite: bool = False) -> TlsFiles:
    """Issue ``peer_id``'s client certificate (Common Name = peer id) from the CA in ``directory``.

    Returns:
        The peer's files, to copy to the peer's machine (with ``ca.crt``).

    Raises:
        FileNotFoundError: no CA in ``directory`` (run :func:`init_ca` first).
        FileExistsError: the peer already has a key and ``overwrite`` is false.
        ValueError: ``peer_id`` is not a valid peer id.
    """
    files = peer_files(directory, peer_id)
    if files.key.exists() and not overwrite:
        raise FileExistsError(f"{files.key} exists (overwrite to issue a new certificate)")
    _issue(Path(directory), files, peer_id, None, ExtendedKeyUsageOID.CLIENT_AUTH)
    return files


def _issue(
    directory: Path,
    files: TlsFiles,
    common_name: str,
    alt_names: x509.SubjectAlternativeName | None,
    usage: x509.ObjectIdentifier,
) -> None:
    """Sign a new leaf key pair with the CA in ``directory`` and write it to ``files``."""
    ca_key_path = directory / "ca.key"
    if not ca_key_path.exists():
        raise FileNotFoundError(f"no CA in {directory} (missing ca.key): run 'wattmesh ca init {directory}' first")
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key_path} is not a wattmesh CA key (expected ECDSA)")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if alt_names is not None:
        builder = builder.add_extension(alt_names, critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    write_private_file(files.key, _pem_key(key))
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _alt_name(name: str) -> x509.GeneralName:
    """An IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
