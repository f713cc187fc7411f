"""A real coordinator for integration tests: `mesh init`, then `mesh coordinator` as a subprocess.

Everything is real: the CA and certificates, the HTTPS port (on 127.0.0.1 only, port chosen by
the kernel), the SQLite store and the process. The process is ended by pid in teardown, whatever
the test did. A second, unrelated CA stands in for "another mesh".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from planetary_mesh.config import CoordinatorPaths
from planetary_mesh.coordinator.bootstrap import init_mesh
from planetary_mesh.pki import certs
from planetary_mesh.sandbox.bwrap import bwrap_problem
from planetary_mesh.sandbox.scratch import sweep_scratch
from planetary_mesh.sandbox.user import TaskUser, task_user

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
    """The CA of another mesh and an admin user certificate it issued."""

    ca_pem: Path
    ca_hash: str  # what a join token of that mesh pins
    user_cert: Path
    user_key: Path


@dataclass(frozen=True)
class Coordinator:
    """A running `mesh coordinator` process and what `mesh init` made for it."""

    url: str  # https://127.0.0.1:PORT
    host: str
    port: int
    paths: CoordinatorPaths
    client_config: Path  # the admin's, as `mesh init` wrote it and the coordinator updated it
    process: subprocess.Popen[bytes]
    log: Path


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
        split = urlsplit(url)
        assert split.hostname == LOOPBACK and split.port is not None, url
        yield Coordinator(url, split.hostname, split.port, paths, client_config, proc, log)
    finally:
        stop_process(proc)


def _wait_for_url(paths: CoordinatorPaths, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        # The file is written in one go but not atomically: wait for its closing newline.
        text = paths.url_file.read_text() if paths.url_file.exists() else ""
        if text.endswith("\n"):
            return text.strip()
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


@pytest.fixture(scope="session", autouse=True)
def no_scratch_left_behind() -> Iterator[None]:
    """Sandbox runners that tests make and do not close leave their launcher folders in /tmp:
    this process's are removed once its tests are done, as an agent removes its own."""
    yield
    sweep_scratch(os.getpid())


@pytest.fixture(scope="session")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> ForeignCA:
    """Another mesh's CA and an admin user certificate from it."""
    root = tmp_path_factory.mktemp("foreign-ca")
    cert, key = certs.create_ca("elsewhere")
    user_cert, user_key = certs.issue_user_cert(cert, key, "admin", timedelta(days=1), admin=True)
    foreign = ForeignCA(
        ca_pem=root / "ca.pem",
        ca_hash=certs.ca_fingerprint(cert),
        user_cert=root / "user.pem",
        user_key=root / "user-key.pem",
    )
    certs.write_public_file(foreign.ca_pem, certs.cert_to_pem(cert))
    certs.write_public_file(foreign.user_cert, certs.cert_to_pem(user_cert))
    certs.write_private_file(foreign.user_key, certs.key_to_pem(user_key))
    return foreign


MeshCli = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def mesh_cli() -> MeshCli:
    """Run `python -m planetary_mesh ARGS...` to completion; killed by pid after ``timeout``."""

    def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "planetary_mesh", *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env=subprocess_env(),
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="module")
def task_account() -> TaskUser:
    """The real task user, for tests of the real sandbox: they need root (tasks drop to it and
    cgroups are made by root) and a working bwrap, and fail (never skip) without them."""
    if os.geteuid() != 0:
        pytest.fail("needs root: tasks drop to the task user, and cgroups are made by root")
    executable = shutil.which("bwrap")
    if executable is None:
        pytest.fail("bwrap is not installed")
    user = task_user()
    assert user is not None
    problem = bwrap_problem(executable, user)
    if problem is not None:
        pytest.fail(problem)
    return user
