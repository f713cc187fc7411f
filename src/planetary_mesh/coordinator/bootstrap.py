"""`mesh init`: make a mesh's CA, the coordinator's certificate and an admin's client bundle."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

from planetary_mesh.config import (
    DEFAULT_PORT,
    CoordinatorPaths,
    read_toml,
    write_client_config,
    write_toml,
)
from planetary_mesh.errors import ConfigError
from planetary_mesh.pki import certs

SERVER_CERT_LIFETIME = timedelta(days=365)
USER_CERT_LIFETIME = timedelta(days=365)


def default_hosts() -> list[str]:
    hosts = ["localhost", "127.0.0.1", "::1"]
    name = socket.gethostname()
    if name and name not in hosts:
        hosts.append(name)
    return hosts


def init_mesh(
    paths: CoordinatorPaths,
    client_config: Path,
    hosts: list[str],
    mesh_name: str = "mesh",
    port: int = DEFAULT_PORT,
) -> None:
    if paths.ca_key.exists():
        raise ConfigError(
            f"a mesh already exists in {paths.root}: use it, or pick another --data-dir"
        )
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o700)
    hosts = hosts or default_hosts()
    ca_cert, ca_key = certs.create_ca(mesh_name)
    certs.write_private_file(paths.ca_key, certs.key_to_pem(ca_key))
    certs.write_public_file(paths.ca_cert, certs.cert_to_pem(ca_cert))
    server_cert, server_key = certs.issue_server_cert(ca_cert, ca_key, hosts, SERVER_CERT_LIFETIME)
    certs.write_private_file(paths.server_key, certs.key_to_pem(server_key))
    certs.write_public_file(paths.server_cert, certs.cert_to_pem(server_cert))
    user_cert, user_key = certs.issue_user_cert(
        ca_cert, ca_key, "admin", USER_CERT_LIFETIME, admin=True
    )
    certs.write_private_file(paths.admin_key, certs.key_to_pem(user_key))
    certs.write_public_file(paths.admin_cert, certs.cert_to_pem(user_cert))
    write_toml(paths.settings, {"mesh_name": mesh_name, "hosts": hosts})
    write_client_config(
        client_config,
        coordinator_url(hosts[0], port),
        paths.ca_cert,
        paths.admin_cert,
        paths.admin_key,
    )


def rotate_server_cert(paths: CoordinatorPaths, hosts: list[str]) -> certs.Identity:
    """Issue the coordinator a new server certificate (and key) from the mesh CA, for ``hosts``
    or, when none are given, the hosts it was made for. A running coordinator picks it up by
    itself (it watches the file); agents and clients trust it already (same CA)."""
    if not paths.ca_key.exists():
        raise ConfigError(f"no mesh in {paths.root}: this command runs on the coordinator host")
    ca_cert = certs.load_cert_pem(paths.ca_cert.read_bytes())
    ca_key = certs.load_key_pem(paths.ca_key.read_bytes())
    settings = read_toml(paths.settings) if paths.settings.exists() else {}
    listed = settings.get("hosts", [])
    known = [str(h) for h in listed] if isinstance(listed, list) else []
    hosts = hosts or known or default_hosts()
    server_cert, server_key = certs.issue_server_cert(ca_cert, ca_key, hosts, SERVER_CERT_LIFETIME)
    # The key first: the coordinator reloads when the certificate changes, so the pair it then
    # reads matches.
    certs.write_private_file(paths.server_key, certs.key_to_pem(server_key))
    certs.write_public_file(paths.server_cert, certs.cert_to_pem(server_cert))
    write_toml(paths.settings, {**settings, "hosts": hosts})
    return certs.identity_of(server_cert)


def ensure_coordinator_name(paths: CoordinatorPaths) -> bool:
    """Re-issue the server certificate if it lacks COORDINATOR_NAME (made before discovery);
    whether it did."""
    if certs.names_coordinator(certs.load_cert_pem(paths.server_cert.read_bytes())):
        return False
    rotate_server_cert(paths, [])
    return True


def coordinator_url(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"
