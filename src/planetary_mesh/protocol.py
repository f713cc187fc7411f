"""Wire formats shared by the coordinator, the agents and the client.

REST bodies are strict pydantic models: no type coercion, no extra fields, bounded sizes, flat
file names. The agent session speaks JSON messages with a ``type`` field (see docs/adr/0002).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_ARRAY = 100_000
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # per task, all collected files together
MAX_LOG_BYTES = 1024**3  # per attempt, the most output the coordinator stores, whatever agents do
LOG_MARKER_ROOM = 1024  # past an agent's own log limit, for its "truncated" line
MAX_GPUS = 64  # a task may ask for this many whole GPUs at most
MAX_TASKS_PER_JOB = 10_000_000  # an executor's calls over its life (an array: MAX_ARRAY)
MAX_CALL_BYTES = 8 * 1024 * 1024  # one function call: the pickled function and arguments
MAX_RESULT_BYTES = 8 * 1024 * 1024  # one call's pickled result (or its error record)
PYTHON_VERSION = r"^3\.[0-9]{1,2}$"
# A job id: the coordinator picks 10 hex digits; a client choosing its own (JobSubmit.id) picks
# 10 to 32, enough that two clients never pick the same by chance.
JOB_ID = r"^[0-9a-f]{10,32}$"


def base64_size(size: int) -> int:
    return 4 * ((size + 2) // 3)


# A pickled call, base64: what a function task runs.
Call = Annotated[str, Field(max_length=base64_size(MAX_CALL_BYTES))]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9._+-]{1,255}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABELS = 32


def _flat_name(name: str) -> str:
    if not _FILE_NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"file name {name!r} must be a plain name (letters, digits, . _ + -), not a path"
        )
    return name


def _env_names(env: dict[str, str]) -> dict[str, str]:
    for key in env:
        if not _ENV_NAME.match(key) or key.startswith("MESH_"):
            raise ValueError(
                f"environment variable name {key!r} must match [A-Za-z_][A-Za-z0-9_]* "
                "and must not start with MESH_ (those are set by the mesh)"
            )
    return env


def _output_glob(pattern: str) -> str:
    if pattern.startswith("/") or ".." in pattern.split("/") or not pattern.strip():
        raise ValueError(f"output pattern {pattern!r} must be relative to the task's directory")
    return pattern


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise ValueError(
                f"label name {key!r} must be 1-63 letters, digits, . _ / - (starting with a"
                " letter or digit)"
            )
        if len(value) > 128:
            raise ValueError(f"label {key}'s value is longer than 128 characters")
    return labels


FlatName = Annotated[str, AfterValidator(_flat_name)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
Finite = Annotated[float, AfterValidator(_finite)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class JobSubmit(Strict):
    # Chosen by the client, or left out for the coordinator to pick: a client that picks it
    # knows its job even when the connection drops before the answer (Client.run).
    id: str | None = Field(default=None, pattern=JOB_ID)
    name: str = Field(default="job", min_length=1, max_length=128)
    argv: list[Annotated[str, Field(max_length=8192)]] = Field(min_length=1, max_length=1024)
    env: Annotated[
        dict[str, Annotated[str, Field(max_length=65536)]], AfterValidator(_env_names)
    ] = Field(default_factory=dict, max_length=256)
    files: dict[FlatName, str] = Field(default_factory=dict, max_length=256)  # name → base64
    outputs: list[Annotated[str, AfterValidator(_output_glob), Field(max_length=512)]] = Field(
        default_factory=list, max_length=64
    )
    cpus: Finite = Field(default=1.0, gt=0, le=1024)
    memory: int = Field(default=256 * 1024**2, ge=1024**2, le=1024**5)
    timeout: Finite | None = Field(default=None, gt=0, le=30 * 86400)
    retries: int = Field(default=0, ge=0, le=100)
    count: int = Field(default=1, ge=1, le=MAX_ARRAY)
    priority: int = Field(default=0, ge=-1000, le=1000)
    network: bool = False
    gpus: int = Field(default=0, ge=0, le=MAX_GPUS)  # whole GPUs per task


class FunctionSubmit(Strict):
    """A job of Python function calls (an executor's): one task per call. More calls may be
    added later (``POST /v1/jobs/{id}/calls``); each call is a cloudpickle of
    ``("call", fn, args, kwargs)`` or ``("batch", [(fn, args, kwargs), ...])``, base64."""

    name: str = Field(default="functions", min_length=1, max_length=128)
    python: str = Field(pattern=PYTHON_VERSION)  # major.minor the calls were pickled by
    calls: list[Call] = Field(default_factory=list, max_length=MAX_ARRAY)
    env: Annotated[
        dict[str, Annotated[str, Field(max_length=65536)]], AfterValidator(_env_names)
    ] = Field(default_factory=dict, max_length=256)
    cpus: Finite = Field(default=1.0, gt=0, le=1024)
    memory: int = Field(default=256 * 1024**2, ge=16 * 1024**2, le=1024**5)
    timeout: Finite | None = Field(default=None, gt=0, le=30 * 86400)
    retries: int = Field(default=0, ge=0, le=100)
    priority: int = Field(default=0, ge=-1000, le=1000)
    network: bool = False
    gpus: int = Field(default=0, ge=0, le=MAX_GPUS)  # whole GPUs per call


class CallsAdd(Strict):
    calls: list[Call] = Field(min_length=1, max_length=MAX_ARRAY)


class CallsAdded(Strict):
    first: int  # the task index of the first call added; the rest follow in order
    count: int


class CallUpdate(Strict):
    """A call that started or ended."""

    index: int
    state: str  # running, succeeded, failed, cancelled
    end: str | None  # how it ended, in the agent's word: exited, oom, timeout, cancelled, ...
    exit_code: int | None  # 0: returned; 1: raised (the result is the error record)
    reason: str | None
    result: str | None  # base64 of the pickled result, or of the error record


class CallUpdates(Strict):
    cursor: int  # ask for changes after this one next
    updates: list[CallUpdate]


class TasksCancel(Strict):
    indices: list[Annotated[int, Field(ge=0, lt=MAX_TASKS_PER_JOB)]] = Field(
        min_length=1, max_length=MAX_ARRAY
    )


class TokenCreate(Strict):
    ttl: Finite = Field(default=3600.0, gt=0, le=365 * 86400)
    uses: int | None = Field(default=1, ge=1, le=1_000_000)  # None: unlimited


class RenewRequest(Strict):
    csr: str = Field(max_length=16384)  # a new key's request; only its public key is used


class RenewResponse(Strict):
    certificate: str  # PEM, for the same node id, a full lifetime from now


class UserCreate(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    admin: bool = False
    csr: str = Field(max_length=16384)  # for a key made on the admin's machine


class UserCreated(Strict):
    name: str
    certificate: str  # PEM
    ca: str  # PEM: the mesh's CA, for the bundle


class UserInfo(Strict):
    name: str
    admin: bool
    created_at: float
    expires_at: float  # when the certificate expires
    created_by: str


class EventInfo(Strict):
    seq: int  # ask for events after this one to follow
    time: float
    kind: str  # job_submitted, task_placed, task_started, task_ended, task_requeued, node_lost, …
    node_id: str | None
    job_id: str | None
    task_index: int | None
    message: str


class NodeVerdict(Strict):
    node_id: str
    name: str
    fits_now: bool
    reason: str


class WhyInfo(Strict):
    job_id: str
    index: int
    state: str
    summary: str  # one sentence: why it waits, or how it ended
    nodes: list[NodeVerdict]  # for a pending task: every node and why it is not chosen
    attempts: list[AttemptInfo]
    output_tail: str  # the last lines of its latest attempt's output


class LoginLink(Strict):
    url: str  # opens once, in a browser, before expires_at
    expires_at: float


class NodeRemoved(Strict):
    id: str
    requeued: int  # tasks it was running, back in the queue


class NewToken(Strict):
    token: str  # PMTKN-1-<CA hash>-<secret>: shown once, never stored
    id: str  # for `mesh token revoke`


class TokenInfo(Strict):
    """A join token as `mesh token list` shows it: never its secret, which is not stored."""

    id: str
    created_at: float
    expires_at: float
    uses_left: int | None  # None: unlimited
    state: str  # active, expired, used up, revoked


class JoinRequest(Strict):
    token: str = Field(max_length=256)
    csr: str = Field(max_length=16384)
    name: str = Field(min_length=1, max_length=128)


class JoinResponse(Strict):
    node_id: str
    certificate: str
    ca: str


class AttemptInfo(Strict):
    attempt: int
    node: str
    state: str
    exit_code: int | None
    reason: str | None
    assigned_at: float
    started_at: float | None
    ended_at: float | None
    late_result: str | None = None  # a result that came after it was superseded, refused


class TaskInfo(Strict):
    index: int
    state: str
    node: str | None
    exit_code: int | None
    reason: str | None
    attempts: int
    started_at: float | None
    ended_at: float | None
    history: list[AttemptInfo] | None = None  # every attempt, in the detail of one job


class JobInfo(Strict):
    id: str
    name: str
    owner: str
    state: str
    created_at: float
    argv: list[str]
    cpus: float
    memory: int
    timeout: float | None
    retries: int
    priority: int
    files: list[str]
    outputs: list[str]
    cancelled_by: str | None
    tasks: dict[str, int]  # "total" and one count per task state
    task_list: list[TaskInfo] | None = None  # only in the detail of one job
    python: str | None = None  # a job of Python function calls: the caller's major.minor
    gpus: int = 0  # whole GPUs per task


class DrainRequest(Strict):
    deadline: Finite | None = Field(default=None, gt=0, le=30 * 86400)  # seconds from now


class NodeInfo(Strict):
    id: str
    name: str
    state: str
    cpus: float
    memory: int
    used_cpus: float  # held by the mesh's running tasks
    used_memory: int
    running: int
    sandbox: str
    version: str
    last_seen: float
    drain_deadline: float | None = None
    labels: dict[str, str] = {}
    gpus: int = 0
    used_gpus: int = 0  # held by the mesh's tasks
    cpu_percent: float | None = None  # the whole machine's, owner's work included; live nodes
    memory_in_use: int | None = None


class NodeAttemptInfo(Strict):
    """An attempt in a node's history: which task it was and how it went."""

    job_id: str
    index: int
    attempt: int
    state: str
    exit_code: int | None
    reason: str | None
    assigned_at: float
    started_at: float | None
    ended_at: float | None


class ThroughputInfo(Strict):
    since: float
    bucket_seconds: float
    succeeded: list[int]  # tasks that ended in slot i, from since + i * bucket_seconds
    failed: list[int]
    other: list[int]  # cancelled, or lost for good


class OverviewInfo(Strict):
    nodes: dict[str, int]  # by state, and "total"
    tasks: dict[str, int]  # by state
    throughput: ThroughputInfo
    events: list[EventInfo]  # the latest, newest last


class LogChunk(Strict):
    attempt: int
    offset: int
    next_offset: int
    data: str  # base64
    ended: bool  # the task has ended: no more output will come for this attempt


class OutputFile(Strict):
    name: str
    data: str  # base64


# -- agent session ------------------------------------------------------------------------------

TaskRef = tuple[int, int, int]  # (task_id, attempt, epoch): every message about running work


class Usage(Strict):
    """What the agent's machine is doing now, the owner's own work included: for people to
    see on the dashboard, never for scheduling (that counts what the mesh's tasks hold)."""

    cpu_percent: Finite = Field(ge=0, le=100)
    memory_in_use: int = Field(ge=0)


class Hello(Strict):
    type: Literal["hello"]
    name: str = Field(max_length=128)
    cpus: Finite = Field(gt=0)
    memory: int = Field(gt=0)
    sandbox: str = Field(max_length=256)  # what the node enforces, for `mesh nodes`
    version: str = Field(max_length=64)
    labels: Labels = Field(default_factory=dict)
    gpus: int = Field(default=0, ge=0, le=256)
    usage: Usage | None = None
    held: list[TaskRef] = Field(max_length=100_000)  # attempts running or with unacked results


class Started(Strict):
    kind: Literal["started"]
    task: TaskRef


class Log(Strict):
    kind: Literal["log"]
    task: TaskRef
    offset: int = Field(ge=0)
    data: str


class Ended(Strict):
    kind: Literal["ended"]
    task: TaskRef
    end: Literal[
        "exited", "signalled", "timeout", "cancelled", "oom", "disk_quota", "sandbox_error"
    ]
    exit_code: int | None
    signal: int | None
    message: str = Field(max_length=4096)
    outputs: dict[str, str] = Field(default_factory=dict)  # relative path → base64
    # A function call's pickled result (or error record), base64.
    result: str | None = Field(default=None, max_length=base64_size(MAX_RESULT_BYTES))


Event = Annotated[Started | Log | Ended, Field(discriminator="kind")]


class Report(Strict):
    type: Literal["report"]
    seq: int
    events: list[Event] = Field(max_length=100_000)
    usage: Usage | None = None


class Heartbeat(Strict):
    type: Literal["heartbeat"]
    usage: Usage | None = None


AgentMessage = Annotated[Hello | Report | Heartbeat, Field(discriminator="type")]
