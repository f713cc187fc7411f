"""A browser without a client certificate, for the integration tests of the browser's door and
the dashboard's endpoints: trusts the mesh's CA, keeps cookies, signs in with `mesh dashboard`."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx

from planetary_mesh.config import CoordinatorPaths
from planetary_mesh.pki import tls


class Coordinator(Protocol):
    """What the ``coordinator`` fixture (conftest.py) gives."""

    @property
    def url(self) -> str: ...
    @property
    def paths(self) -> CoordinatorPaths: ...
    @property
    def client_config(self) -> Path: ...


MeshCli = Callable[..., "subprocess.CompletedProcess[str]"]


def browser(coordinator: Coordinator) -> httpx.Client:
    """Like a browser: trusts the mesh's CA, has no client certificate, keeps cookies."""
    context = tls.client_ssl_context(coordinator.paths.ca_cert.read_bytes())
    return httpx.Client(base_url=coordinator.url, verify=context, timeout=10)


def login_url(mesh_cli: MeshCli, coordinator: Coordinator, config: Path | None = None) -> str:
    made = mesh_cli("dashboard", "--config", str(config or coordinator.client_config))
    assert made.returncode == 0, made.stderr
    assert "works once" in made.stderr
    url = made.stdout.strip()
    assert url.startswith(f"{coordinator.url}/login?token=")
    return url


def signed_in(coordinator: Coordinator, mesh_cli: MeshCli) -> tuple[httpx.Client, str]:
    """A browser signed in as the admin, and its session's CSRF token."""
    client = browser(coordinator)
    client.get(login_url(mesh_cli, coordinator), follow_redirects=True)
    home = client.get("/")
    assert home.status_code == 200, home.text
    found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', home.text)
    assert found, home.text
    return client, found.group(1)
