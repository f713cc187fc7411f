"""The SQLite store on a real file: jobs and tasks, placement, fenced reports, retries, node loss,
cancellation, logs, outputs, join tokens, and that all of it survives closing and reopening."""

from __future__ import annotations

import itertools
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planetary_mesh.core.model import Assignment, JobSpec, Task
from planetary_mesh.core.scheduler import Demand, Placement
from planetary_mesh.core.states import AttemptState, JobState, NodeState, TaskState
from planetary_mesh.errors import StoreError
from planetary_mesh.store.sqlite import SQLiteStore

MIB = 1024**2
NOW = 1_000.0


def spec(**overrides: Any) -> JobSpec:
    return JobSpec(**{"name": "job", "argv": ("echo", "hi"), **overrides})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mesh.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(db_path)
    yield opened
    opened.close()


def task_of(store: SQLiteStore, job_id: str, index: int = 0) -> Task:
    task = store.task(job_id, index)
    assert task is not None, f"no task {index} in job {job_id}"
    return task


def place(store: SQLiteStore, node_id: str, *tasks: Task, now: float = NOW) -> list[Assignment]:
    assigned = store.assign([Placement(t.id, node_id) for t in tasks], now)
    assert [node for node, _ in assigned] == [node_id] * len(tasks)
    return [assignment for _, assignment in assigned]


def end(
    store: SQLiteStore,
    a: Assignment,
    *,
    ok: bool = True,
    counts: bool = True,
    exit_code: int | None = None,
    reason: str = "exited",
    outputs: dict[str, bytes] | None = None,
    now: float = NOW + 10,
) -> TaskState | None:
    return store.record_ended(
        a.task_id,
        a.attempt,
        a.epoch,
        succeeded=ok,
        counts_against_retries=counts,
        exit_code=(0 if ok else 1) if exit_code is None else exit_code,
        reason=reason,
        outputs=outputs or {},
        now=now,
    )


# -- jobs and the queue -------------------------------------------------------------------------


def test_a_job_of_count_5_has_5_pending_tasks(store: SQLiteStore) -> None:
    job_spec = spec(count=5, cpus=0.5, memory=64 * MIB, retries=2, env={"A": "1"}, outputs=("o",))
    store.add_job("j1", "alice", job_spec, {"in.txt": b"data", "a.bin": b"\x00\x01"}, NOW)

    tasks = store.tasks("j1")
    assert [t.index for t in tasks] == [0, 1, 2, 3, 4]
    assert {t.state for t in tasks} == {TaskState.PENDING}
    assert {(t.attempt, t.epoch, t.node_id, t.job_id) for t in tasks} == {(0, 0, None, "j1")}
    assert len({t.id for t in tasks}) == 5

    job = store.job("j1")
    assert job is not None
    assert job.state is JobState.PENDING
    assert job.counts == {TaskState.PENDING: 5}
    assert job.owner == "alice"
    assert job.spec == job_spec
    assert job.file_names == ("a.bin", "in.txt")
    assert store.job_files("j1") == {"in.txt": b"data", "a.bin": b"\x00\x01"}
    assert store.job_spec("j1") == job_spec
    assert store.job("nope") is None
    assert store.task("j1", 5) is None
    with pytest.raises(StoreError, match="nope"):
        store.job_spec("nope")


def test_jobs_are_listed_newest_first(store: SQLiteStore) -> None:
    for i in range(3):
        store.add_job(f"j{i}", "alice", spec(), {}, NOW + i)
    assert [j.id for j in store.jobs()] == ["j2", "j1", "j0"]
    assert [j.id for j in store.jobs(limit=2)] == ["j2", "j1"]


def test_the_queue_is_ordered_by_priority_then_age_then_index(store: SQLiteStore) -> None:
    store.add_job("old-low", "u", spec(count=2, cpus=1.0, memory=10 * MIB), {}, NOW)
    store.add_job("high", "u", spec(count=2, priority=5, cpus=2.0, memory=20 * MIB), {}, NOW + 1)
    store.add_job("new-low", "u", spec(count=1, cpus=3.0, memory=30 * MIB), {}, NOW + 2)
    store.add_job(
        "new-high", "u", spec(count=1, priority=5, cpus=4.0, memory=40 * MIB), {}, NOW + 3
    )
    store.add_job("urgent", "u", spec(count=1, priority=9, cpus=5.0, memory=50 * MIB), {}, NOW + 4)

    expected = [
        ("urgent", 0),
        ("high", 0),
        ("high", 1),
        ("new-high", 0),
        ("old-low", 0),
        ("old-low", 1),
        ("new-low", 0),
    ]
    ids = [task_of(store, job, index).id for job, index in expected]
    queue = store.pending_demands(100)
    assert [d.task_id for d in queue] == ids
    assert queue[0] == Demand(ids[0], 5.0, 50 * MIB, job_seq=queue[0].job_seq)
    assert queue[-1] == Demand(ids[-1], 3.0, 30 * MIB, job_seq=queue[-1].job_seq)
    # Each task names its own job (prefetch depth is per job), one seq per job.
    seqs = {job: d.job_seq for (job, _), d in zip(expected, queue, strict=True)}
    assert all(seqs[job] == d.job_seq for (job, _), d in zip(expected, queue, strict=True))
    assert len(set(seqs.values())) == len(seqs)
    assert [d.task_id for d in store.pending_demands(3)] == ids[:3]

    # Placed tasks leave the queue; the order of the rest stands.
    place(store, "n1", task_of(store, "high", 1))
    assert [d.task_id for d in store.pending_demands(100)] == ids[:2] + ids[3:]


