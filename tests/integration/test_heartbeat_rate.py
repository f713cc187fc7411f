"""The cluster-wide heartbeat rate is capped: as nodes join, every agent is told a longer
interval (and lease); as they are lost, a shorter one. Real SQLite, fake sessions, no network."""

from __future__ import annotations

from pathlib import Path

from service_helpers import messages

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.core.liveness import LivenessPolicy
from planetary_mesh.pki import certs
from planetary_mesh.protocol import Hello
from planetary_mesh.store.sqlite import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_interval_stretches_to_keep_the_mesh_under_its_beat_cap(tmp_path: Path) -> None:
    clock = Clock()
    ca_cert, ca_key = certs.create_ca("test")
    policy = LivenessPolicy(heartbeat_interval=1.0, max_cluster_heartbeats=4.0)
    service = CoordinatorService(
        SQLiteStore(tmp_path / "mesh.db"), ca_cert, ca_key, policy=policy, clock=clock
    )
    sessions = []
    for i in range(8):
        node_id = f"n-{i}"
        service.store.add_node(node_id, node_id, i, clock.now)
        hello = Hello(
            type="hello", name=node_id, cpus=1, memory=2**30, sandbox="bwrap", version="t",
            held=[],
        )  # fmt: skip
        sessions.append(service.agent_connected(node_id, hello))
    # The last to join was welcomed with the stretched interval: 8 nodes / 4 beats per second.
    (welcome,) = messages(sessions[-1], "welcome")
    assert welcome["heartbeat_interval"] == 2.0
    # The lease stretches too, ending one beat before the node would be declared lost.
    assert welcome["lease"] == policy.silence_limits(8)[1] - 2.0
    # The first was told each time the interval grew past the base.
    timings = messages(sessions[0], "timing")
    assert [t["heartbeat_interval"] for t in timings] == [1.25, 1.5, 1.75, 2.0]
    assert 8 / timings[-1]["heartbeat_interval"] <= policy.max_cluster_heartbeats

    # Half the mesh goes away for good: the survivors may beat faster again.
    for session in sessions[4:]:
        service.agent_disconnected(session)
    clock.now += policy.lost_after_disconnect
    service.check_liveness()
    timings = messages(sessions[0], "timing")
    assert timings and timings[-1]["heartbeat_interval"] == 1.0
