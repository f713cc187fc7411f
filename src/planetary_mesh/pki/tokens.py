"""One-time join tokens: ``PMTKN-1-<CA hash>-<secret>``.

A token carries two things an agent needs before it trusts anything: the SHA-256 of the CA's
public key, so it can pin the coordinator's CA on first contact without a trusted channel, and a
secret that proves to the coordinator the holder was invited. The coordinator stores only a
hash of the secret, so a leaked database cannot be replayed as tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from planetary_mesh.errors import CAMismatchError, TokenError
from planetary_mesh.pki.certs import ca_fingerprint, load_cert_pem

TOKEN_PREFIX = "PMTKN-1-"
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_SECRET_RE = re.compile(r"[a-z0-9]{32}")
_COPY_HINT = "copy the whole token printed by `mesh token create`"


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token; ``repr`` hides the secret so tokens never end up in logs by accident."""

    ca_hash: str  # 64 lowercase hex: sha256 of the CA's SubjectPublicKeyInfo DER
    secret: str = field(repr=False)  # 32 lowercase base32 characters, never '-'

    def __post_init__(self) -> None:
        if not _HASH_RE.fullmatch(self.ca_hash):
            raise TokenError(
                f"the join token's CA hash must be 64 lowercase hexadecimal characters, "
                f"got {len(self.ca_hash)} characters; {_COPY_HINT}"
            )
        if not _SECRET_RE.fullmatch(self.secret):
            raise TokenError(
                f"the join token's secret must be 32 letters and digits, "
                f"got {len(self.secret)} characters; {_COPY_HINT}"
            )

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}{self.ca_hash}-{self.secret}"


def new_join_token(ca_hash: str) -> JoinToken:
    """Make a token with 160 random bits of secret (20 bytes = exactly 32 base32 characters)."""
    secret = base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()
    return JoinToken(ca_hash=ca_hash, secret=secret)


def parse_join_token(text: str) -> JoinToken:
    """Read a token pasted by a person; every error says what is wrong and what to do."""
    text = text.strip()
    if not text:
        raise TokenError(f"the join token is empty; {_COPY_HINT}")
    if not text.startswith(TOKEN_PREFIX):
        if text.startswith("PMTKN-"):
            raise TokenError(
                "this join token is from a different version of Planetary Mesh (expected "
                f"{TOKEN_PREFIX}...); create one with `mesh token create` on this mesh's "
                "coordinator"
            )
        raise TokenError(
            f"this is not a Planetary Mesh join token (it should start with {TOKEN_PREFIX}); "
            f"{_COPY_HINT}"
        )
    ca_hash, sep, secret = text.removeprefix(TOKEN_PREFIX).partition("-")
    if not sep or not secret:
        raise TokenError(
            f"the join token is cut short: the secret after the CA hash is missing; {_COPY_HINT}"
        )
    return JoinToken(ca_hash=ca_hash.lower(), secret=secret.lower())


def hash_secret(secret: str) -> str:
    """What the coordinator stores instead of the secret itself (SHA-256, hex)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secrets_match(secret: str, stored_hash: str) -> bool:
    """Compare in constant time so response timing does not leak the stored hash."""
    return hmac.compare_digest(hash_secret(secret).encode(), stored_hash.encode("utf-8"))


def check_ca_pin(token: JoinToken, ca_pem: bytes) -> x509.Certificate:
    """Accept the CA a coordinator hands a joining agent only if it is the one the token pins."""
    ca_cert = load_cert_pem(ca_pem)
    actual = ca_fingerprint(ca_cert)
    if not hmac.compare_digest(actual, token.ca_hash):
        raise CAMismatchError(
            f"the coordinator's CA (sha256 {actual[:16]}...) is not the one this token pins "
            f"(sha256 {token.ca_hash[:16]}...); check that the coordinator address is right and "
            "that the token was created on that coordinator"
        )
    try:
        ca_cert.verify_directly_issued_by(ca_cert)  # the pin covers the key; make the rest honest
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CAMismatchError(
            "the coordinator's CA certificate is not validly self-signed"
        ) from err
    return ca_cert
