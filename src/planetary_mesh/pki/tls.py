"""TLS contexts that trust the mesh's CA and nothing else.

Neither side loads the system trust store: a certificate from a public CA proves nothing about
membership of this mesh. Both sides also turn on OpenSSL's strict X.509 checks, which the
certificates from :mod:`planetary_mesh.pki.certs` are built to pass.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from planetary_mesh.errors import TrustError


def unverified_client_context() -> ssl.SSLContext:
    """A client context that checks nothing: only for fetching a CA whose hash the caller then
    compares with a join token's pin (the pin, not this connection, is the proof)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def server_ssl_context(ca_pem: Path, cert_pem: Path, key_pem: Path) -> ssl.SSLContext:
    """The coordinator's context: a client certificate is verified if sent, but not required.

    ``CERT_OPTIONAL`` lets ``/healthz`` and the token-authenticated join work before a peer has
    a certificate; the application refuses every other route unless a verified one was sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    try:
        ctx.load_verify_locations(cafile=str(ca_pem))
    except (OSError, ValueError) as err:
        raise TrustError(f"could not load the CA certificate from {ca_pem}: {err}") from err
    try:
        ctx.load_cert_chain(certfile=str(cert_pem), keyfile=str(key_pem))
    except (OSError, ValueError) as err:
        raise TrustError(
            f"could not load the coordinator certificate {cert_pem} with key {key_pem}: {err}"
        ) from err
    return ctx


def client_ssl_context(
    ca_pem: bytes, cert_pem: Path | None = None, key_pem: Path | None = None
) -> ssl.SSLContext:
    """A client context that accepts only a coordinator certified by the given CA (PEM bytes).

    With ``cert_pem`` (and ``key_pem``, unless the key is in the same file) the client proves its
    own identity; without, it can still reach the routes that need no client certificate.
    """
    if key_pem is not None and cert_pem is None:
        raise TrustError("a client key was given without its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # cadata as str means PEM; as bytes Python would read it as DER.
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as err:
        raise TrustError(f"the mesh CA certificate is not a usable PEM certificate: {err}") from err
    if cert_pem is not None:
        try:
            ctx.load_cert_chain(
                certfile=str(cert_pem), keyfile=None if key_pem is None else str(key_pem)
            )
        except (OSError, ValueError) as err:
            raise TrustError(
                f"could not load the client certificate {cert_pem} with key {key_pem or cert_pem}: "
                f"{err}"
            ) from err
    return ctx


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
