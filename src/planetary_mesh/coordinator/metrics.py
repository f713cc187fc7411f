"""Prometheus metrics of one coordinator, in a registry of its own (never the global one: a
process may run several services, as the tests do).

Counters and histograms are fed where things happen (service.py); the state of the mesh (nodes
and tasks by state, queue depth, live sessions) is read from the store at scrape time, so it is
the same truth the API shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from planetary_mesh.core.states import NodeState, TaskState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


class MeshState(Protocol):
    """What the scrape reads: from the store and the live sessions."""

    def node_states(self) -> dict[str, int]: ...

    def task_states(self) -> dict[str, int]: ...

    def live_sessions(self) -> int: ...


class _StateCollector(Collector):
    def __init__(self, state: MeshState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("mesh_nodes", "Nodes by state", labels=["state"])
        counts = self._state.node_states()
        for state in NodeState:
            nodes.add_metric([state.value], counts.get(state.value, 0))
        yield nodes
        tasks = GaugeMetricFamily("mesh_tasks", "Tasks by state", labels=["state"])
        by_state = self._state.task_states()
        for task_state in TaskState:
            tasks.add_metric([task_state.value], by_state.get(task_state.value, 0))
        yield tasks
        yield GaugeMetricFamily(
            "mesh_queue_depth",
            "Tasks waiting to be placed",
            value=by_state.get(TaskState.PENDING.value, 0),
        )
        yield GaugeMetricFamily(
            "mesh_agent_sessions", "Agent sessions open now", value=self._state.live_sessions()
        )


class Metrics:
    def __init__(self, state: MeshState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.scheduling = Histogram(
            "mesh_scheduling_round_seconds",
            "Time one scheduling round takes (plan, commit, send)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.task_duration = Histogram(
            "mesh_task_duration_seconds",
            "Run time of task attempts that ended, from start to end",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.store_writes = Histogram(
            "mesh_store_write_seconds",
            "Time of a store transaction that commits agent reports, submissions or placements",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reassignments = Counter(
            "mesh_reassignments",
            "Task attempts taken back from a node (lost, drained, removed) and queued again",
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "mesh_heartbeats", "Heartbeats received from agents", registry=self.registry
        )
        self.registry.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
