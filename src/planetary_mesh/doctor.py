"""`mesh doctor`: what this machine sees of its mesh, and why joining or connecting fails.

Each check gives a Finding: what was seen, whether it is a problem, and what to do about it. The
checks go from the bottom up (this machine's addresses, mDNS, the coordinator's port, TLS, the
clock, certificates), so the first problem listed is usually the one to fix first.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from planetary_mesh.discovery import Advertised, browse, interface_addresses
from planetary_mesh.errors import TrustError
from planetary_mesh.pki import certs, tls

CONNECT_TIMEOUT_S = 3.0
SKEW_WARN = timedelta(seconds=30)  # certificates are backdated by certs.CLOCK_SKEW (5 min)
EXPIRY_WARN = timedelta(hours=2)


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    seen: str
    fix: str = ""  # what to do, when not ok


@dataclass
class Subject:
    """What the doctor looks for: a CA (by hash, with its PEM when known), where the
    coordinator may be, and the certificate this machine uses."""

    ca_hash: str
    ca_pem: bytes | None = None
    coordinator: str | None = None
    cert: Path | None = None


def interfaces() -> Finding:
    found = [f"{name} {address}" for name, address in interface_addresses()]
    if not found:
        return Finding(
            "network",
            False,
            "no address but loopback",
            "connect this machine to the LAN (cable or Wi-Fi) and check it got an address",
        )
    return Finding("network", True, "; ".join(sorted(found)))


def mdns(ca_hash: str, seconds: float) -> tuple[Finding, list[Advertised]]:
    try:
        seen = asyncio.run(browse(seconds))
    except Exception as exc:  # zeroconf's own errors, OSError
        fix = "check that this machine may send multicast (UDP 5353), or use --coordinator"
        return Finding("mdns", False, f"cannot browse over mDNS: {exc}", fix), []
    if not seen:
        return (
            Finding(
                "mdns",
                False,
                f"no mesh answered over mDNS within {seconds:g} s",
                "multicast (UDP port 5353) may be blocked here or on the network, the"
                " coordinator may run with --no-mdns or on another subnet: pass --coordinator"
                " https://HOST:PORT",
            ),
            [],
        )
    words = []
    for found in seen:
        whose = "this mesh" if found.ca_hash == ca_hash else "another CA: ignored"
        words.append(f"{found.mesh or found.name} at {', '.join(found.urls())} ({whose})")
    mine = [a for a in seen if a.ca_hash == ca_hash]
    if not mine:
        return (
            Finding(
                "mdns",
                False,
                "only other meshes answered: " + "; ".join(words),
                "the token or certificate here belongs to a mesh whose coordinator is not"
                " advertised on this LAN: check the token, or pass --coordinator",
            ),
            seen,
        )
    return Finding("mdns", True, "; ".join(words)), seen


def reachable(url: str) -> Finding:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except ConnectionRefusedError:
        return Finding(
            "port",
            False,
            f"{host}:{port} refused the connection",
            "the machine is there but nothing listens on that port: start `mesh coordinator`"
            " there, or check the port",
        )
    except TimeoutError:
        return Finding(
            "port",
            False,
            f"{host}:{port} did not answer within {CONNECT_TIMEOUT_S:g} s",
            "a firewall may drop the port, or the address is wrong (DHCP may have moved it)",
        )
    except OSError as exc:
        return Finding(
            "port",
            False,
            f"cannot reach {host}:{port}: {exc.strerror or exc}",
            "check the address and that this machine has a route to it",
        )
    return Finding("port", True, f"{host}:{port} accepts connections")


def tls_check(url: str, subject: Subject, server_name: str | None) -> tuple[Finding, float | None]:
    """The TLS handshake against the mesh's CA, and the coordinator's clock (seconds ahead of
    ours) from its Date header."""
    if subject.ca_pem is None:  # a token only: fetch the CA as joining does, and check the pin
        fetched = _fetch_ca(url)
        if isinstance(fetched, Finding):
            return fetched, None
        actual = certs.ca_fingerprint(certs.load_cert_pem(fetched))
        if actual != subject.ca_hash:
            return (
                Finding(
                    "tls",
                    False,
                    f"the coordinator at {url} belongs to another mesh (CA {actual[:12]}…; the"
                    f" token pins {subject.ca_hash[:12]}…)",
                    "check the address: the token was made on another coordinator",
                ),
                None,
            )
        subject.ca_pem = fetched
    try:
        context = tls.client_ssl_context(subject.ca_pem)
    except TrustError as exc:
        return Finding("tls", False, str(exc), "fix or replace the CA file"), None
    extensions = {} if server_name is None else {"sni_hostname": server_name}
    try:
        with httpx.Client(verify=context, timeout=CONNECT_TIMEOUT_S * 2) as client:
            sent = time.time()
            response = client.get(f"{url.rstrip('/')}/healthz", extensions=extensions)
            received = time.time()
    except httpx.ConnectError as exc:
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message
            if "mismatch" in why:
                fix = (
                    "the certificate is this mesh's but not made for this address: use the"
                    " address in `mesh init --host`, or `mesh rotate-server-cert --host` there"
                )
            else:
                fix = (
                    "the server there is not this mesh's coordinator (another mesh, or"
                    " something else): check the address and the token or config"
                )
            return Finding("tls", False, f"its certificate does not verify: {why}", fix), None
        return Finding("tls", False, f"TLS failed: {exc}", "check the address and port"), None
    except httpx.HTTPError as exc:
        return Finding("tls", False, f"no answer over TLS: {exc}", "check the address"), None
    skew = None
    date = response.headers.get("date")
    if date:
        theirs = email.utils.parsedate_to_datetime(date).timestamp()
        skew = theirs - (sent + received) / 2
    return Finding("tls", True, f"the coordinator proves it holds this mesh's CA ({url})"), skew


def _fetch_ca(url: str) -> bytes | Finding:
    """The CA a coordinator hands joining agents, fetched without checking (the caller pins)."""
    insecure = tls.unverified_client_context()
    try:
        with httpx.Client(verify=insecure, timeout=CONNECT_TIMEOUT_S * 2) as client:
            body = client.get(f"{url.rstrip('/')}/v1/join").raise_for_status().json()
        return str(body["ca"]).encode()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return Finding(
            "tls",
            False,
            f"the server at {url} does not answer as a mesh coordinator: {exc}",
            "check the address and port",
        )


def clock(skew: float | None) -> Finding:
    if skew is None:
        return Finding("clock", True, "not compared (no answer with a date)")
    words = f"the coordinator's clock is {abs(skew):.0f} s {'ahead' if skew > 0 else 'behind'}"
    if abs(skew) > SKEW_WARN.total_seconds() + 1:  # Date has 1 s resolution
        return Finding(
            "clock",
            False,
            words,
            "turn on time sync on both machines (systemd-timesyncd, chrony): certificates"
            " start and end by the clock",
        )
    return Finding("clock", True, words)


def certificate(cert: Path | None, now: datetime | None = None) -> Finding:
    if cert is None:
        return Finding("certificate", True, "none yet (joining makes one)")
    now = now or datetime.now(UTC)
    try:
        loaded = certs.load_cert_pem(cert.read_bytes())
    except (OSError, TrustError) as exc:
        return Finding("certificate", False, f"cannot read {cert}: {exc}", "join again")
    ends = loaded.not_valid_after_utc
    if ends <= now:
        return Finding(
            "certificate",
            False,
            f"{cert} expired at {ends:%Y-%m-%d %H:%M} UTC",
            "an agent: join again with a new token and a new data dir; a person: ask an admin"
            " for a new certificate (`mesh users add`)",
        )
    left = ends - now
    if left < EXPIRY_WARN:
        return Finding(
            "certificate",
            False,
            f"{cert} expires in {left.total_seconds() / 60:.0f} min",
            "a running agent renews its own; if it keeps failing, check the coordinator is"
            " reachable from here",
        )
    return Finding("certificate", True, f"{cert} valid until {ends:%Y-%m-%d %H:%M} UTC")


def examine(subject: Subject, seconds: float = 3.0) -> list[Finding]:
    """Every check, bottom up; later ones run only where they can tell something."""
    findings = [interfaces()]
    found, seen = mdns(subject.ca_hash, seconds)
    findings.append(found)
    url, server_name = subject.coordinator, None
    if url is None:
        mine = [a for a in seen if a.ca_hash == subject.ca_hash]
        if mine:
            url, server_name = mine[0].urls()[0], certs.COORDINATOR_NAME
    if url is None:
        findings.append(
            Finding(
                "coordinator",
                False,
                "no address to try (none given, none found)",
                "pass --coordinator https://HOST:PORT",
            )
        )
    else:
        port = reachable(url)
        findings.append(port)
        if port.ok:
            handshake, skew = tls_check(url, subject, server_name)
            findings.append(handshake)
            if handshake.ok:
                findings.append(clock(skew))
    findings.append(certificate(subject.cert))
    return findings
