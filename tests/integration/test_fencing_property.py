"""Fencing under any interleaving: a state machine drives the real service and a real SQLite store
with a fake clock through submissions, placements, results (late ones included), dropped and
resumed sessions, silence, drains and coordinator restarts, and checks after every step that no
task is ever committed twice, reopened once ended, or placed beyond a node's CPUs."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.coordinator.sessions import AgentSession
from planetary_mesh.core.model import Task
from planetary_mesh.core.prefetch import PREFETCH_MAX_DEPTH
from planetary_mesh.core.states import AttemptState, NodeState, TaskState
from planetary_mesh.pki import certs
from planetary_mesh.protocol import Ended, Hello, JobSubmit, Log, Report, Started
from planetary_mesh.store.sqlite import SQLiteStore

MIB = 2**20
Ref = tuple[int, int, int]  # (task_id, attempt, epoch)
NODES: dict[str, float] = {"n-a": 2.0, "n-b": 1.0, "n-c": 3.0}  # the CPUs each declares
CPU_SLACK = 1e-6
ACTIVE_ATTEMPT = {AttemptState.ASSIGNED, AttemptState.RUNNING}
Outcome = Literal["started", "ok", "fail", "timeout", "signalled", "cancelled"]
OUTCOMES: list[Outcome] = ["started", "ok", "ok", "fail", "timeout", "signalled", "cancelled"]
Snapshot = tuple[Task, tuple[tuple[int, str, AttemptState, int | None], ...]]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@functools.cache
def mesh_ca() -> tuple[Any, Any]:
    return certs.create_ca("test")


def as_ref(raw: list[int]) -> Ref:
    return (raw[0], raw[1], raw[2])


def _event(ref: Ref, outcome: Outcome) -> Started | Ended:
    if outcome == "started":
        return Started(kind="started", task=ref)
    end = "exited" if outcome in ("ok", "fail") else outcome
    return Ended.model_validate(
        {
            "kind": "ended",
            "task": ref,
            "end": end,
            "exit_code": {"ok": 0, "fail": 1}.get(outcome),
            "signal": 9 if outcome == "signalled" else None,
            "message": outcome,
        },
        strict=False,
    )


class FencingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mesh-fencing-"))
        self.clock = FakeClock()
        self.stores: list[SQLiteStore] = []
        self.service = self._start()
        for node in NODES:
            self.service.store.add_node(node, node, 1, self.clock())
        self.sessions: dict[str, AgentSession] = {}  # open sessions, as the agents see them
        self.sent: dict[str, list[Ref]] = {node: [] for node in NODES}  # every attempt ever sent
        # What each agent believes it runs: sent, not yet reported ended, not cancelled.
        self.running: dict[str, list[Ref]] = {node: [] for node in NODES}
        self.frozen: set[str] = set()  # connected but silent (a hung process, a partition)
        self.jobs: list[str] = []
        self.ended: dict[int, Snapshot] = {}  # task id → what it looked like when it ended
        self.seq = 0

    def _start(self) -> CoordinatorService:
        store = SQLiteStore(self.dir / "mesh.db")
        self.stores.append(store)
        ca_cert, ca_key = mesh_ca()
        return CoordinatorService(
            store, ca_cert, ca_key, clock=self.clock, retry_backoff=(0.5, 4.0)
        )

    def teardown(self) -> None:
        for store in self.stores:
            store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pump(self) -> None:
        """Read every open session's outbox: note assignments, and close what the service closed
        (what the app does when it reads the None sentinel)."""
        for node, session in list(self.sessions.items()):
            while not session.outbox.empty():
                message = session.outbox.get_nowait()
                if message is None:
                    del self.sessions[node]
                    self.service.agent_disconnected(session)
                    break
                if message["type"] == "assign":
                    refs = [as_ref(t[:3]) for t in message["tasks"]]
                    self.sent[node] += refs
                    self.running[node] += refs
                elif message["type"] == "cancel":
                    gone = {as_ref(t[:3]) for t in message["tasks"]}
                    self.running[node] = [r for r in self.running[node] if r not in gone]

    def _hello(self, node: str, held: list[Ref]) -> Hello:
        return Hello(
            type="hello",
            name=node,
            cpus=NODES[node],
            memory=64 * 1024 * MIB,
            sandbox="plain",
            version="test",
            held=held,
        )

    def _connect(self, node: str, held: list[Ref]) -> None:
        old = self.sessions.pop(node, None)
        self.frozen.discard(node)
        self.running[node] = list(held)
        self.sessions[node] = self.service.agent_connected(node, self._hello(node, held))
        if old is not None:
            self.service.agent_disconnected(old)  # the replaced connection ends
        self._pump()

    def _held(self, data: st.DataObject, node: str) -> list[Ref]:
        """All or some of what the agent runs, and perhaps old attempts it was sent."""
        running, sent = self.running[node], self.sent[node]
        held = list(running)
        if bool(running) and data.draw(st.booleans()):
            held = data.draw(st.lists(st.sampled_from(running), unique=True))
        if bool(sent) and data.draw(st.booleans()):
            held += [r for r in data.draw(st.lists(st.sampled_from(sent))) if r not in held]
        return held

    @initialize(count=st.integers(1, 3))
    def start(self, count: int) -> None:
        for node in NODES:
            self._connect(node, [])
        self.submit(count, retries=1, cpus=1.0)

    # -- rules ------------------------------------------------------------------------------

    @rule(
        count=st.integers(1, 3),
        retries=st.integers(0, 2),
        cpus=st.sampled_from([0.5, 1.0, 2.0]),
    )
    def submit(self, count: int, retries: int, cpus: float) -> None:
        body = JobSubmit(argv=["true"], count=count, retries=retries, cpus=cpus, memory=MIB)
        self.jobs.append(self.service.submit("alice", body).id)
        self._pump()  # a submit places what fits at once, as a report does

    @rule()
    def schedule(self) -> None:
        self.service.schedule_round()
        self._pump()

    @precondition(lambda self: any(self.sent[node] for node in self.sessions))
    @rule(data=st.data())
    def report(self, data: st.DataObject) -> None:
        """An agent reports on attempts it was sent: ones it runs, or old ones (late results)."""
        node = data.draw(st.sampled_from(sorted(n for n in self.sessions if self.sent[n])))
        running, sent = self.running[node], self.sent[node]
        refs = st.sampled_from(sent)
        if running:
            refs = st.one_of(st.sampled_from(running), refs)
        outcomes = st.sampled_from(OUTCOMES)
        events: list[Started | Log | Ended] = []
        for ref, outcome in data.draw(st.lists(st.tuples(refs, outcomes), min_size=1, max_size=3)):
            events.append(_event(ref, outcome))
            if outcome != "started":
                self.running[node] = [r for r in self.running[node] if r != ref]
        self.seq += 1
        session = self.sessions[node]
        self.service.agent_heard(session)
        self.service.agent_report(session, Report(type="report", seq=self.seq, events=events))
        self._pump()

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data(), dies=st.booleans())
    def agent_fails(self, data: st.DataObject, dies: bool) -> None:
        """An agent's connection drops, or stays open with nothing more on it (a hung process,
        a partition)."""
        node = data.draw(st.sampled_from(sorted(self.sessions)))
        if dies:
            self.frozen.discard(node)
            self.service.agent_disconnected(self.sessions.pop(node))
        else:
            self.frozen.add(node)

    @rule(data=st.data(), node=st.sampled_from(sorted(NODES)))
    def agent_connects(self, data: st.DataObject, node: str) -> None:
        """(Re)connect, holding some or all of what it runs, old attempts perhaps included."""
        self._connect(node, self._held(data, node))

    @rule(seconds=st.sampled_from([0.1, 0.3, 0.5, 1.0, 3.0, 5.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        """Time goes by: live agents beat, the liveness check and the scheduler run."""
        self.clock.now += seconds
        for node in sorted(set(self.sessions) - self.frozen):
            self.service.agent_heard(self.sessions[node])
            self.service.agent_heartbeat(self.sessions[node])
        self.service.check_liveness()
        self._pump()
        self.service.schedule_round()
        self._pump()

    @rule(node=st.sampled_from(sorted(NODES)), deadline=st.sampled_from([None, 1.0]))
    def drain_or_undrain(self, node: str, deadline: float | None) -> None:
        if node in self.service.draining:
            self.service.undrain(node, by="admin")
        else:
            self.service.drain(node, deadline=deadline, by="admin")
        self._pump()

    @rule(data=st.data())
    def coordinator_restarts(self, data: st.DataObject) -> None:
        """kill -9 and start again on the same store: every session is gone with the process;
        some agents come back at once with what they hold, the others perhaps later."""
        self.sessions = {}
        self.frozen = set()
        self.service = self._start()
        for node in sorted(NODES):
            if data.draw(st.booleans()):
                self._connect(node, self._held(data, node))

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def fencing_holds(self) -> None:
        store = self.service.store
        nodes = {node.id: node for node in store.nodes()}
        for job_id in self.jobs:
            for task in store.tasks(job_id):
                attempts = store.attempts(task.id)
                where = f"job {job_id} task {task.index}: {task} {attempts}"
                succeeded = [a for a in attempts if a.state is AttemptState.SUCCEEDED]
                assert len(succeeded) <= 1, where
                active = [a for a in attempts if a.state in ACTIVE_ATTEMPT]
                if task.state is TaskState.SUCCEEDED:
                    assert [a.number for a in succeeded] == [task.attempt], where
                if task.state.active:
                    (attempt,) = active
                    assert attempt.number == task.attempt, where
                    assert attempt.epoch == task.epoch, where
                    assert attempt.node_id == task.node_id, where
                    assert task.node_id in nodes, where
                    assert nodes[task.node_id].state is not NodeState.LOST, where
                    # The node was actually sent this attempt (or adopted it after holding it).
                    assert (task.id, task.attempt, task.epoch) in self.sent[task.node_id], where
                else:
                    assert active == [], where
                if task.state.ended:
                    snapshot: Snapshot = (
                        task,
                        tuple((a.number, a.node_id, a.state, a.exit_code) for a in attempts),
                    )
                    assert self.ended.setdefault(task.id, snapshot) == snapshot, where
                else:
                    assert task.id not in self.ended, f"{where} was reopened"

    @invariant()
    def no_node_holds_more_than_prefetch_allows(self) -> None:
        # Beyond its size a node holds only prefetched tasks of short jobs, within the depth
        # (the agent then runs them one room at a time: tests/unit/test_admission.py).
        store = self.service.store
        used = dict.fromkeys(NODES, 0.0)
        for job_id in self.jobs:
            cpus = store.job_spec(job_id).cpus
            for task in store.tasks(job_id):
                if task.state.active:
                    assert task.node_id is not None
                    used[task.node_id] += cpus
        for node, cpus in used.items():
            assert cpus <= NODES[node] * (1 + PREFETCH_MAX_DEPTH) + CPU_SLACK, (node, cpus)
        # What the scheduler reads agrees with the tasks themselves.
        for node, (cpus, _memory, _gpus) in store.usage_by_node().items():
            assert abs(cpus - used[node]) <= CPU_SLACK, (node, cpus, used[node])


FencingMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFencing = FencingMachine.TestCase
