"""The mesh's certificate authority: keys, certificates and the identities they carry.

Every peer proves who it is with a certificate from the mesh's own CA, so identity is decided in
one place (here) and nowhere trusts a name a peer merely claims. The CA only ever issues three
shapes of certificate, told apart by their subject's OU and locked to one TLS role by their
Extended Key Usage:

* coordinator - ``CN=coordinator, OU=coordinator``, serverAuth only, SAN = its host names/IPs;
* node        - ``CN=<node id>, OU=node``, clientAuth only; the coordinator picks the id;
* user        - ``CN=<user>, OU=user[, OU=admin]``, clientAuth only; the extra ``OU=admin``
  marks an administrator, so the privilege is signed by the CA and cannot be claimed.

A client certificate can therefore never serve as the coordinator, and the coordinator's
certificate can never log in as a node or user. Keys are ECDSA P-256 throughout.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from planetary_mesh.errors import TrustError

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey

CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this long in the past so peers with slightly slow clocks accept them."""

ADMIN_OU = "admin"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_MESH_NAME = 64 - len("Planetary Mesh CA ()")  # X.509 caps a CN at 64 characters


class PeerKind(StrEnum):
    """What a certificate holder is; stored as the subject's OU."""

    NODE = "node"
    USER = "user"
    COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate says its holder is."""

    kind: PeerKind
    name: str  # node id for nodes, user name for users, "coordinator" for the coordinator
    serial: int
    not_after: datetime  # timezone-aware UTC
    admin: bool  # only ever True for users


def generate_key() -> PrivateKey:
    """Make a fresh ECDSA P-256 key: small, fast, and supported by every TLS stack."""
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    mesh_name: str, lifetime: timedelta = timedelta(days=3650)
) -> tuple[x509.Certificate, PrivateKey]:
    """Make the mesh's self-signed CA; ``path_length=0`` forbids it from delegating to sub-CAs."""
    if not (1 <= len(mesh_name) <= _MAX_MESH_NAME and mesh_name.isprintable()):
        raise TrustError(
            f"the mesh name must be 1-{_MAX_MESH_NAME} printable characters, got {mesh_name!r}"
        )
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Planetary Mesh CA ({mesh_name})")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + _positive(lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


# Every coordinator certificate also carries this name: a client that found the coordinator by
# mDNS dials an address the certificate was not made for, and checks this name instead
# (ADR 13). Only the mesh's CA issues it, and only to its coordinator (node and user
# certificates are client-only), so the check keeps its meaning.
COORDINATOR_NAME = "planetary-mesh-coordinator"


