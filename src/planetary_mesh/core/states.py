"""States and the task state machine: a transition table, nothing else.

Pure: no I/O, no clocks. The service asks :func:`next_task_state` before it writes a transition,
so an event that does not apply to a task's state (a stale report, a bug) is refused by name.
"""

from __future__ import annotations

from enum import StrEnum

from planetary_mesh.errors import IllegalTransition


class TaskState(StrEnum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in _ENDED

    @property
    def active(self) -> bool:
        """Placed on a node: it holds that node's resources."""
        return self in (TaskState.ASSIGNED, TaskState.RUNNING)


_ENDED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class TaskEvent(StrEnum):
    ASSIGN = "assign"  # the scheduler placed it on a node
    START = "start"  # the agent started the process
    SUCCEED = "succeed"  # the attempt ended with exit code 0
    FAIL = "fail"  # the attempt failed and no retries are left
    RETRY = "retry"  # the attempt failed and a retry is left: back to the queue
    REQUEUE = "requeue"  # the attempt vanished through no fault of the task (node gone)
    CANCEL = "cancel"  # a user cancelled it


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeState(StrEnum):
    READY = "ready"  # session up, taking work
    SUSPECT = "suspect"  # session closed; its tasks are kept until it comes back or is lost
    LOST = "lost"
    DRAINING = "draining"


class AttemptState(StrEnum):
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # its node vanished or never received it; the task went back to pending


_S, _E = TaskState, TaskEvent

TASK_TRANSITIONS: dict[tuple[TaskState, TaskEvent], TaskState] = {
    (_S.PENDING, _E.ASSIGN): _S.ASSIGNED,
    (_S.PENDING, _E.CANCEL): _S.CANCELLED,
    (_S.ASSIGNED, _E.START): _S.RUNNING,
    # A short task may end before its "started" report is read: the end implies the start.
    (_S.ASSIGNED, _E.SUCCEED): _S.SUCCEEDED,
    (_S.ASSIGNED, _E.FAIL): _S.FAILED,
    (_S.ASSIGNED, _E.RETRY): _S.PENDING,
    (_S.ASSIGNED, _E.REQUEUE): _S.PENDING,
    (_S.ASSIGNED, _E.CANCEL): _S.CANCELLED,
    (_S.RUNNING, _E.SUCCEED): _S.SUCCEEDED,
    (_S.RUNNING, _E.FAIL): _S.FAILED,
    (_S.RUNNING, _E.RETRY): _S.PENDING,
    (_S.RUNNING, _E.REQUEUE): _S.PENDING,
    (_S.RUNNING, _E.CANCEL): _S.CANCELLED,
}


def next_task_state(state: TaskState, event: TaskEvent) -> TaskState:
    """The state ``event`` moves a task in ``state`` to; :class:`IllegalTransition` if none."""
    try:
        return TASK_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state.value, event.value) from None


def end_event(
    succeeded: bool, counts_against_retries: bool, failures: int, retries: int
) -> TaskEvent:
    """Which event an ended attempt raises.

    ``failures`` counts the failed attempts *including* this one when it failed. Failures that
    are not the task's fault (``counts_against_retries`` false) put it back in the queue for free.
    """
    if succeeded:
        return TaskEvent.SUCCEED
    if not counts_against_retries:
        return TaskEvent.REQUEUE
    return TaskEvent.RETRY if failures <= retries else TaskEvent.FAIL


def job_state(counts: dict[TaskState, int], cancelled: bool) -> JobState:
    """A job's state, derived from how many of its tasks are in each state."""
    total = sum(counts.values())
    ended = sum(n for state, n in counts.items() if state.ended)
    if ended < total:
        if cancelled:
            return JobState.CANCELLED
        started = total - counts.get(TaskState.PENDING, 0)
        return JobState.RUNNING if started else JobState.PENDING
    if counts.get(TaskState.CANCELLED, 0) or cancelled:
        return JobState.CANCELLED
    if counts.get(TaskState.FAILED, 0):
        return JobState.FAILED
    return JobState.SUCCEEDED
