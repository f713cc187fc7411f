"""Joining a mesh: pin the CA by the token's hash, send a CSR, keep what comes back.

The CA certificate is fetched over an unverified connection only to compare its key hash with
the token; the CSR then travels over a connection verified against that pinned CA, so it never
reaches a server that cannot prove it holds the pinned CA's certificate.
"""

from __future__ import annotations

import ssl

import httpx

from planetary_mesh.config import AgentPaths, read_toml, write_toml
from planetary_mesh.errors import CoordinatorUnreachable, TokenError, TrustError
from planetary_mesh.pki import certs, tls, tokens


def join(coordinator: str, token_text: str, name: str, paths: AgentPaths) -> str:
    """Join the mesh at ``coordinator``; the node id it chose. Files land in ``paths``."""
    token = tokens.parse_join_token(token_text)
    base = coordinator.rstrip("/")
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        with httpx.Client(verify=insecure, timeout=10) as probe:
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
    write_toml(paths.state, {"coordinator": base, "node_id": node_id, "name": name})
    return node_id


def joined_state(paths: AgentPaths) -> dict[str, str] | None:
    """What an earlier join stored (coordinator, node_id, name), or None if never joined."""
    if not (paths.state.exists() and paths.cert.exists() and paths.key.exists()):
        return None
    raw = read_toml(paths.state)
    return {k: str(v) for k, v in raw.items()}
