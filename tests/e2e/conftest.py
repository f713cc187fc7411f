"""End-to-end fixtures: real coordinator and agent processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from planetary_mesh.client import Client
from planetary_mesh.testing import LocalMesh

ENDED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    local = LocalMesh(tmp_path_factory.mktemp("mesh"), agents=3, agent_cpus=2)
    with local:
        yield local


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[Client]:
    with mesh.client() as c:
        yield c
