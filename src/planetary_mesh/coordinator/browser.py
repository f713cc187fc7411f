"""The browser's door: a one-time login link becomes a session cookie; no client certificate.

`mesh dashboard` asks the coordinator (over the user's own certificate) for a login link. The
link works once, for LOGIN_TTL_S, and becomes a session cookie (HttpOnly, Secure,
SameSite=Strict, Max-Age) that stands for that user, with that user's role, until it expires or
the user logs out. A browser request that changes something must also carry the session's CSRF
token in the X-CSRF-Token header and, if it says where it comes from, come from this origin:
SameSite=Strict already keeps the cookie off other sites' requests; the header keeps it off
anything a page could make a browser send by itself (forms, images).

Links live in memory only (two minutes; a restart voids them). Sessions are also written to
the store, so a coordinator restart does not sign browsers out. Both are kept as hashes of their
secrets: neither a copy of the process's memory nor of the store names a usable cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from planetary_mesh.core.model import BrowserSessionRecord
from planetary_mesh.errors import TrustError
from planetary_mesh.pki import certs

LOGIN_TTL_S = 120.0
SESSION_TTL_S = 8 * 3600.0
COOKIE = "mesh_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class BrowserSession:
    user: certs.Identity  # whose link it was: name, role, and the certificate serial behind it
    expires_at: float
    csrf: str

    def csrf_matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


class SessionStore(Protocol):
    """Where sessions outlive the process: the coordinator's store."""

    def add_browser_session(self, record: BrowserSessionRecord) -> None: ...
    def end_browser_sessions(self, now: float, digest: str | None = None) -> None: ...
    def browser_sessions(self, now: float) -> list[BrowserSessionRecord]: ...


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class BrowserLogins:
    def __init__(
        self,
        clock: Callable[[], float],
        login_ttl: float = LOGIN_TTL_S,
        session_ttl: float = SESSION_TTL_S,
        store: SessionStore | None = None,
    ) -> None:
        self._clock = clock
        self.login_ttl = login_ttl
        self.session_ttl = session_ttl
        self._store = store
        self._links: dict[str, tuple[certs.Identity, float]] = {}
        self._sessions: dict[str, BrowserSession] = {}
        if store is not None:
            for r in store.browser_sessions(clock()):
                user = certs.Identity(
                    kind=certs.PeerKind.USER,
                    name=r.user,
                    serial=r.cert_serial,
                    not_after=datetime.fromtimestamp(r.cert_not_after, UTC),
                    admin=r.admin,
                )
                self._sessions[r.digest] = BrowserSession(user, r.expires_at, r.csrf)

    def create_link(self, user: certs.Identity) -> tuple[str, float]:
        """A one-time login secret for ``user``, and when it expires."""
        self._forget_expired()
        secret = secrets.token_urlsafe(32)
        expires = self._clock() + self.login_ttl
        self._links[_digest(secret)] = (user, expires)
        return secret, expires

    def redeem(self, secret: str) -> tuple[str, BrowserSession]:
        """Use a login secret (once): a new session's cookie value, and the session."""
        found = self._links.pop(_digest(secret), None)
        if found is None or found[1] <= self._clock():
            raise TrustError(
                "this login link was used already, has expired or was never made: run"
                " `mesh dashboard` again for a new one"
            )
        cookie = secrets.token_urlsafe(32)
        user = found[0]
        session = BrowserSession(user, self._clock() + self.session_ttl, secrets.token_hex(16))
        digest = _digest(cookie)
        if self._store is not None:
            self._store.add_browser_session(
                BrowserSessionRecord(
                    digest=digest,
                    user=user.name,
                    admin=user.admin,
                    cert_serial=user.serial,
                    cert_not_after=user.not_after.timestamp(),
                    csrf=session.csrf,
                    expires_at=session.expires_at,
                )
            )
        self._sessions[digest] = session
        return cookie, session

    def session(self, cookie: str | None) -> BrowserSession | None:
        if not cookie:
            return None
        key = _digest(cookie)
        found = self._sessions.get(key)
        if found is not None and found.expires_at <= self._clock():
            del self._sessions[key]
            return None
        return found

    def end(self, cookie: str | None) -> None:
        if cookie:
            digest = _digest(cookie)
            self._sessions.pop(digest, None)
            if self._store is not None:
                self._store.end_browser_sessions(self._clock(), digest)

    def _forget_expired(self) -> None:
        now = self._clock()
        for key in [k for k, (_, expires) in self._links.items() if expires <= now]:
            del self._links[key]
        expired = [k for k, s in self._sessions.items() if s.expires_at <= now]
        for key in expired:
            del self._sessions[key]
        if expired and self._store is not None:
            self._store.end_browser_sessions(now)