def test_assign_gives_attempt_1_and_strictly_increasing_epochs(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(count=4), {}, NOW)
    tasks = store.tasks("j")
    first = store.assign([Placement(tasks[0].id, "n1"), Placement(tasks[1].id, "n2")], NOW)
    second = store.assign([Placement(tasks[2].id, "n1"), Placement(tasks[3].id, "n1")], NOW + 1)

    assert [node for node, _ in first + second] == ["n1", "n2", "n1", "n1"]
    assignments = [a for _, a in first + second]
    assert [(a.task_id, a.job_id, a.index, a.attempt) for a in assignments] == [
        (t.id, "j", t.index, 1) for t in tasks
    ]
    epochs = [a.epoch for a in assignments]
    assert epochs == sorted(epochs)
    assert len(set(epochs)) == 4
    assert epochs[0] >= 1

    for task, assignment in zip(store.tasks("j"), assignments, strict=True):
        assert task.state is TaskState.ASSIGNED
        assert (task.attempt, task.epoch) == (1, assignment.epoch)
        (attempt,) = store.attempts(task.id)
        assert attempt.state is AttemptState.ASSIGNED
        assert (attempt.number, attempt.epoch) == (1, assignment.epoch)
    assert store.tasks("j")[1].node_id == "n2"
    assert store.pending_demands(10) == []


def test_assign_skips_tasks_that_are_no_longer_pending(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(count=2), {}, NOW)
    t0, t1 = store.tasks("j")
    (a0,) = place(store, "n1", t0)
    # The same task twice in one plan, and again in a later one: it is placed once.
    assigned = store.assign([Placement(t0.id, "n2"), Placement(t1.id, "n2")], NOW)
    assert [(node, a.task_id) for node, a in assigned] == [("n2", t1.id)]
    assert task_of(store, "j", 0).node_id == "n1"
    assert task_of(store, "j", 0).epoch == a0.epoch
    assert len(store.attempts(t0.id)) == 1
    assert store.assign([], NOW) == []


# -- fenced reports -----------------------------------------------------------------------------


def test_a_start_report_with_the_wrong_attempt_or_epoch_changes_nothing(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(), {}, NOW)
    (a,) = place(store, "n1", task_of(store, "j"))
    before = task_of(store, "j")

    assert not store.record_started(a.task_id, a.attempt + 1, a.epoch, NOW + 1)
    assert not store.record_started(a.task_id, a.attempt, a.epoch + 1, NOW + 1)
    assert not store.record_started(a.task_id, a.attempt, a.epoch - 1, NOW + 1)
    assert not store.record_started(a.task_id + 999, a.attempt, a.epoch, NOW + 1)
    assert task_of(store, "j") == before
    assert store.attempts(a.task_id)[0].started_at is None

    assert store.record_started(a.task_id, a.attempt, a.epoch, NOW + 2)
    task = task_of(store, "j")
    assert task.state is TaskState.RUNNING
    assert task.started_at == NOW + 2
    (attempt,) = store.attempts(a.task_id)
    assert (attempt.state, attempt.started_at) == (AttemptState.RUNNING, NOW + 2)
    # A resent start report is not a second start.
    assert not store.record_started(a.task_id, a.attempt, a.epoch, NOW + 3)
    assert task_of(store, "j").started_at == NOW + 2


