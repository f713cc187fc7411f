"""A real coordinator for integration tests: `mesh init`, then `mesh coordinator` as a subprocess.

Everything is real: the CA and certificates, the HTTPS port (on 127.0.0.1 only, port chosen by
the kernel), the SQLite store and the process. The process is ended by pid in teardown, whatever
the test did. A second, unrelated CA stands in for "another mesh".
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509

from planetary_mesh.client import Client
from planetary_mesh.config import CoordinatorPaths, load_client_config, write_client_config
from planetary_mesh.coordinator.bootstrap import init_mesh
from planetary_mesh.pki import certs, tls

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOOPBACK = "127.0.0.1"


def subprocess_env() -> dict[str, str]:
    """The environment for `mesh` subprocesses: none of the caller's mesh settings leak in.

    COLUMNS and LINES go too, so the CLI sees what it sees when its output is piped or logged.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MESH_") and key not in ("COLUMNS", "LINES")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM by pid, then SIGKILL if it has not exited within ``timeout``; always reaped."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class ForeignCA:
    """A CA of another mesh, with a user certificate it issued."""

    cert: x509.Certificate
    key: certs.PrivateKey
    ca_pem: Path
    user_cert: Path
    user_key: Path

    @property
    def ca_hash(self) -> str:
        return certs.ca_fingerprint(self.cert)


@dataclass(frozen=True)
class Coordinator:
    """A running coordinator process and what `mesh init` made for it."""

    url: str
    paths: CoordinatorPaths
    client_config: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host == LOOPBACK
        return host

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port

    @property
    def ca_hash(self) -> str:
        return certs.ca_fingerprint(certs.load_cert_pem(self.paths.ca_cert.read_bytes()))

    def ssl_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """Trusts this mesh's CA; presents ``cert`` as the client certificate when given."""
        return tls.client_ssl_context(self.paths.ca_cert.read_bytes(), cert, key)

    def http(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        """A plain HTTPS client for raw requests; no client certificate unless given."""
        return httpx.Client(base_url=self.url, verify=self.ssl_context(cert, key), timeout=10)

    def admin_http(self) -> httpx.Client:
        return self.http(self.paths.admin_cert, self.paths.admin_key)

    def admin(self) -> Client:
        """The mesh client library with the client.toml `mesh init` wrote (an admin)."""
        return Client(load_client_config(self.client_config))

    def user_config(self, name: str, *, admin: bool, directory: Path) -> Path:
        """Issue a user certificate from this mesh's CA and write a client.toml for it."""
        ca_cert = certs.load_cert_pem(self.paths.ca_cert.read_bytes())
        ca_key = certs.load_key_pem(self.paths.ca_key.read_bytes())
        cert, key = certs.issue_user_cert(ca_cert, ca_key, name, timedelta(days=1), admin=admin)
        directory.mkdir(parents=True, exist_ok=True)
        certs.write_public_file(directory / f"{name}.pem", certs.cert_to_pem(cert))
        certs.write_private_file(directory / f"{name}-key.pem", certs.key_to_pem(key))
        config = directory / f"{name}.toml"
        write_client_config(
            config,
            self.url,
            self.paths.ca_cert,
            directory / f"{name}.pem",
            directory / f"{name}-key.pem",
        )
        return config


@contextlib.contextmanager
def running_coordinator(root: Path) -> Iterator[Coordinator]:
    """`mesh init` in ``root``, then `mesh coordinator` on 127.0.0.1 with a kernel-chosen port."""
    paths = CoordinatorPaths(root)
    client_config = root / "client.toml"
    init_mesh(paths, client_config, [LOOPBACK, "localhost"])
    log = root / "coordinator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "planetary_mesh",
                "coordinator",
                "--data-dir",
                str(paths.root),
                "--listen",
                f"{LOOPBACK}:0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=subprocess_env(),
        )
    try:
        url = _wait_for_url(paths, proc, log)
        # `mesh coordinator` rewrites the client.toml beside its data dir with the real port.
        yield Coordinator(url, paths, client_config, proc, log)
    finally:
        stop_process(proc)


def _wait_for_url(paths: CoordinatorPaths, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        # The file is written in one go but not atomically: wait for its closing newline.
        text = paths.url_file.read_text() if paths.url_file.exists() else ""
        if text.endswith("\n"):
            url = text.strip()
            assert urlsplit(url).hostname == LOOPBACK, url
            return url
        if proc.poll() is not None:
            raise RuntimeError(
                f"the coordinator exited with {proc.returncode} before listening:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the coordinator did not write {paths.url_file} within {START_TIMEOUT:.0f} s:\n"
                f"{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.01)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """One coordinator shared by a module's tests; they compare before and after, not totals."""
    with running_coordinator(tmp_path_factory.mktemp("mesh")) as running:
        yield running


@pytest.fixture
def fresh_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator of its own, for tests that need an empty mesh."""
    with running_coordinator(tmp_path / "mesh") as running:
        yield running


@pytest.fixture(scope="session")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> ForeignCA:
    """Another mesh's CA and an admin user certificate from it."""
    root = tmp_path_factory.mktemp("foreign-ca")
    cert, key = certs.create_ca("elsewhere")
    user_cert, user_key = certs.issue_user_cert(cert, key, "admin", timedelta(days=1), admin=True)
    foreign = ForeignCA(
        cert=cert,
        key=key,
        ca_pem=root / "ca.pem",
        user_cert=root / "user.pem",
        user_key=root / "user-key.pem",
    )
    certs.write_public_file(foreign.ca_pem, certs.cert_to_pem(cert))
    certs.write_public_file(foreign.user_cert, certs.cert_to_pem(user_cert))
    certs.write_private_file(foreign.user_key, certs.key_to_pem(user_key))
    return foreign
