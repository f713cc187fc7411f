"""Liveness: when a node is suspect or lost, and how often agents should heartbeat.

Pure: the service passes what it knows about each node's session and ``now``; this says which
nodes change state and why. A closed session is suspect at once and lost after a short grace (a
crashed agent's tasks must be pending again within a second, while a reconnect inside the grace
keeps them); a silent but open session (frozen process, partition) is suspect after a few missed
beats and lost after a longer grace. After a coordinator restart every node gets a grace to come
back before it can be declared lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from planetary_mesh.core.states import NodeState


@dataclass(frozen=True)
class LivenessPolicy:
    heartbeat_interval: float = 1.0  # seconds between beats on a small mesh
    max_cluster_heartbeats: float = 500.0  # per second, all nodes together
    suspect_after_missed: float = 3.0  # beats missed before a silent node is suspect
    # Seconds of silence before a node is lost. 4 s: a frozen node's work runs elsewhere within
    # 5 s (the benchmark's freeze target) while the agents' lease (3 s) stays three beats and
    # far above the longest the coordinator's loop blocks (~0.9 s for a 100,000-task submit).
    lost_after_silence: float = 4.0
    lost_after_disconnect: float = 0.5  # seconds after its session closed
    restart_grace: float = 10.0  # after a coordinator restart, before any node can be lost

    def interval(self, nodes: int) -> float:
        """The heartbeat interval, stretched so ``nodes`` beats stay under the cluster cap."""
        return max(self.heartbeat_interval, nodes / self.max_cluster_heartbeats)

    def silence_limits(self, nodes: int) -> tuple[float, float]:
        """(suspect, lost) limits for a silent node; they stretch with the interval."""
        interval = self.interval(nodes)
        suspect = self.suspect_after_missed * interval
        lost = max(self.lost_after_silence, suspect + interval)
        return suspect, lost

    def lease(self, nodes: int) -> float:
        """How long an agent may go without hearing from the coordinator before it kills its
        own tasks: one beat before the coordinator would declare it lost and move its work,
        so that a cut-off agent's copy is gone before another copy starts."""
        return self.silence_limits(nodes)[1] - self.interval(nodes)


@dataclass(frozen=True)
class NodeLiveness:
    node_id: str
    state: NodeState
    connected: bool
    last_heard: float  # last message on the session (or when it closed), monotonic seconds
    not_lost_before: float = 0.0  # a grace the node is owed (after a coordinator restart)


@dataclass(frozen=True)
class LivenessChange:
    node_id: str
    state: NodeState
    reason: str


def liveness_changes(
    nodes: Iterable[NodeLiveness], now: float, policy: LivenessPolicy
) -> list[LivenessChange]:
    views = list(nodes)
    suspect_after, lost_after = policy.silence_limits(len(views))
    changes: list[LivenessChange] = []
    for node in views:
        if node.state is NodeState.LOST or now < node.not_lost_before:
            continue
        quiet = now - node.last_heard
        if node.connected:
            if quiet >= lost_after:
                changes.append(
                    LivenessChange(node.node_id, NodeState.LOST, f"silent for {quiet:.1f}s")
                )
            elif quiet >= suspect_after and node.state is not NodeState.SUSPECT:
                changes.append(
                    LivenessChange(node.node_id, NodeState.SUSPECT, f"silent for {quiet:.1f}s")
                )
        else:
            if quiet >= policy.lost_after_disconnect:
                changes.append(
                    LivenessChange(node.node_id, NodeState.LOST, f"session closed {quiet:.1f}s ago")
                )
            elif node.state is not NodeState.SUSPECT:
                changes.append(LivenessChange(node.node_id, NodeState.SUSPECT, "session closed"))
    return changes


def retry_backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait before the next attempt after ``failures`` failed ones: base·2^(n-1)."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 30)))