def test_an_end_report_with_the_wrong_attempt_or_epoch_changes_nothing(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(outputs=("out.txt",)), {}, NOW)
    (a,) = place(store, "n1", task_of(store, "j"))
    store.record_started(a.task_id, a.attempt, a.epoch, NOW + 1)
    before = (task_of(store, "j"), store.attempts(a.task_id))

    for number, epoch in [(a.attempt + 1, a.epoch), (a.attempt, a.epoch + 1), (0, a.epoch)]:
        stale = Assignment(a.task_id, a.job_id, a.index, number, epoch)
        assert end(store, stale, outputs={"out.txt": b"stale"}) is None
        assert end(store, stale, ok=False) is None
    assert (task_of(store, "j"), store.attempts(a.task_id)) == before
    assert store.outputs(a.task_id) == {}

    assert end(store, a, outputs={"out.txt": b"result"}, now=NOW + 5) is TaskState.SUCCEEDED
    task = task_of(store, "j")
    assert (task.state, task.exit_code, task.reason, task.ended_at) == (
        TaskState.SUCCEEDED,
        0,
        "exited",
        NOW + 5,
    )
    (attempt,) = store.attempts(a.task_id)
    assert (attempt.state, attempt.exit_code, attempt.ended_at) == (
        AttemptState.SUCCEEDED,
        0,
        NOW + 5,
    )
    assert store.outputs(a.task_id) == {"out.txt": b"result"}
    job = store.job("j")
    assert job is not None
    assert job.state is JobState.SUCCEEDED

    # The same report again (a resend after a lost ack) is stale now, and changes nothing.
    assert end(store, a, ok=False, outputs={"out.txt": b"again"}) is None
    assert task_of(store, "j").state is TaskState.SUCCEEDED
    assert store.outputs(a.task_id) == {"out.txt": b"result"}


def test_a_task_may_end_before_its_start_was_reported(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(), {}, NOW)
    (a,) = place(store, "n1", task_of(store, "j"), now=NOW)
    assert end(store, a, now=NOW + 1) is TaskState.SUCCEEDED
    task = task_of(store, "j")
    assert task.started_at is not None
    (attempt,) = store.attempts(a.task_id)
    assert attempt.started_at is not None
    assert attempt.ended_at is not None
    assert attempt.started_at <= attempt.ended_at


# -- retries and requeues -----------------------------------------------------------------------


def test_a_failing_task_with_one_retry_runs_twice_then_fails(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(retries=1), {}, NOW)
    (a1,) = place(store, "n1", task_of(store, "j"))
    store.record_started(a1.task_id, a1.attempt, a1.epoch, NOW)
    assert end(store, a1, ok=False, exit_code=3, reason="exit code 3") is TaskState.PENDING
    task = task_of(store, "j")
    assert task.state is TaskState.PENDING
    assert task.ended_at is None
    assert [d.task_id for d in store.pending_demands(10)] == [a1.task_id]

    (a2,) = place(store, "n2", task)
    assert a2.attempt == 2
    assert a2.epoch > a1.epoch
    assert end(store, a2, ok=False, exit_code=4, reason="exit code 4") is TaskState.FAILED

    task = task_of(store, "j")
    assert (task.state, task.exit_code, task.reason) == (TaskState.FAILED, 4, "exit code 4")
    assert task.ended_at is not None
    attempts = store.attempts(task.id)
    assert [(x.number, x.node_id, x.state, x.exit_code) for x in attempts] == [
        (1, "n1", AttemptState.FAILED, 3),
        (2, "n2", AttemptState.FAILED, 4),
    ]
    job = store.job("j")
    assert job is not None
    assert job.state is JobState.FAILED
    assert store.pending_demands(10) == []


def test_a_failure_that_is_not_the_tasks_fault_requeues_without_counting(
    store: SQLiteStore,
) -> None:
    store.add_job("j", "u", spec(retries=1), {}, NOW)
    # Three failures that do not count (owner yield, drain...): the task keeps coming back.
    for number in (1, 2, 3):
        (a,) = place(store, "n1", task_of(store, "j"))
        assert a.attempt == number
        assert end(store, a, ok=False, counts=False, reason="owner came back") is TaskState.PENDING
    # Then one that counts: the single retry is still there...
    (a,) = place(store, "n1", task_of(store, "j"))
    assert end(store, a, ok=False) is TaskState.PENDING
    # ...and the next counted failure is final.
    (a,) = place(store, "n1", task_of(store, "j"))
    assert end(store, a, ok=False) is TaskState.FAILED
    assert [x.state for x in store.attempts(a.task_id)] == [
        AttemptState.LOST,
        AttemptState.LOST,
        AttemptState.LOST,
        AttemptState.FAILED,
        AttemptState.FAILED,
    ]


def test_a_free_requeue_works_even_with_no_retries(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(retries=0), {}, NOW)
    (a,) = place(store, "n1", task_of(store, "j"))
    assert end(store, a, ok=False, counts=False, exit_code=None) is TaskState.PENDING
    (b,) = place(store, "n2", task_of(store, "j"))
    assert end(store, b) is TaskState.SUCCEEDED
    assert [x.state for x in store.attempts(a.task_id)] == [
        AttemptState.LOST,
        AttemptState.SUCCEEDED,
    ]


