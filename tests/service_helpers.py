"""A coordinator service on a real SQLite store, without a network, and agent sessions made by
hand: what the service-level integration tests drive directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.coordinator.sessions import AgentSession
from planetary_mesh.pki import certs
from planetary_mesh.protocol import Hello
from planetary_mesh.store.sqlite import SQLiteStore

MIB = 2**20


def make_service(tmp_path: Path) -> CoordinatorService:
    ca_cert, ca_key = certs.create_ca("test")
    return CoordinatorService(SQLiteStore(tmp_path / "mesh.db"), ca_cert, ca_key)


def connect(service: CoordinatorService, node_id: str, cpus: float) -> AgentSession:
    """A node that joined and opened its session, with 64 GiB and nothing running."""
    service.store.add_node(node_id, node_id, 1, 0.0)
    hello = Hello(
        type="hello",
        name=node_id,
        cpus=cpus,
        memory=64 * 1024 * MIB,
        sandbox="bwrap",
        version="test",
        held=[],
    )
    return service.agent_connected(node_id, hello)


def messages(session: AgentSession, kind: str) -> list[dict[str, Any]]:
    """The messages of ``kind`` sent to the session so far (the rest are dropped)."""
    found = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message["type"] == kind:
            found.append(message)
    return found
