"""The domain's plain data: what a job asks for and what the store records.

Frozen dataclasses only; the store, the service and the API translate to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from planetary_mesh.core.states import AttemptState, JobState, NodeState, TaskState


@dataclass(frozen=True)
class JobSpec:
    """Everything a user declares about a job (all tasks of an array share it)."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 1.0
    memory: int = 256 * 1024**2
    timeout: float | None = None
    retries: int = 0
    count: int = 1
    priority: int = 0
    outputs: tuple[str, ...] = ()
    network: bool = False
    python: str | None = None  # a job of Python function calls: the major.minor they need
    gpus: int = 0  # whole GPUs each task holds while it runs

    def to_dict(self) -> dict[str, Any]:
        """Its fields by name, for JSON: what ``dataclasses.asdict`` gives, without its deep
        copy (~30 us, twice per job on the coordinator's hot path); ``env`` is not copied."""
        return {f.name: getattr(self, f.name) for f in _SPEC_FIELDS}


_SPEC_FIELDS = fields(JobSpec)


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    spec: JobSpec
    state: JobState
    created_at: float
    file_names: tuple[str, ...]
    counts: dict[TaskState, int]
    cancelled_by: str | None = None


@dataclass(frozen=True)
class Attempt:
    number: int
    node_id: str
    epoch: int
    state: AttemptState
    assigned_at: float
    started_at: float | None
    ended_at: float | None
    exit_code: int | None
    reason: str | None
    late_result: str | None = None  # a result that arrived after it was superseded, refused


@dataclass(frozen=True)
class Task:
    id: int
    job_id: str
    index: int
    state: TaskState
    attempt: int
    epoch: int
    node_id: str | None
    exit_code: int | None
    reason: str | None
    started_at: float | None
    ended_at: float | None


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    state: NodeState
    cpus: float
    memory: int
    used_cpus: float
    used_memory: int
    running: int
    sandbox: str
    version: str
    joined_at: float
    last_seen: float
    draining: bool = False
    drain_deadline: float | None = None
    labels: dict[str, str] = field(default_factory=dict)  # the owner's words: room=lab, gpu=a100
    gpus: int = 0
    used_gpus: int = 0  # held by the mesh's tasks

    @property
    def shown_state(self) -> NodeState:
        """What people see: a working node that is being drained says so."""
        return NodeState.DRAINING if self.draining and self.state is NodeState.READY else self.state


@dataclass(frozen=True)
class BrowserSessionRecord:
    """A browser signed in with a login link, as stored: the cookie only as its hash."""

    digest: str  # sha256 of the cookie's value
    user: str
    admin: bool
    cert_serial: int  # the certificate behind the link: its removal ends the session too
    cert_not_after: float
    csrf: str
    expires_at: float


@dataclass(frozen=True)
class NodeAttempt:
    """One attempt as a node's history shows it: which task, and how it went."""

    job_id: str
    index: int
    attempt: Attempt


@dataclass(frozen=True)
class Throughput:
    """Tasks ended per time slot: slot i covers ``since + i*bucket`` to the next one."""

    since: float
    bucket: float
    succeeded: list[int]
    failed: list[int]
    other: list[int]  # cancelled, lost for good


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    kind: str
    message: str
    node_id: str | None = None
    job_id: str | None = None
    task_index: int | None = None


@dataclass(frozen=True)
class Assignment:
    """What the coordinator sends an agent: one attempt of one task, fenced by ``epoch``."""

    task_id: int
    job_id: str
    index: int
    attempt: int
    epoch: int


@dataclass(frozen=True)
class JoinTokenRecord:
    """A join token as stored: never its secret, only a hash of it (not shown here)."""

    id: str
    created_at: float
    expires_at: float
    uses_left: int | None  # None: unlimited
    state: str  # active, expired, used up, revoked


@dataclass(frozen=True)
class UserRecord:
    name: str
    admin: bool
    cert_serial: int
    created_at: float
    expires_at: float  # when the certificate expires
    created_by: str