def test_a_task_back_in_the_queue_names_no_node(store: SQLiteStore) -> None:
    # However a task got back to the queue (a retry, a free requeue, its node lost), it is not
    # on any node any more; where its attempts ran is in its attempts.
    store.add_job("j", "u", spec(count=3, retries=1), {}, NOW)
    t0, t1, t2 = store.tasks("j")
    a0, a1, _ = place(store, "n1", t0, t1, t2)
    end(store, a0, ok=False)
    end(store, a1, ok=False, counts=False)
    store.requeue_node_attempts("n1", set(), "node lost", NOW + 20)
    for task in store.tasks("j"):
        assert task.state is TaskState.PENDING
        assert task.node_id is None, f"pending task {task.index} still names {task.node_id}"


def test_requeue_node_attempts_keeps_the_held_and_requeues_the_rest(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(count=4), {}, NOW)
    t0, t1, t2, t3 = store.tasks("j")
    a0, a1, a2 = place(store, "n1", t0, t1, t2)
    (other,) = place(store, "n2", t3)
    store.record_started(a1.task_id, a1.attempt, a1.epoch, NOW + 1)
    store.record_started(a2.task_id, a2.attempt, a2.epoch, NOW + 1)
    assert store.active_attempts("n1") == {(a.task_id, a.attempt, a.epoch) for a in (a0, a1, a2)}

    # The node reconnects holding a2 only, and a0 with an old epoch: that does not count.
    keep = {(a2.task_id, a2.attempt, a2.epoch), (a0.task_id, a0.attempt, a0.epoch - 1)}
    requeued = store.requeue_node_attempts("n1", keep, "the node lost it", NOW + 5)
    assert sorted(requeued) == sorted([a0.task_id, a1.task_id])

    for a in (a0, a1):
        task = task_of(store, "j", a.index)
        assert task.state is TaskState.PENDING
        (attempt,) = store.attempts(a.task_id)
        assert (attempt.state, attempt.reason, attempt.ended_at) == (
            AttemptState.LOST,
            "the node lost it",
            NOW + 5,
        )
    kept = task_of(store, "j", a2.index)
    assert (kept.state, kept.node_id, kept.epoch) == (TaskState.RUNNING, "n1", a2.epoch)
    assert store.attempts(a2.task_id)[0].state is AttemptState.RUNNING
    assert task_of(store, "j", 3).state is TaskState.ASSIGNED  # another node: untouched
    assert store.active_attempts("n1") == {(a2.task_id, a2.attempt, a2.epoch)}
    assert store.active_attempts("n2") == {(other.task_id, other.attempt, other.epoch)}

    # Lost tasks go back to the queue in order, and a late report from the lost attempt is stale.
    assert [d.task_id for d in store.pending_demands(10)] == [a0.task_id, a1.task_id]
    (again,) = place(store, "n2", task_of(store, "j", a1.index))
    assert (again.attempt, again.epoch > a1.epoch) == (2, True)
    assert end(store, a1) is None
    assert not store.record_started(a1.task_id, a1.attempt, a1.epoch, NOW + 6)
    assert end(store, again) is TaskState.SUCCEEDED

    # Nothing left to requeue: a second call is a no-op.
    assert store.requeue_node_attempts("n1", keep, "again", NOW + 7) == []


# -- cancellation -------------------------------------------------------------------------------


def test_cancel_job_cancels_pending_and_active_tasks_and_names_the_active_ones(
    store: SQLiteStore,
) -> None:
    store.add_job("j", "alice", spec(count=4), {}, NOW)
    t0, t1, t2, _ = store.tasks("j")
    (done,) = place(store, "n1", t0)
    end(store, done)
    (running,) = place(store, "n2", t1)
    store.record_started(running.task_id, running.attempt, running.epoch, NOW)
    (assigned,) = place(store, "n1", t2)

    active = store.cancel_job("j", "bob", NOW + 30)
    assert sorted(active, key=lambda pair: pair[1].task_id) == [("n2", running), ("n1", assigned)]

    states = [t.state for t in store.tasks("j")]
    assert states == [
        TaskState.SUCCEEDED,
        TaskState.CANCELLED,
        TaskState.CANCELLED,
        TaskState.CANCELLED,
    ]
    for task in store.tasks("j")[1:]:
        assert task.reason == "cancelled by bob"
        assert task.ended_at == NOW + 30
    for a in (running, assigned):
        (attempt,) = store.attempts(a.task_id)
        assert (attempt.state, attempt.reason) == (AttemptState.CANCELLED, "cancelled by bob")
    assert store.attempts(done.task_id)[0].state is AttemptState.SUCCEEDED

    job = store.job("j")
    assert job is not None
    assert (job.state, job.cancelled_by) == (JobState.CANCELLED, "bob")
    assert store.pending_demands(10) == []
    assert store.active_attempts("n1") == set()
    # The agent's late report of the cancelled attempt is stale.
    assert end(store, running) is None

    # A second cancel finds nothing to stop and keeps the first canceller.
    assert store.cancel_job("j", "carol", NOW + 40) == []
    job = store.job("j")
    assert job is not None
    assert job.cancelled_by == "bob"


