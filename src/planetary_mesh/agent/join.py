"""Joining a mesh: pin the CA by the token's hash, send a CSR, keep what comes back.

The CA certificate is fetched over an unverified connection only to compare its key hash with
the token; the CSR then travels over a connection verified against that pinned CA, so it never
reaches a server that cannot prove it holds the pinned CA's certificate.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from planetary_mesh.config import AgentPaths, read_toml, write_toml
from planetary_mesh.discovery import describe_others, find_coordinator
from planetary_mesh.errors import CoordinatorUnreachable, DiscoveryError, TokenError, TrustError
from planetary_mesh.pki import certs, tls, tokens

log = logging.getLogger(__name__)


def join(
    coordinator: str,
    token_text: str,
    name: str,
    paths: AgentPaths,
    server_name: str | None = None,
) -> str:
    """Join the mesh at ``coordinator``; the node id it chose. Files land in ``paths``. With
    ``server_name`` the coordinator's certificate is checked for that name, not the address
    (an address found by mDNS: ADR 13); it is kept for the agent's later connections."""
    token = tokens.parse_join_token(token_text)
    base = coordinator.rstrip("/")
    try:
        with httpx.Client(verify=tls.unverified_client_context(), timeout=10) as probe:
            ca_pem = probe.get(f"{base}/v1/join").raise_for_status().json()["ca"].encode()
    except httpx.HTTPError as exc:
        raise CoordinatorUnreachable(
            f"cannot reach the coordinator at {base}: {exc}; check the address and that "
            "`mesh coordinator` is running"
        ) from exc
    tokens.check_ca_pin(token, ca_pem)  # CAMismatchError: not the mesh the token belongs to
    key = certs.generate_key()
    csr = certs.make_csr(key, name)
    try:
        with httpx.Client(verify=tls.client_ssl_context(ca_pem), timeout=30) as client:
            response = client.post(
                f"{base}/v1/join",
                json={"token": token_text.strip(), "csr": csr.decode(), "name": name},
                extensions=tls_name(server_name),
            )
    except httpx.HTTPError as exc:
        raise CoordinatorUnreachable(
            f"the coordinator at {base} failed the pinned TLS check or went away: {exc}"
        ) from exc
    if response.status_code == 403:
        raise TokenError(response.json().get("error", "the coordinator refused the token"))
    if response.status_code != 200:
        raise TrustError(f"joining failed ({response.status_code}): {response.text[:300]}")
    body = response.json()
    paths.root.mkdir(parents=True, exist_ok=True)
    certs.write_private_file(paths.key, certs.key_to_pem(key))
    certs.write_public_file(paths.cert, body["certificate"].encode())
    certs.write_public_file(paths.ca_cert, ca_pem)
    node_id = str(body["node_id"])
    state = {"coordinator": base, "node_id": node_id, "name": name}
    if server_name is not None:
        state["server_name"] = server_name
    write_toml(paths.state, state)
    return node_id


def tls_name(server_name: str | None) -> dict[str, str]:
    """httpx request extensions that check the certificate for ``server_name`` (if any)."""
    return {} if server_name is None else {"sni_hostname": server_name}


def find_and_join(token_text: str, name: str, paths: AgentPaths, seconds: float) -> str:
    """Find the coordinator of the token's mesh by mDNS and join it; the node id. Meshes with
    another CA are logged and ignored; finding none raises DiscoveryError saying what to do."""
    token = tokens.parse_join_token(token_text)
    urls, others = asyncio.run(find_coordinator(token.ca_hash, seconds))
    for other in others:
        log.warning(
            "ignored the mesh %r advertised at %s: another CA (%s…), not the one this token pins",
            other.mesh,
            ", ".join(other.urls()),
            other.ca_hash[:12],
        )
    if not urls:
        raise DiscoveryError(
            f"no coordinator of this token's mesh answered over mDNS within {seconds:g} s"
            f" ({describe_others(others)}): check that it runs on this LAN without --no-mdns"
            " and that multicast (UDP port 5353) is not blocked here, or pass --coordinator"
            " https://HOST:PORT"
        )
    failure: CoordinatorUnreachable | None = None
    for url in urls:
        log.warning("found this mesh's coordinator at %s by mDNS", url)
        try:
            return join(url, token_text, name, paths, server_name=certs.COORDINATOR_NAME)
        except CoordinatorUnreachable as exc:
            failure = exc
    assert failure is not None
    raise failure


def joined_state(paths: AgentPaths) -> dict[str, str] | None:
    """What an earlier join stored (coordinator, node_id, name), or None if never joined."""
    if not (paths.state.exists() and paths.cert.exists() and paths.key.exists()):
        return None
    raw = read_toml(paths.state)
    return {k: str(v) for k, v in raw.items()}
