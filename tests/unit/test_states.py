"""The task state machine: the transition table, the events an ended attempt raises, and a job's
state derived from its tasks. Pure functions, so no store and no clock."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planetary_mesh.core.states import (
    TASK_TRANSITIONS,
    JobState,
    TaskEvent,
    TaskState,
    end_event,
    job_state,
    next_task_state,
)
from planetary_mesh.errors import IllegalTransition, MeshError

S, E = TaskState, TaskEvent

# Written out by hand on purpose: a change to the table must change this list too, so that it is
# a decision and not an accident.
EXPECTED_TRANSITIONS: list[tuple[TaskState, TaskEvent, TaskState]] = [
    (S.PENDING, E.ASSIGN, S.ASSIGNED),
    (S.PENDING, E.CANCEL, S.CANCELLED),
    (S.ASSIGNED, E.START, S.RUNNING),
    (S.ASSIGNED, E.SUCCEED, S.SUCCEEDED),
    (S.ASSIGNED, E.FAIL, S.FAILED),
    (S.ASSIGNED, E.RETRY, S.PENDING),
    (S.ASSIGNED, E.REQUEUE, S.PENDING),
    (S.ASSIGNED, E.CANCEL, S.CANCELLED),
    (S.RUNNING, E.SUCCEED, S.SUCCEEDED),
    (S.RUNNING, E.FAIL, S.FAILED),
    (S.RUNNING, E.RETRY, S.PENDING),
    (S.RUNNING, E.REQUEUE, S.PENDING),
    (S.RUNNING, E.CANCEL, S.CANCELLED),
]

ILLEGAL_PAIRS = [
    (state, event)
    for state, event in itertools.product(TaskState, TaskEvent)
    if (state, event) not in TASK_TRANSITIONS
]

ENDED_STATES = [S.SUCCEEDED, S.FAILED, S.CANCELLED]


def test_the_table_is_exactly_the_expected_one() -> None:
    table = sorted((s.value, e.value, t.value) for (s, e), t in TASK_TRANSITIONS.items())
    expected = sorted((s.value, e.value, t.value) for s, e, t in EXPECTED_TRANSITIONS)
    assert table == expected
    assert len(EXPECTED_TRANSITIONS) == len({(s, e) for s, e, _ in EXPECTED_TRANSITIONS})


@pytest.mark.parametrize(("key", "target"), list(TASK_TRANSITIONS.items()), ids=str)
def test_every_legal_transition_in_the_table_gives_its_target(
    key: tuple[TaskState, TaskEvent], target: TaskState
) -> None:
    state, event = key
    assert next_task_state(state, event) is target


@pytest.mark.parametrize(("state", "event", "target"), EXPECTED_TRANSITIONS, ids=str)
def test_every_expected_transition_gives_its_target(
    state: TaskState, event: TaskEvent, target: TaskState
) -> None:
    assert next_task_state(state, event) is target


@pytest.mark.parametrize(("state", "event"), ILLEGAL_PAIRS, ids=str)
def test_every_pair_outside_the_table_is_refused_by_name(
    state: TaskState, event: TaskEvent
) -> None:
    with pytest.raises(IllegalTransition) as caught:
        next_task_state(state, event)
    message = str(caught.value)
    assert repr(state.value) in message
    assert repr(event.value) in message
    assert caught.value.state == state.value
    assert caught.value.event == event.value
    assert isinstance(caught.value, MeshError)


def test_the_illegal_pairs_cover_the_rest_of_the_product() -> None:
    assert len(ILLEGAL_PAIRS) + len(TASK_TRANSITIONS) == len(TaskState) * len(TaskEvent)
    # A few that a bug or a stale report would produce, named so the list cannot be empty.
    assert (S.PENDING, E.START) in ILLEGAL_PAIRS
    assert (S.PENDING, E.SUCCEED) in ILLEGAL_PAIRS
    assert (S.RUNNING, E.ASSIGN) in ILLEGAL_PAIRS
    assert (S.RUNNING, E.START) in ILLEGAL_PAIRS


@pytest.mark.parametrize("state", ENDED_STATES)
@pytest.mark.parametrize("event", list(TaskEvent))
def test_an_ended_task_takes_no_event_at_all(state: TaskState, event: TaskEvent) -> None:
    assert state.ended
    assert not state.active
    with pytest.raises(IllegalTransition, match=f"{state.value}.*{event.value}"):
        next_task_state(state, event)


def test_ended_and_active_partition_the_states() -> None:
    assert {s for s in TaskState if s.ended} == set(ENDED_STATES)
    assert {s for s in TaskState if s.active} == {S.ASSIGNED, S.RUNNING}
    assert not S.PENDING.ended
    assert not S.PENDING.active


@given(st.lists(st.sampled_from(list(TaskEvent)), max_size=30))
def test_any_event_sequence_either_moves_by_the_table_or_is_refused(
    events: list[TaskEvent],
) -> None:
    state = S.PENDING
    for event in events:
        if (state, event) in TASK_TRANSITIONS:
            state = next_task_state(state, event)
        else:
            with pytest.raises(IllegalTransition):
                next_task_state(state, event)
        if state.ended:
            break
    # Once ended, nothing moves it again.
    if state.ended:
        for event in TaskEvent:
            with pytest.raises(IllegalTransition):
                next_task_state(state, event)


# -- end_event --------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [True, False])
@pytest.mark.parametrize(("failures", "retries"), [(0, 0), (5, 0), (0, 3), (9, 3)])
def test_a_success_is_a_success_whatever_the_counts(
    counts: bool, failures: int, retries: int
) -> None:
    assert end_event(True, counts, failures, retries) is E.SUCCEED


@pytest.mark.parametrize(("failures", "retries"), [(0, 0), (1, 0), (7, 2), (100, 100)])
def test_a_failure_that_does_not_count_requeues_even_with_no_retries_left(
    failures: int, retries: int
) -> None:
    assert end_event(False, False, failures, retries) is E.REQUEUE


@pytest.mark.parametrize(
    ("failures", "retries", "expected"),
    [
        # ``failures`` includes the attempt that just failed.
        (1, 0, E.FAIL),  # no retries: the first failure is final
        (1, 1, E.RETRY),  # one retry: the first failure goes back to the queue...
        (2, 1, E.FAIL),  # ...and the second is final
        (3, 3, E.RETRY),  # boundary: the last retry is still granted
        (4, 3, E.FAIL),  # boundary: one past it is not
        (5, 3, E.FAIL),
    ],
)
def test_a_counted_failure_retries_while_retries_are_left(
    failures: int, retries: int, expected: TaskEvent
) -> None:
    assert end_event(False, True, failures, retries) is expected


@given(st.integers(min_value=0, max_value=50), st.integers(min_value=1, max_value=60))
def test_a_task_with_n_retries_runs_at_most_n_plus_one_times(retries: int, runs: int) -> None:
    events = []
    for failures in range(1, runs + 1):
        event = end_event(False, True, failures, retries)
        events.append(event)
        if event is E.FAIL:
            break
    assert events.count(E.RETRY) == min(retries, runs)
    assert (E.FAIL in events) == (runs > retries)
    assert len(events) <= retries + 1


@pytest.mark.parametrize(
    ("succeeded", "counts", "failures", "retries"),
    [(True, True, 0, 0), (False, False, 1, 0), (False, True, 1, 1), (False, True, 1, 0)],
)
def test_every_end_event_is_legal_from_running_and_assigned(
    succeeded: bool, counts: bool, failures: int, retries: int
) -> None:
    event = end_event(succeeded, counts, failures, retries)
    for state in (S.ASSIGNED, S.RUNNING):
        assert (state, event) in TASK_TRANSITIONS


# -- job_state ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "cancelled", "expected"),
    [
        ({S.PENDING: 3}, False, JobState.PENDING),
        ({S.PENDING: 2, S.ASSIGNED: 1}, False, JobState.RUNNING),
        ({S.RUNNING: 1}, False, JobState.RUNNING),
        # Work has started once any task left the queue, even if it already ended.
        ({S.PENDING: 1, S.SUCCEEDED: 1}, False, JobState.RUNNING),
        # A failed task does not fail the job while others still run.
        ({S.FAILED: 1, S.RUNNING: 1}, False, JobState.RUNNING),
        ({S.SUCCEEDED: 4}, False, JobState.SUCCEEDED),
        ({S.SUCCEEDED: 3, S.FAILED: 1}, False, JobState.FAILED),
        ({S.FAILED: 2}, False, JobState.FAILED),
        ({S.SUCCEEDED: 1, S.CANCELLED: 1}, False, JobState.CANCELLED),
        ({S.FAILED: 1, S.CANCELLED: 1}, False, JobState.CANCELLED),
        ({S.CANCELLED: 2}, True, JobState.CANCELLED),
        # Cancelled by a user while tasks are still being stopped.
        ({S.RUNNING: 1, S.CANCELLED: 1}, True, JobState.CANCELLED),
        ({S.PENDING: 2}, True, JobState.CANCELLED),
        # Zero-count entries change nothing.
        ({S.SUCCEEDED: 2, S.FAILED: 0, S.CANCELLED: 0}, False, JobState.SUCCEEDED),
        ({S.PENDING: 2, S.RUNNING: 0}, False, JobState.PENDING),
    ],
)
def test_job_state_for_the_main_combinations(
    counts: dict[TaskState, int], cancelled: bool, expected: JobState
) -> None:
    assert job_state(counts, cancelled) is expected


@given(
    st.dictionaries(st.sampled_from(list(TaskState)), st.integers(0, 5), min_size=1),
    st.booleans(),
)
def test_job_state_is_ended_exactly_when_every_task_is(
    counts: dict[TaskState, int], cancelled: bool
) -> None:
    total = sum(counts.values())
    ended = sum(n for s, n in counts.items() if s.ended)
    state = job_state(counts, cancelled)
    if cancelled:
        assert state is JobState.CANCELLED
    elif total and ended < total:
        assert state in (JobState.PENDING, JobState.RUNNING)
    else:
        assert state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