def test_cancelling_an_unknown_job_is_a_store_error(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="nope"):
        store.cancel_job("nope", "bob", NOW)


# -- logs and outputs ---------------------------------------------------------------------------


def test_log_chunks_reassemble_by_offset(store: SQLiteStore) -> None:
    # Out of order, and with a resend of the first chunk (whose data must not replace it).
    store.record_logs([(7, 1, 6, b"world"), (7, 1, 0, b"hello ")])
    store.record_logs([(7, 1, 0, b"HELLO "), (7, 1, 11, b"!\n")])
    assert store.logs(7, 1, 0) == (b"hello world!\n", 13)
    assert store.logs(7, 1, 6) == (b"world!\n", 13)
    assert store.logs(7, 1, 3) == (b"lo world!\n", 13)  # from inside a chunk
    assert store.logs(7, 1, 13) == (b"", 13)  # nothing new yet
    assert store.logs(7, 2, 0) == (b"", 0)  # another attempt's log is its own
    assert store.logs(8, 1, 0) == (b"", 0)


def test_a_gap_in_the_log_stops_the_read_until_it_is_filled(store: SQLiteStore) -> None:
    store.record_logs([(7, 1, 0, b"abc"), (7, 1, 6, b"ghi")])
    assert store.logs(7, 1, 0) == (b"abc", 3)
    assert store.logs(7, 1, 3) == (b"", 3)
    store.record_logs([(7, 1, 3, b"def")])
    assert store.logs(7, 1, 3) == (b"defghi", 9)
    assert store.logs(7, 1, 0) == (b"abcdefghi", 9)


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=200),
    cuts=st.lists(st.integers(1, 199), max_size=10),
    order=st.randoms(use_true_random=False),
    resend=st.lists(st.integers(0, 10), max_size=5),
    missing=st.none() | st.integers(0, 10),
)
def test_chunks_in_any_order_with_resends_read_back_up_to_the_first_gap(
    data: bytes,
    cuts: list[int],
    order: random.Random,
    resend: list[int],
    missing: int | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [(1, 1, lo, data[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    sent = [c for i, c in enumerate(chunks) if i != missing]
    sent += [chunks[i] for i in resend if i < len(chunks) and i != missing]
    order.shuffle(sent)

    store = SQLiteStore(tmp_path_factory.mktemp("logs") / "mesh.db")
    try:
        for chunk in sent:
            store.record_logs([chunk])
        got, next_offset = store.logs(1, 1, 0)
    finally:
        store.close()
    stop = chunks[missing][2] if missing is not None and missing < len(chunks) else len(data)
    assert got == data[:stop]
    assert next_offset == stop


def test_outputs_are_stored_with_the_end_of_the_attempt(store: SQLiteStore) -> None:
    store.add_job("j", "u", spec(count=2, outputs=("a.txt", "b.bin")), {}, NOW)
    a, b = place(store, "n1", *store.tasks("j"))
    end(store, a, outputs={"b.bin": b"\x00\xff", "a.txt": b"one"})
    end(store, b, ok=False, outputs={"a.txt": b"partial"})
    assert store.outputs(a.task_id) == {"a.txt": b"one", "b.bin": b"\x00\xff"}
    assert list(store.outputs(a.task_id)) == ["a.txt", "b.bin"]
    assert store.outputs(b.task_id) == {"a.txt": b"partial"}


# -- nodes --------------------------------------------------------------------------------------


def test_nodes_record_their_state_size_and_usage(store: SQLiteStore) -> None:
    store.add_node("n1", "desk", 1234, NOW)
    store.add_node("n2", "laptop", 5678, NOW + 1)
    assert store.node_known("n1")
    assert not store.node_known("n9")
    first = store.nodes()[0]
    assert (first.id, first.name, first.state, first.cpus, first.memory) == (
        "n1",
        "desk",
        NodeState.SUSPECT,
        0,
        0,
    )

    store.update_node(
        "n1", state=NodeState.READY, now=NOW + 5, cpus=8.0, memory=16 * 1024 * MIB, version="1"
    )
    store.add_job("j", "u", spec(count=3, cpus=1.5, memory=100 * MIB), {}, NOW)
    t0, t1, _ = store.tasks("j")
    place(store, "n1", t0, t1)
    n1, n2 = store.nodes()
    assert (n1.state, n1.cpus, n1.memory, n1.version, n1.last_seen) == (
        NodeState.READY,
        8.0,
        16 * 1024 * MIB,
        "1",
        NOW + 5,
    )
    assert n1.name == "desk"  # not given: kept
    assert (n1.used_cpus, n1.used_memory, n1.running) == (3.0, 200 * MIB, 2)
    assert (n2.used_cpus, n2.used_memory, n2.running) == (0.0, 0, 0)
    assert store.usage_by_node() == {"n1": (3.0, 200 * MIB, 0)}

    store.update_node("n2", state=NodeState.READY, now=NOW + 6)
    store.mark_nodes(NodeState.READY, NodeState.SUSPECT)
    assert {n.state for n in store.nodes()} == {NodeState.SUSPECT}


# -- join tokens --------------------------------------------------------------------------------


def test_a_single_use_token_works_once(store: SQLiteStore) -> None:
    store.add_token("t1", "hash-1", NOW + 60, 1, NOW)
    assert store.consume_token("hash-1", NOW + 1) is None
    reason = store.consume_token("hash-1", NOW + 2)
    assert reason is not None
    assert "used up" in reason


def test_a_multi_use_token_counts_its_uses(store: SQLiteStore) -> None:
    store.add_token("t3", "hash-3", NOW + 60, 3, NOW)
    assert [store.consume_token("hash-3", NOW + i) for i in range(3)] == [None, None, None]
    reason = store.consume_token("hash-3", NOW + 4)
    assert reason is not None
    assert "used up" in reason


def test_a_token_without_a_use_limit_is_limited_only_by_time(store: SQLiteStore) -> None:
    store.add_token("tn", "hash-n", NOW + 60, None, NOW)
    assert all(store.consume_token("hash-n", NOW + 1) is None for _ in range(20))
    reason = store.consume_token("hash-n", NOW + 60)
    assert reason is not None
    assert "expired" in reason


@pytest.mark.parametrize("when", [NOW + 60, NOW + 61, NOW + 10_000])
def test_an_expired_token_is_refused(store: SQLiteStore, when: float) -> None:
    store.add_token("t1", "hash-1", NOW + 60, 5, NOW)
    reason = store.consume_token("hash-1", when)
    assert reason is not None
    assert "expired" in reason


def test_an_unknown_token_is_refused(store: SQLiteStore) -> None:
    store.add_token("t1", "hash-1", NOW + 60, 5, NOW)
    reason = store.consume_token("hash-2", NOW)
    assert reason is not None
    assert "not known" in reason


# -- durability ---------------------------------------------------------------------------------


def test_everything_survives_closing_and_reopening_the_store(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    store.add_node("n1", "desk", 42, NOW)
    store.update_node("n1", state=NodeState.READY, now=NOW + 1, cpus=4.0, memory=8 * 1024 * MIB)
    store.add_token("t1", "hash-1", NOW + 600, 2, NOW)
    assert store.consume_token("hash-1", NOW) is None
    job_spec = spec(count=3, retries=1, outputs=("out",), env={"K": "V"})
    store.add_job("j", "alice", job_spec, {"input": b"\x01\x02"}, NOW)
    t0, t1, t2 = store.tasks("j")
    a0, a1, a2 = place(store, "n1", t0, t1, t2)
    store.record_started(a0.task_id, a0.attempt, a0.epoch, NOW + 2)
    end(store, a0, outputs={"out": b"zero"}, now=NOW + 3)
    end(store, a1, ok=False, exit_code=2, reason="exit code 2", now=NOW + 3)
    store.record_started(a2.task_id, a2.attempt, a2.epoch, NOW + 2)
    store.record_logs([(a0.task_id, 1, 0, b"line 1\n"), (a0.task_id, 1, 7, b"line 2\n")])

    before = {
        "job": store.job("j"),
        "tasks": store.tasks("j"),
        "attempts": [store.attempts(t.id) for t in (t0, t1, t2)],
        "files": store.job_files("j"),
        "nodes": store.nodes(),
        "logs": store.logs(a0.task_id, 1, 0),
        "outputs": store.outputs(a0.task_id),
        "active": store.active_attempts("n1"),
        "queue": store.pending_demands(10),
    }
    store.close()

    reopened = SQLiteStore(db_path)
    try:
        after = {
            "job": reopened.job("j"),
            "tasks": reopened.tasks("j"),
            "attempts": [reopened.attempts(t.id) for t in (t0, t1, t2)],
            "files": reopened.job_files("j"),
            "nodes": reopened.nodes(),
            "logs": reopened.logs(a0.task_id, 1, 0),
            "outputs": reopened.outputs(a0.task_id),
            "active": reopened.active_attempts("n1"),
            "queue": reopened.pending_demands(10),
        }
        assert after == before
        assert after["logs"] == (b"line 1\nline 2\n", 14)
        assert after["outputs"] == {"out": b"zero"}
        assert reopened.node_known("n1")
        assert [t.state for t in reopened.tasks("j")] == [
            TaskState.SUCCEEDED,
            TaskState.PENDING,
            TaskState.RUNNING,
        ]

        # The token's use count carried over: one use left.
        assert reopened.consume_token("hash-1", NOW + 1) is None
        assert reopened.consume_token("hash-1", NOW + 1) is not None

        # Epochs keep growing across the restart, so no fence can be reused; and the running
        # attempt can still report its end.
        (again,) = place(reopened, "n1", reopened.tasks("j")[1])
        assert again.epoch > max(a0.epoch, a1.epoch, a2.epoch)
        assert again.attempt == 2
        assert end(reopened, a2) is TaskState.SUCCEEDED
    finally:
        reopened.close()


def test_a_store_from_a_newer_version_is_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    raw.close()
    with pytest.raises(StoreError, match="upgrade"):
        SQLiteStore(db_path)


def test_an_agent_may_only_report_on_its_own_attempts(store: SQLiteStore) -> None:
    store.add_job("j1", "alice", spec(), {}, NOW)
    (a,) = place(store, "n-mine", task_of(store, "j1"))
    assert not store.record_started(a.task_id, a.attempt, a.epoch, NOW, node_id="n-other")
    stolen = store.record_ended(
        a.task_id,
        a.attempt,
        a.epoch,
        succeeded=True,
        counts_against_retries=True,
        exit_code=0,
        reason="exit code 0",
        outputs={},
        now=NOW,
        node_id="n-other",
    )
    assert stolen is None
    assert task_of(store, "j1").state is TaskState.ASSIGNED
    assert store.record_started(a.task_id, a.attempt, a.epoch, NOW, node_id="n-mine")
    assert task_of(store, "j1").state is TaskState.RUNNING


# -- removed nodes ------------------------------------------------------------------------------


def test_removing_a_node_requeues_its_work_and_denies_its_certificate_until_it_expires(
    db_path: Path,
) -> None:
    store = SQLiteStore(db_path)
    store.add_node("n1", "desk", 4242, NOW)
    store.add_node("n2", "laptop", 5151, NOW)
    store.add_job("j", "u", spec(count=2), {}, NOW)
    t0, t1 = store.tasks("j")
    (mine,) = place(store, "n1", t0)
    (theirs,) = place(store, "n2", t1)
    serial, requeued = store.remove_node("n1", "node removed by admin", NOW + 1, until=NOW + 100)
    assert (serial, requeued) == ("4242", 1)
    assert [n.id for n in store.nodes()] == ["n2"] and not store.node_known("n1")
    assert task_of(store, "j", mine.index).state is TaskState.PENDING
    assert task_of(store, "j", theirs.index).node_id == "n2"  # another node's work is untouched
    (attempt,) = store.attempts(mine.task_id)
    assert (attempt.state, attempt.reason) == (AttemptState.LOST, "node removed by admin")
    with pytest.raises(StoreError, match="no node 'n1'"):
        store.remove_node("n1", "again", NOW + 2, until=NOW + 100)
    store.close()

    reopened = SQLiteStore(db_path)  # the deny-list is durable
    assert reopened.denied_certs(NOW + 99) == [("4242", "node", "n1")]
    assert reopened.denied_certs(NOW + 100) == []  # expired: the TLS layer refuses it anyway
    reopened.close()


# -- what the dashboard reads -------------------------------------------------------------------


def test_throughput_counts_ended_tasks_per_slot_by_how_they_ended(store: SQLiteStore) -> None:
    store.add_node("n1", "one", 1, NOW)
    store.add_job("j", "u", spec(count=5), {}, NOW)
    tasks = store.tasks("j")
    ok0, ok1, bad, late, _ = place(store, "n1", *tasks)
    end(store, ok0, now=NOW + 5)  # slot 0 of [NOW, NOW+30)
    end(store, ok1, now=NOW + 12)  # slot 1
    end(store, bad, ok=False, now=NOW + 14)  # slot 1, failed
    end(store, late, now=NOW + 31)  # past the window: not counted
    store.cancel_job("j", "alice", NOW + 29)  # the fifth: slot 2, "other"
    seen = store.throughput(NOW, NOW + 30, 10)
    assert (seen.since, seen.bucket) == (NOW, 10)
    assert seen.succeeded == [1, 1, 0]
    assert seen.failed == [0, 1, 0]
    assert seen.other == [0, 0, 1]


def test_a_node_s_attempts_newest_first_with_their_task(store: SQLiteStore) -> None:
    store.add_node("n1", "one", 1, NOW)
    store.add_node("n2", "two", 2, NOW)
    store.add_job("a", "u", spec(count=2), {}, NOW)
    store.add_job("b", "u", spec(), {}, NOW)
    first, second = store.tasks("a")
    (on_n1,) = place(store, "n1", first, now=NOW + 1)
    end(store, on_n1, ok=False, exit_code=3, reason="exit code 3", now=NOW + 2)
    place(store, "n1", task_of(store, "b"), now=NOW + 3)
    place(store, "n2", second, now=NOW + 4)
    recent = store.node_attempts("n1", 10)
    assert [(a.job_id, a.index, a.attempt.number) for a in recent] == [("b", 0, 1), ("a", 0, 1)]
    assert recent[1].attempt.state is AttemptState.FAILED and recent[1].attempt.exit_code == 3
    assert [a.job_id for a in store.node_attempts("n1", 1)] == ["b"]
    assert store.node_attempts("nobody", 10) == []


def test_pages_of_jobs_and_tasks_and_the_latest_events(store: SQLiteStore) -> None:
    for i in range(5):
        store.add_job(f"j{i}", "u", spec(count=3), {}, NOW + i)
        store.add_event("job_submitted", f"j{i}", NOW + i, job_id=f"j{i}")
    jobs, total = store.job_page(offset=1, limit=2)
    assert [j.id for j in jobs] == ["j3", "j2"] and total == 5
    tasks, count = store.task_page("j0", offset=1, limit=5)
    assert [t.index for t in tasks] == [1, 2] and count == 3
    none, zero = store.task_page("j0", 0, 5, TaskState.RUNNING)
    assert none == [] and zero == 0
    assert [e.message for e in store.latest_events(2)] == ["j3", "j4"]
    assert len(store.latest_events(50)) == 5


def test_node_labels_and_gpus_are_kept(store: SQLiteStore) -> None:
    store.add_node("n1", "one", 1, NOW)
    (node,) = store.nodes()
    assert node.labels == {} and node.gpus == 0
    store.update_node("n1", state=NodeState.READY, now=NOW, labels={"room": "lab"}, gpus=2)
    (node,) = store.nodes()
    assert node.labels == {"room": "lab"} and node.gpus == 2
    store.update_node("n1", state=NodeState.READY, now=NOW + 1)  # a heartbeat keeps them
    assert store.node("n1") == store.nodes()[0] and store.nodes()[0].labels == {"room": "lab"}


def test_browser_sessions_are_kept_until_logout_or_expiry(db_path: Path) -> None:
    from planetary_mesh.core.model import BrowserSessionRecord

    store = SQLiteStore(db_path)
    for digest, expires in (("a", NOW + 100), ("b", NOW + 200), ("c", NOW + 5)):
        store.add_browser_session(
            BrowserSessionRecord(digest, "alice", False, 7, NOW + 999, f"csrf-{digest}", expires)
        )
    store.close()
    reopened = SQLiteStore(db_path)  # a restart
    kept = reopened.browser_sessions(NOW + 10)
    assert sorted((r.digest, r.csrf, r.user, r.cert_serial) for r in kept) == [
        ("a", "csrf-a", "alice", 7),
        ("b", "csrf-b", "alice", 7),
    ]
    reopened.end_browser_sessions(NOW + 10, "a")  # a logout, and the expired one goes too
    assert [r.digest for r in reopened.browser_sessions(NOW)] == ["b"]
    reopened.close()


def test_tasks_taken_back_from_a_node_are_each_a_requeued_event(store: SQLiteStore) -> None:
    store.add_node("n1", "one", 1, NOW)
    store.add_job("j", "u", spec(count=3), {}, NOW)
    a0, a1, kept = place(store, "n1", *store.tasks("j"))
    before = store.latest_events(1)[-1].seq
    requeued = store.requeue_node_attempts(
        "n1", {(kept.task_id, kept.attempt, kept.epoch)}, "node lost (silent 10 s)", NOW + 5
    )
    assert sorted(requeued) == sorted([a0.task_id, a1.task_id])
    events = store.events(before)
    assert [(e.kind, e.job_id, e.task_index, e.node_id) for e in events] == [
        ("task_requeued", "j", 0, "n1"),
        ("task_requeued", "j", 1, "n1"),
    ]
    assert "attempt 1 taken back from node n1 (node lost (silent 10 s))" in events[0].message