def names_coordinator(cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries COORDINATOR_NAME (certificates from before it did not)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return COORDINATOR_NAME in sans.get_values_for_type(x509.DNSName)


def issue_server_cert(
    ca_cert: x509.Certificate, ca_key: PrivateKey, hosts: Sequence[str], lifetime: timedelta
) -> tuple[x509.Certificate, PrivateKey]:
    """Issue the coordinator's certificate, valid for each of ``hosts`` (names or IP addresses)
    and for COORDINATOR_NAME."""
    names: list[x509.GeneralName] = []
    for host in [*hosts, COORDINATOR_NAME] if hosts else []:
        general = _general_name(host)
        if general not in names:
            names.append(general)
    if not names:
        raise TrustError("the coordinator certificate needs at least one host name or IP address")
    key = generate_key()
    subject = _subject("coordinator", PeerKind.COORDINATOR)
    cert = (
        _leaf(ca_cert, ca_key, subject, key.public_key(), lifetime, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def issue_user_cert(
    ca_cert: x509.Certificate, ca_key: PrivateKey, user: str, lifetime: timedelta, admin: bool
) -> tuple[x509.Certificate, PrivateKey]:
    """Issue a person's client certificate; ``admin`` is signed into the subject as ``OU=admin``."""
    _check_name(user, "user name")
    key = generate_key()
    subject = _subject(user, PeerKind.USER, admin=admin)
    builder = _leaf(
        ca_cert, ca_key, subject, key.public_key(), lifetime, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_csr(key: PrivateKey, requested_name: str) -> bytes:
    """Build the PEM request an agent sends when joining; the name is only a hint (max 64 chars)."""
    if not 1 <= len(requested_name) <= 64:
        raise TrustError(f"the requested node name must be 1-64 characters, got {requested_name!r}")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, requested_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_node_csr(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    csr_pem: bytes,
    node_id: str,
    lifetime: timedelta,
) -> x509.Certificate:
    """Turn a joining agent's CSR into its node certificate.

    Only the CSR's public key is used: the subject and any requested extensions are ignored, so
    the coordinator alone decides the node id and the certificate can only ever be a client one.
    """
    _check_name(node_id, "node id")
    subject = _subject(node_id, PeerKind.NODE)
    public_key = _csr_public_key(csr_pem)
    builder = _leaf(ca_cert, ca_key, subject, public_key, lifetime, ExtendedKeyUsageOID.CLIENT_AUTH)
    return builder.sign(ca_key, hashes.SHA256())


def sign_user_csr(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    csr_pem: bytes,
    user: str,
    lifetime: timedelta,
    admin: bool,
) -> x509.Certificate:
    """A person's client certificate for a key made on the admin's machine (the coordinator
    never sees it). As for nodes, only the CSR's public key is used."""
    _check_name(user, "user name")
    subject = _subject(user, PeerKind.USER, admin=admin)
    public_key = _csr_public_key(csr_pem)
    builder = _leaf(ca_cert, ca_key, subject, public_key, lifetime, ExtendedKeyUsageOID.CLIENT_AUTH)
    return builder.sign(ca_key, hashes.SHA256())


def _csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise TrustError(
            "the certificate request is malformed or its signature is invalid"
        ) from err
    if not valid:
        raise TrustError("the certificate request is malformed or its signature is invalid")
    if not (
        isinstance(public_key, ec.EllipticCurvePublicKey)
        and isinstance(public_key.curve, ec.SECP256R1)
    ):
        raise TrustError("the certificate request must carry an ECDSA P-256 public key")
    return public_key


def ca_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the CA's SubjectPublicKeyInfo: what a join token pins (survives re-issuing)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def identity_of(cert: x509.Certificate) -> Identity:
    """Read the identity out of a certificate the TLS layer has already verified against the CA.

    Anything not shaped exactly like a certificate this module issues is refused, including a
    well-formed subject whose EKU does not match its role.
    """
    where = cert.subject.rfc4514_string() or "an empty subject"
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    kinds = [kind for kind in PeerKind if kind.value in ous]
    known = {kind.value for kind in PeerKind} | {ADMIN_OU}
    if len(cns) != 1 or len(kinds) != 1 or len(set(ous)) != len(ous) or not set(ous) <= known:
        raise TrustError(f"the certificate for {where} is not a Planetary Mesh peer certificate")
    kind, name, admin = kinds[0], str(cns[0].value), ADMIN_OU in ous
    if admin and kind is not PeerKind.USER:
        raise TrustError(f"the certificate for {where} marks a non-user as admin")
    if kind is PeerKind.COORDINATOR and name != "coordinator":
        raise TrustError(f"the certificate for {where} has a bad coordinator name")
    _check_name(name, f"{kind.value} name")
    wanted = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if kind is PeerKind.COORDINATOR
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if usages != [wanted]:
        raise TrustError(f"the certificate for {where} is not limited to its {kind.value} role")
    return Identity(kind, name, cert.serial_number, cert.not_valid_after_utc, admin)


@functools.lru_cache(maxsize=4096)
def identity_of_der(der: bytes) -> Identity:
    """Cached :func:`identity_of` for DER bytes; the server asks for every request it serves."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise TrustError("the peer certificate is not valid DER") from err
    return identity_of(cert)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """PEM-encode a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: PrivateKey) -> bytes:
    """PEM-encode a key as unencrypted PKCS#8; file mode 0600 is what protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_cert_pem(data: bytes) -> x509.Certificate:
    """Parse a PEM certificate, saying what the data is instead when it is something else."""
    if b"PRIVATE KEY-----" in data and b"CERTIFICATE-----" not in data:
        raise TrustError("expected a PEM certificate but found a private key")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise TrustError(f"expected a PEM certificate but could not read one: {err}") from err


def load_key_pem(data: bytes) -> PrivateKey:
    """Parse an unencrypted PEM private key and insist it is an ECDSA key."""
    if b"CERTIFICATE-----" in data and b"PRIVATE KEY-----" not in data:
        raise TrustError("expected a PEM private key but found a certificate")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as err:
        raise TrustError(
            "the private key is encrypted; Planetary Mesh needs it unencrypted"
        ) from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise TrustError(f"expected a PEM private key but could not read one: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError(f"expected an ECDSA private key, found {type(key).__name__}")
    return key


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret atomically; the file is 0600 from the moment it exists."""
    _write_atomic(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Write a certificate or other public file atomically with mode 0644."""
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL on a random name in the same directory: no symlink tricks, and os.replace is atomic.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # the umask may have removed bits we want
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise TrustError(f"could not write {path}: {err.strerror or err}") from err


def _positive(lifetime: timedelta) -> timedelta:
    if lifetime <= timedelta(0):
        raise TrustError(f"a certificate lifetime must be positive, got {lifetime}")
    return lifetime


def _check_name(name: str, what: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise TrustError(
            f"the {what} {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'"
        )


def _subject(name: str, kind: PeerKind, admin: bool = False) -> x509.Name:
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind.value),
    ]
    if admin:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_OU))
    return x509.Name(attributes)


def _general_name(host: str) -> x509.GeneralName:
    host = host.strip().removeprefix("[").removesuffix("]")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host:
        raise TrustError("an empty host name cannot go into the coordinator certificate")
    try:
        return x509.DNSName(host)
    except ValueError as err:
        raise TrustError(f"the host name {host!r} cannot go into a certificate: {err}") from err


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    lifetime: timedelta,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    """The parts every end-entity certificate shares; never outlives the CA that signs it."""
    if ca_key.public_key() != ca_cert.public_key():
        raise TrustError("the CA key does not belong to the CA certificate")
    now = datetime.now(UTC)
    not_after = min(now + _positive(lifetime), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
