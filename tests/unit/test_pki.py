"""Certificates, join tokens and TLS contexts, with real crypto and real handshakes on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from planetary_mesh.errors import CAMismatchError, TokenError, TrustError
from planetary_mesh.pki.certs import (
    COORDINATOR_NAME,
    Identity,
    PeerKind,
    PrivateKey,
    ca_fingerprint,
    cert_to_pem,
    create_ca,
    generate_key,
    identity_of,
    identity_of_der,
    issue_server_cert,
    issue_user_cert,
    key_to_pem,
    load_cert_pem,
    load_key_pem,
    make_csr,
    names_coordinator,
    sign_node_csr,
    write_private_file,
    write_public_file,
)
from planetary_mesh.pki.tls import client_ssl_context, server_ssl_context
from planetary_mesh.pki.tokens import (
    TOKEN_PREFIX,
    JoinToken,
    check_ca_pin,
    hash_secret,
    new_join_token,
    parse_join_token,
    secrets_match,
)

HOUR = timedelta(hours=1)
CA = tuple[x509.Certificate, PrivateKey]


@pytest.fixture(scope="module")
def ca() -> CA:
    return create_ca("test-mesh")


@pytest.fixture(scope="module")
def other_ca() -> CA:
    return create_ca("other-mesh")


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _node(ca: CA, node_id: str = "node-7") -> tuple[x509.Certificate, PrivateKey]:
    key = generate_key()
    return sign_node_csr(ca[0], ca[1], make_csr(key, "laptop"), node_id, HOUR), key


# --- certificates -------------------------------------------------------------------------------


def test_create_ca_is_a_ca_that_cannot_delegate(ca: CA) -> None:
    cert, key = ca
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "Planetary Mesh CA (test-mesh)"
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == key.public_key()
    assert isinstance(key.curve, ec.SECP256R1)


def test_node_cert_has_coordinator_chosen_id_and_is_client_only(ca: CA) -> None:
    key = generate_key()
    before = datetime.now(UTC)
    cert = sign_node_csr(ca[0], ca[1], make_csr(key, "i-want-to-be-admin"), "node-42", HOUR)
    cert.verify_directly_issued_by(ca[0])
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "OU=node,CN=node-42"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    skew = timedelta(minutes=5)
    assert abs(cert.not_valid_before_utc - (before - skew)) < timedelta(seconds=5)
    assert abs(cert.not_valid_after_utc - (before + HOUR)) < timedelta(seconds=5)
    other = sign_node_csr(ca[0], ca[1], make_csr(key, "x"), "node-42", HOUR)
    assert other.serial_number != cert.serial_number


def test_node_cert_lifetime_may_be_seconds(ca: CA) -> None:
    key = generate_key()
    now = datetime.now(UTC)
    cert = sign_node_csr(ca[0], ca[1], make_csr(key, "n"), "n1", timedelta(seconds=3))
    assert now < cert.not_valid_after_utc <= now + timedelta(seconds=4)


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-1)])
def test_non_positive_lifetime_is_refused(ca: CA, lifetime: timedelta) -> None:
    with pytest.raises(TrustError, match="lifetime"):
        sign_node_csr(ca[0], ca[1], make_csr(generate_key(), "n"), "n1", lifetime)


@pytest.mark.parametrize(
    "garbage", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"]
)
def test_sign_node_csr_refuses_garbage(ca: CA, garbage: bytes) -> None:
    with pytest.raises(TrustError, match="malformed or its signature is invalid"):
        sign_node_csr(ca[0], ca[1], garbage, "node-1", HOUR)


def test_sign_node_csr_refuses_a_tampered_request(ca: CA) -> None:
    csr_pem = make_csr(generate_key(), "laptop")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    tampered_der = der.replace(b"laptop", b"lapt0p")  # same length: still parses
    assert tampered_der != der
    body = base64.encodebytes(tampered_der)
    tampered = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"
    )
    assert x509.load_pem_x509_csr(tampered).subject.rfc4514_string() == "CN=lapt0p"
    with pytest.raises(TrustError, match="malformed or its signature is invalid"):
        sign_node_csr(ca[0], ca[1], tampered, "node-1", HOUR)
    sign_node_csr(ca[0], ca[1], csr_pem, "node-1", HOUR)  # the untouched one is fine


def test_sign_node_csr_refuses_keys_other_than_p256(ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(TrustError, match="P-256"):
        sign_node_csr(ca[0], ca[1], csr.public_bytes(serialization.Encoding.PEM), "n1", HOUR)


def test_signing_with_a_key_that_is_not_the_cas_is_refused(ca: CA, other_ca: CA) -> None:
    with pytest.raises(TrustError, match="CA key does not belong"):
        sign_node_csr(ca[0], other_ca[1], make_csr(generate_key(), "n"), "n1", HOUR)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "ünï", "a/b", "name\n"])
def test_bad_user_names_and_node_ids_are_refused(ca: CA, bad: str) -> None:
    with pytest.raises(TrustError, match="not allowed"):
        issue_user_cert(ca[0], ca[1], bad, HOUR, admin=False)
    with pytest.raises(TrustError, match="not allowed"):
        sign_node_csr(ca[0], ca[1], make_csr(generate_key(), "n"), bad, HOUR)


def test_server_cert_names_its_hosts_and_is_server_only(ca: CA) -> None:
    cert, key = issue_server_cert(ca[0], ca[1], ["127.0.0.1", "::1", "[::1]", "mesh.local"], HOUR)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    # The fixed name a client checks when it found the coordinator by mDNS (ADR 13).
    assert san.get_values_for_type(x509.DNSName) == ["mesh.local", COORDINATOR_NAME]
    assert names_coordinator(cert) and not names_coordinator(ca[0])
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.rfc4514_string() == "OU=coordinator,CN=coordinator"
    assert cert.public_key() == key.public_key()
    with pytest.raises(TrustError):
        issue_server_cert(ca[0], ca[1], [], HOUR)


def test_ca_fingerprint_is_the_spki_hash_stable_and_distinct(ca: CA, other_ca: CA) -> None:
    spki = (
        ca[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    fingerprint = ca_fingerprint(ca[0])
    assert fingerprint == hashlib.sha256(spki).hexdigest()
    assert len(fingerprint) == 64 and fingerprint == fingerprint.lower()
    assert ca_fingerprint(load_cert_pem(cert_to_pem(ca[0]))) == fingerprint
    assert ca_fingerprint(other_ca[0]) != fingerprint


# --- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("admin", [True, False])
def test_identity_of_user(ca: CA, admin: bool) -> None:
    cert, _ = issue_user_cert(ca[0], ca[1], "ada.l_1", HOUR, admin=admin)
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert identity_of(cert) == Identity(
        PeerKind.USER, "ada.l_1", cert.serial_number, cert.not_valid_after_utc, admin
    )


def test_identity_of_node_and_coordinator(ca: CA) -> None:
    node, _ = _node(ca, "node-3")
    ident = identity_of(node)
    assert (ident.kind, ident.name, ident.admin, ident.serial) == (
        PeerKind.NODE,
        "node-3",
        False,
        node.serial_number,
    )
    assert ident.not_after.tzinfo is not None
    server, _ = issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR)
    assert identity_of(server).kind is PeerKind.COORDINATOR
    assert identity_of_der(node.public_bytes(serialization.Encoding.DER)) == ident


def _forged(ca: CA, ous: list[str], usage: x509.ObjectIdentifier) -> x509.Certificate:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "eve")]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    key = generate_key()
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + HOUR)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca[1], hashes.SHA256())
    )


@pytest.mark.parametrize(
    ("ous", "usage"),
    [
        ([], ExtendedKeyUsageOID.CLIENT_AUTH),
        (["staff"], ExtendedKeyUsageOID.CLIENT_AUTH),
        (["node", "user"], ExtendedKeyUsageOID.CLIENT_AUTH),
        (["node", "admin"], ExtendedKeyUsageOID.CLIENT_AUTH),
        (["node"], ExtendedKeyUsageOID.SERVER_AUTH),
        (["user"], ExtendedKeyUsageOID.SERVER_AUTH),
    ],
)
def test_identity_of_refuses_certificates_not_shaped_like_ours(
    ca: CA, ous: list[str], usage: x509.ObjectIdentifier
) -> None:
    cert = _forged(ca, ous, usage)
    with pytest.raises(TrustError):
        identity_of(cert)
    with pytest.raises(TrustError):
        identity_of_der(cert.public_bytes(serialization.Encoding.DER))


def test_identity_of_refuses_the_ca_and_garbage_der(ca: CA) -> None:
    with pytest.raises(TrustError, match="not a Planetary Mesh peer"):
        identity_of(ca[0])
    with pytest.raises(TrustError):
        identity_of_der(b"not der")


# --- PEM and files ------------------------------------------------------------------------------


def test_pem_round_trips(ca: CA) -> None:
    assert load_cert_pem(cert_to_pem(ca[0])) == ca[0]
    pem = key_to_pem(ca[1])
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert load_key_pem(pem).private_numbers() == ca[1].private_numbers()


def test_loaders_say_what_is_wrong(ca: CA) -> None:
    with pytest.raises(TrustError, match="found a private key"):
        load_cert_pem(key_to_pem(ca[1]))
    with pytest.raises(TrustError, match="found a certificate"):
        load_key_pem(cert_to_pem(ca[0]))
    with pytest.raises(TrustError, match="expected a PEM certificate"):
        load_cert_pem(b"junk")
    with pytest.raises(TrustError, match="expected a PEM private key"):
        load_key_pem(b"junk")
    encrypted = ca[1].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(TrustError, match="encrypted"):
        load_key_pem(encrypted)


def test_write_private_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = os.umask(0)
    try:
        write_private_file(path, b"one")
        write_private_file(path, b"two")  # replacing keeps the mode
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["node.key"]  # no temporary files left behind


def test_write_public_file_is_0644_even_with_a_strict_umask(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    old = os.umask(0o077)
    try:
        write_public_file(path, b"cert")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"cert"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_into_a_missing_directory_is_a_trust_error(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="could not write"):
        write_private_file(tmp_path / "missing" / "x.key", b"k")


# --- tokens -------------------------------------------------------------------------------------


def test_token_round_trip(ca: CA) -> None:
    token = new_join_token(ca_fingerprint(ca[0]))
    text = str(token)
    assert text == f"{TOKEN_PREFIX}{token.ca_hash}-{token.secret}"
    assert parse_join_token(f"  {text}\n") == token
    assert len(token.secret) == 32 and "-" not in token.secret
    assert token.secret == token.secret.lower()
    assert new_join_token(token.ca_hash).secret != token.secret
    assert token.secret not in repr(token)


H = "ab" * 32
S = "a" * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (f"PMTOKEN-1-{H}-{S}", "should start with PMTKN-1-"),
        (f"{H}-{S}", "should start with PMTKN-1-"),
        (f"PMTKN-2-{H}-{S}", "different version"),
        (f"PMTKN-1-{H[:-1]}-{S}", "64 lowercase hexadecimal"),
        (f"PMTKN-1-{H[:-1]}g-{S}", "64 lowercase hexadecimal"),
        (f"PMTKN-1-{H}", "secret after the CA hash is missing"),
        (f"PMTKN-1-{H}-", "secret after the CA hash is missing"),
        (f"PMTKN-1-{H}-{S[:-1]}", "secret must be 32"),
        (f"PMTKN-1-{H}-{S[:-1]}-", "secret must be 32"),
    ],
)
def test_parse_join_token_errors(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message) as info:
        parse_join_token(text)
    assert "\n" not in str(info.value)


def test_join_token_refuses_a_bad_hash_on_construction() -> None:
    with pytest.raises(TokenError):
        new_join_token("not-a-hash")
    with pytest.raises(TokenError):
        JoinToken(ca_hash=H, secret="has-dash" * 4)


def test_hash_secret_and_secrets_match() -> None:
    stored = hash_secret(S)
    assert stored == hashlib.sha256(S.encode()).hexdigest()
    assert secrets_match(S, stored)
    assert not secrets_match("b" * 32, stored)
    assert not secrets_match(S, stored.upper())
    assert not secrets_match(S, "ünicode")


def test_check_ca_pin(ca: CA, other_ca: CA) -> None:
    token = new_join_token(ca_fingerprint(ca[0]))
    assert check_ca_pin(token, cert_to_pem(ca[0])) == ca[0]
    with pytest.raises(CAMismatchError, match="not the one this token pins"):
        check_ca_pin(token, cert_to_pem(other_ca[0]))


# --- TLS ----------------------------------------------------------------------------------------


@dataclass
class ServerSide:
    peer_der: bytes | None = None
    error: BaseException | None = None


def _files(tmp: Path, name: str, cert: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    write_public_file(cert_path, cert_to_pem(cert))
    write_private_file(key_path, key_to_pem(key))
    return cert_path, key_path


def _coordinator_ctx(
    tmp: Path, ca: CA, server: tuple[x509.Certificate, PrivateKey]
) -> ssl.SSLContext:
    ca_path = tmp / "ca.pem"
    write_public_file(ca_path, cert_to_pem(ca[0]))
    return server_ssl_context(ca_path, *_files(tmp, "server", *server))


def _exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1"
) -> tuple[ServerSide, bytes | BaseException]:
    """One connection on 127.0.0.1; returns what the server saw and what the client read."""
    seen = ServerSide()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(2)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(2)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.peer_der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"hello")
            except OSError as err:
                seen.error = err

        thread = threading.Thread(target=serve)
        thread.start()
        outcome: bytes | BaseException
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=2) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                # Under TLS 1.3 a refused client certificate is only reported on first read.
                outcome = tls.recv(5)
        except OSError as err:
            outcome = err
        thread.join(timeout=2)
        assert not thread.is_alive()
    return seen, outcome


def test_tls_client_with_a_mesh_cert_is_identified_by_the_server(ca: CA, tmp_path: Path) -> None:
    server_ctx = _coordinator_ctx(
        tmp_path, ca, issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR)
    )
    node, node_key = _node(ca, "node-9")
    client_ctx = client_ssl_context(cert_to_pem(ca[0]), *_files(tmp_path, "node", node, node_key))
    seen, outcome = _exchange(server_ctx, client_ctx)
    assert outcome == b"hello" and seen.error is None
    assert seen.peer_der is not None
    assert identity_of_der(seen.peer_der).name == "node-9"


def test_tls_client_with_another_cas_cert_is_refused(ca: CA, other_ca: CA, tmp_path: Path) -> None:
    server_ctx = _coordinator_ctx(
        tmp_path, ca, issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR)
    )
    foreign, foreign_key = _node(other_ca, "intruder")
    client_ctx = client_ssl_context(
        cert_to_pem(ca[0]), *_files(tmp_path, "foreign", foreign, foreign_key)
    )
    seen, outcome = _exchange(server_ctx, client_ctx)
    assert isinstance(seen.error, ssl.SSLError)
    assert "certificate verify failed" in str(seen.error)
    assert seen.peer_der is None
    assert outcome != b"hello"


def test_tls_client_without_a_cert_connects_anonymously(ca: CA, tmp_path: Path) -> None:
    server_ctx = _coordinator_ctx(
        tmp_path, ca, issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR)
    )
    seen, outcome = _exchange(server_ctx, client_ssl_context(cert_to_pem(ca[0])))
    assert outcome == b"hello" and seen.error is None
    assert seen.peer_der is None


def test_tls_client_refuses_a_server_from_another_ca(ca: CA, other_ca: CA, tmp_path: Path) -> None:
    impostor = issue_server_cert(other_ca[0], other_ca[1], ["127.0.0.1"], HOUR)
    server_ctx = _coordinator_ctx(tmp_path, other_ca, impostor)
    _, outcome = _exchange(server_ctx, client_ssl_context(cert_to_pem(ca[0])))
    assert isinstance(outcome, ssl.SSLCertVerificationError)
    # 19: the impostor sent its own self-signed CA; 20: it sent only its leaf.
    assert outcome.verify_code in (19, 20), outcome.verify_message


def test_tls_client_refuses_a_server_cert_for_another_host(ca: CA, tmp_path: Path) -> None:
    server_ctx = _coordinator_ctx(tmp_path, ca, issue_server_cert(ca[0], ca[1], ["10.9.8.7"], HOUR))
    _, outcome = _exchange(server_ctx, client_ssl_context(cert_to_pem(ca[0])))
    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert "IP address mismatch" in outcome.verify_message


def test_a_discovered_coordinator_is_checked_by_its_fixed_name_not_the_address(
    ca: CA, other_ca: CA, tmp_path: Path
) -> None:
    # Made for 10.9.8.7, reached at 127.0.0.1 (as after DHCP moved it): the fixed name passes.
    moved = _coordinator_ctx(tmp_path, ca, issue_server_cert(ca[0], ca[1], ["10.9.8.7"], HOUR))
    client = client_ssl_context(cert_to_pem(ca[0]))
    assert _exchange(moved, client, server_hostname=COORDINATOR_NAME)[1] == b"hello"
    # Another mesh's coordinator carries the same name, but its CA is not ours: refused.
    rogue_cert = issue_server_cert(other_ca[0], other_ca[1], ["127.0.0.1"], HOUR)
    rogue = _coordinator_ctx(tmp_path, other_ca, rogue_cert)
    _, outcome = _exchange(rogue, client, server_hostname=COORDINATOR_NAME)
    assert isinstance(outcome, ssl.SSLCertVerificationError)


def test_node_cert_fails_to_verify_as_a_server(ca: CA, tmp_path: Path) -> None:
    client_ctx = client_ssl_context(cert_to_pem(ca[0]))
    client_ctx.check_hostname = False  # a node cert names no host; isolate the EKU check
    node_server_ctx = _coordinator_ctx(tmp_path, ca, _node(ca))
    _, outcome = _exchange(node_server_ctx, client_ctx)
    assert isinstance(outcome, ssl.SSLCertVerificationError)
    assert outcome.verify_code == 26, outcome.verify_message  # X509_V_ERR_INVALID_PURPOSE
    # Control: the same client accepts the real coordinator certificate.
    real_ctx = _coordinator_ctx(tmp_path, ca, issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR))
    assert _exchange(real_ctx, client_ctx)[1] == b"hello"


def test_coordinator_cert_cannot_log_in_as_a_client(ca: CA, tmp_path: Path) -> None:
    server_ctx = _coordinator_ctx(
        tmp_path, ca, issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR)
    )
    stolen = issue_server_cert(ca[0], ca[1], ["127.0.0.1"], HOUR)
    client_ctx = client_ssl_context(cert_to_pem(ca[0]), *_files(tmp_path, "stolen", *stolen))
    seen, outcome = _exchange(server_ctx, client_ctx)
    assert isinstance(seen.error, ssl.SSLError)
    assert "certificate verify failed" in str(seen.error)
    assert outcome != b"hello"


def test_context_loading_errors_are_trust_errors(ca: CA, tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="CA certificate"):
        client_ssl_context(b"not a certificate")
    with pytest.raises(TrustError, match="CA certificate"):
        server_ssl_context(tmp_path / "nope.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    ctx = client_ssl_context(cert_to_pem(ca[0]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1  # the mesh CA and no system roots
