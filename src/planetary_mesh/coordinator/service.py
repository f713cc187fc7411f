"""The one place where logic meets I/O: load a view, ask the pure core, commit, then notify.

Everything runs on the coordinator's event loop; the store is called synchronously, so each
method below is atomic with respect to the others. Nothing is sent to an agent before the
transition it reflects is committed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from cryptography import x509

from planetary_mesh import __version__
from planetary_mesh.coordinator.bootstrap import USER_CERT_LIFETIME
from planetary_mesh.coordinator.browser import BrowserLogins
from planetary_mesh.coordinator.changes import Changes
from planetary_mesh.coordinator.metrics import Metrics
from planetary_mesh.coordinator.planning import SCHEDULE_BATCH, plan_round
from planetary_mesh.coordinator.sessions import AgentSession
from planetary_mesh.coordinator.why import Explanation, explain_pending, explain_placed
from planetary_mesh.core.liveness import LivenessPolicy, NodeLiveness, liveness_changes
from planetary_mesh.core.model import Assignment, Job, JobSpec, Task, UserRecord
from planetary_mesh.core.prefetch import JobDurations, NodeLoad
from planetary_mesh.core.states import NodeState, TaskState
from planetary_mesh.errors import NotFound, RequestRejected, TokenError, TrustError
from planetary_mesh.pki import certs, tokens
from planetary_mesh.protocol import (
    LOG_MARKER_ROOM,
    MAX_LOG_BYTES,
    MAX_OUTPUT_BYTES,
    MAX_RESULT_BYTES,
    MAX_TASKS_PER_JOB,
    CallsAdd,
    Ended,
    FunctionSubmit,
    Hello,
    JobSubmit,
    JoinRequest,
    JoinResponse,
    Log,
    LogChunk,
    Report,
    Started,
    TokenInfo,
    Usage,
    UserInfo,
)
from planetary_mesh.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)

ASSIGN_MESSAGE_BYTES = 16 * 1024 * 1024  # of calls in one message to an agent (its limit: 64)
SCHEDULE_RETRY_AFTER = 0.5  # seconds before the scheduler loop tries again after a failed round

# Ends that are the task's own doing count against its retries; the rest requeue it for free.
_COUNTS_AGAINST_RETRIES = {
    "exited",
    "signalled",
    "timeout",
    "oom",
    "disk_quota",
    "sandbox_error",
}


class CoordinatorService:
    def __init__(
        self,
        store: SQLiteStore,
        ca_cert: x509.Certificate,
        ca_key: certs.PrivateKey,
        *,
        node_cert_lifetime: timedelta = timedelta(hours=24),
        policy: LivenessPolicy | None = None,
        retry_backoff: tuple[float, float] = (1.0, 60.0),
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` is wall time, for what is stored and shown; ``ticks`` a monotonic clock
        for liveness, so that a step of the machine's clock (NTP, a resumed VM) neither
        declares every node lost nor keeps a silent one alive. Tests that inject a ``clock``
        drive both with it unless they pass ``ticks`` too."""
        self.store = store
        self.ca_cert = ca_cert
        self.ca_key = ca_key
        self.ca_hash = certs.ca_fingerprint(ca_cert)
        self.node_cert_lifetime = node_cert_lifetime
        self.policy = policy or LivenessPolicy()
        self.retry_backoff = retry_backoff
        self.clock = clock
        self.ticks = ticks or (time.monotonic if clock is time.time else clock)
        self.sessions: dict[str, AgentSession] = {}
        # What each connected node's machine is doing (CPU %, memory in use), as its last
        # message said: live figures for people, never stored and never used to schedule.
        self.usage: dict[str, Usage] = {}
        self.browser = BrowserLogins(clock, store=store)  # login links and browser sessions
        self.changes = Changes()  # long polls and event streams wait on it
        store.on_commit = self.changes.notify
        self.metrics = Metrics(self)
        self._kick = asyncio.Event()
        self.durations = JobDurations()  # how long jobs' tasks take: who may be prefetched
        self._turns = itertools.count()  # which node placement looks at first, round by round
        self._queued_reports: list[tuple[AgentSession, Report]] = []  # to commit together
        # After a restart no session is up yet: every node waits to reconnect, and is owed a
        # grace before it can be declared lost.
        store.mark_nodes(NodeState.READY, NodeState.SUSPECT)
        now = self.ticks()
        self.liveness: dict[str, NodeLiveness] = {
            node.id: NodeLiveness(
                node.id,
                node.state,
                connected=False,
                last_heard=now,
                not_lost_before=now + self.policy.restart_grace,
            )
            for node in store.nodes()
            if node.state is not NodeState.LOST
        }
        # Draining nodes and their deadlines, kept in memory: checked on every liveness tick.
        self.draining: dict[str, float | None] = {
            node.id: node.drain_deadline for node in store.nodes() if node.draining
        }
        self._interval = self.policy.interval(self._live_nodes())
        # Removed nodes' certificates, refused on every request until they expire.
        self._denied_serials: set[int] = set()
        self._denied_names: set[tuple[str, str]] = set()
        for serial, kind, name in store.denied_certs(now):
            self._denied_serials.add(int(serial))
            if kind == "node":  # node ids are never reused; user names may be, by a new person
                self._denied_names.add((kind, name))

    # -- tokens and joining -----------------------------------------------------------------

    def create_token(self, ttl: float, uses: int | None) -> tuple[str, str]:
        """A new join token, and its id (for `mesh token revoke`)."""
        token = tokens.new_join_token(self.ca_hash)
        now = self.clock()
        token_id = secrets.token_hex(4)
        self.store.add_token(token_id, tokens.hash_secret(token.secret), now + ttl, uses, now)
        return str(token), token_id

    def renew_node_cert(self, identity: certs.Identity, csr: str) -> str:
        """A new certificate for a node, over its current (valid, not denied) one: no token."""
        node_id = self.check_peer_is_node(identity)
        cert = certs.sign_node_csr(
            self.ca_cert, self.ca_key, csr.encode(), node_id, self.node_cert_lifetime
        )
        self.store.set_node_serial(node_id, cert.serial_number)
        log.info(
            "node %s renewed its certificate (valid until %s)", node_id, cert.not_valid_after_utc
        )
        return certs.cert_to_pem(cert).decode()

    def tokens(self) -> list[TokenInfo]:
        return [TokenInfo(**asdict(record)) for record in self.store.tokens(self.clock())]

    def revoke_token(self, token_id: str) -> TokenInfo:
        if not self.store.revoke_token(token_id):
            raise NotFound(f"no join token {token_id!r}: `mesh token list` shows them")
        log.warning("join token %s revoked", token_id)
        return next(t for t in self.tokens() if t.id == token_id)

    def join(self, request: JoinRequest) -> JoinResponse:
        token = tokens.parse_join_token(request.token)
        if token.ca_hash != self.ca_hash:
            raise TokenError(
                "this join token belongs to another mesh (its CA hash does not match this "
                "coordinator's): create a token on this coordinator with `mesh token create`"
            )
        node_id = "n-" + secrets.token_hex(4)
        # Signing checks the CSR first, so a malformed request does not use up the token;
        # the certificate is handed out only if the token is then accepted.
        cert = certs.sign_node_csr(
            self.ca_cert, self.ca_key, request.csr.encode(), node_id, self.node_cert_lifetime
        )
        problem = self.store.consume_token(tokens.hash_secret(token.secret), self.clock())
        if problem:
            raise TokenError(f"{problem}: create a new one with `mesh token create`")
        self.store.add_node(node_id, request.name, cert.serial_number, self.clock())
        log.info("node %s (%s) joined", node_id, request.name)
        return JoinResponse(
            node_id=node_id,
            certificate=certs.cert_to_pem(cert).decode(),
            ca=certs.cert_to_pem(self.ca_cert).decode(),
        )

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, owner: str, body: JobSubmit) -> Job:
        try:
            files = {
                name: base64.b64decode(data, validate=True) for name, data in body.files.items()
            }
        except ValueError as exc:
            raise RequestRejected(f"an input file is not valid base64: {exc}", 422) from exc
        spec = JobSpec(
            argv=tuple(body.argv),
            count=body.count,
            outputs=tuple(body.outputs),
            **_shared_spec(body),
        )
        if body.id is not None and self.store.has_job(body.id):
            raise RequestRejected(
                f"a job with id {body.id} exists already: pick another id, or leave `id` out"
                " and the coordinator picks one",
                409,
            )
        return self._add_job(owner, spec, files, (), body.id)

    def submit_function(self, owner: str, body: FunctionSubmit) -> Job:
        """A job of Python function calls: one task per call, more may be added later."""
        spec = JobSpec(argv=(), count=len(body.calls), python=body.python, **_shared_spec(body))
        return self._add_job(owner, spec, {}, _decode_calls(body.calls))

    def _add_job(
        self,
        owner: str,
        spec: JobSpec,
        files: dict[str, bytes],
        calls: Sequence[bytes],
        job_id: str | None = None,
    ) -> Job:
        """A new job, under ``job_id`` (the client's, checked free) or an id picked here."""
        if job_id is None:
            job_id = secrets.token_hex(5)
            while self.store.has_job(job_id):  # 40 bits: among a million jobs, a repeat is likely
                job_id = secrets.token_hex(5)
        now = self.clock()
        with self.metrics.store_writes.time(), self.store.transaction():
            self.store.add_job(job_id, owner, spec, files, now, calls)
            tasks = "1 task" if spec.count == 1 else f"{spec.count} tasks"
            message = f"job {job_id} ({spec.name}, {tasks}) submitted by {owner}"
            self.store.add_event("job_submitted", message, now, job_id=job_id)
            # Placed in the submit's own commit where room is free: one fsync, not two.
            assigned = self._place_safely()
        self._dispatch(assigned)
        if len(assigned) >= SCHEDULE_BATCH:
            self.kick()  # more of the queue may fit: the loop goes on
        return self.job(job_id)

    def add_calls(self, job_id: str, body: CallsAdd, by: str) -> tuple[int, int]:
        """More calls for a function job (its owner's); the first new index and the count."""
        job = self.job(job_id)
        if job.owner != by:
            raise RequestRejected(f"only the job's owner ({job.owner}) may add calls to it", 403)
        if job.spec.python is None:
            raise RequestRejected(
                f"job {job_id} runs a command, not Python calls: submit a new job instead", 409
            )
        if job.cancelled_by is not None:
            raise RequestRejected(
                f"job {job_id} was cancelled by {job.cancelled_by}: it takes no more calls;"
                " use a new executor",
                409,
            )
        if job.spec.count + len(body.calls) > MAX_TASKS_PER_JOB:
            raise RequestRejected(
                f"job {job_id} would have more than {MAX_TASKS_PER_JOB} calls: use a new"
                " executor for more",
                413,
            )
        calls = _decode_calls(body.calls)
        with self.metrics.store_writes.time(), self.store.transaction():
            first = self.store.append_calls(job_id, calls, job.spec.priority)
            assigned = self._place_safely()
        self._dispatch(assigned)
        if len(assigned) >= SCHEDULE_BATCH:
            self.kick()
        return first, len(calls)

    def cancel_tasks(self, job_id: str, indices: list[int], by: str, admin: bool) -> None:
        """Cancel some tasks of a job (its owner, or an admin): queued ones never run, running
        ones are killed. Tasks that already ended keep their end."""
        job = self.job(job_id)
        if not admin and job.owner != by:
            raise RequestRejected(
                f"only the job's owner ({job.owner}) or an admin may cancel its tasks", 403
            )
        killed = self.store.cancel_tasks(job_id, indices, by, self.clock())
        for node_id, assignment in killed:
            session = self.sessions.get(node_id)
            if session:
                session.send(_cancel_message([assignment], f"cancelled by {by}"))
        if killed:
            self.kick()

    def job_seq(self, job_id: str) -> int:
        """The job's store sequence (what its calls are followed by); NotFound in words."""
        seq = self.store.job_seq(job_id)
        if seq is None:
            raise NotFound(f"no job {job_id!r}: `mesh jobs` lists the jobs this mesh knows")
        return seq

    def job(self, job_id: str) -> Job:
        job = self.store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}: `mesh jobs` lists the jobs this mesh knows")
        return job

    def task_id(self, job_id: str, index: int) -> tuple[int, int]:
        """The task's store id and current attempt; NotFound names the valid range."""
        task = self.store.task(job_id, index)
        if task is None:
            count = self.job(job_id).spec.count
            raise NotFound(f"job {job_id} has no task {index}: its tasks are 0 to {count - 1}")
        return task.id, task.attempt

    def cancel(self, job_id: str, by: str, admin: bool = True) -> Job:
        """Cancel a job: its owner may, and any admin."""
        job = self.job(job_id)
        if not admin and job.owner != by:
            raise RequestRejected(
                f"only the job's owner ({job.owner}) or an admin may cancel it", 403
            )
        if job.state.value in ("succeeded", "failed", "cancelled"):
            return job
        for node_id, assignment in self.store.cancel_job(job_id, by, self.clock()):
            session = self.sessions.get(node_id)
            if session:
                session.send(_cancel_message([assignment], f"cancelled by {by}"))
        self.store.add_event(
            "job_cancelled", f"job {job_id} cancelled by {by}", self.clock(), job_id=job_id
        )
        self.kick()
        return self.job(job_id)

    def why(self, job_id: str, index: int) -> tuple[Task, Explanation, bytes]:
        """Why a task waits or how it ended, and the tail of its latest output."""
        job = self.job(job_id)
        task = self.store.task(job_id, index)
        if task is None:
            raise NotFound(f"job {job_id} has no task {index} (it has {job.spec.count})")
        if task.state is TaskState.PENDING:
            ahead, not_before = self.store.queue_place(task.id)
            live = {
                node_id
                for node_id, record in self.liveness.items()
                if record.state is NodeState.READY and node_id in self.sessions
            }
            explained = explain_pending(
                job, self.store.nodes(), live, ahead, not_before, self.clock()
            )
        else:
            explained = explain_placed(job, task)
        tail = self.store.log_tail(task.id, task.attempt) if task.attempt else b""
        return task, explained, tail

    def logs(
        self, job_id: str, index: int, offset: int, attempt: int | None, tail: int | None = None
    ) -> LogChunk:
        task_id, current = self.task_id(job_id, index)
        attempt = current if attempt is None else attempt
        if tail is not None:
            offset = max(offset, self.store.log_size(task_id, attempt) - tail)
        data, next_offset = self.store.logs(task_id, attempt, offset)
        task = self.store.task(job_id, index)
        assert task is not None
        # No more output will come for this attempt once the task ended, or once the attempt
        # was superseded (a newer one exists, or it was put back in the queue).
        ended = (
            task.state.ended
            or task.attempt != attempt
            or (task.state is TaskState.PENDING and attempt > 0)
        )
        return LogChunk(
            attempt=attempt,
            offset=offset,
            next_offset=next_offset,
            data=base64.b64encode(data).decode(),
            ended=ended,
        )

    # -- agent sessions ---------------------------------------------------------------------

    def agent_connected(self, node_id: str, hello: Hello) -> AgentSession:
        """Adopt what the agent still holds, requeue what it lost, and open its session."""
        old = self.sessions.pop(node_id, None)
        if old:
            old.close()
        now = self.clock()
        was = self.liveness.get(node_id)
        if was is not None and was.state is NodeState.LOST:
            self.event("node_back", f"node {node_id} is back after being lost", node_id=node_id)
        self.liveness[node_id] = NodeLiveness(node_id, NodeState.READY, True, self.ticks())
        self.store.update_node(
            node_id,
            state=NodeState.READY,
            now=now,
            name=hello.name,
            cpus=hello.cpus,
            memory=hello.memory,
            sandbox=hello.sandbox,
            version=hello.version,
            labels=hello.labels,
            gpus=hello.gpus,
        )
        self._note_usage(node_id, hello.usage)
        session = AgentSession(
            node_id=node_id, cpus=hello.cpus, memory=hello.memory, gpus=hello.gpus
        )
        held = set(hello.held)
        requeued = self.store.requeue_node_attempts(
            node_id, held, "the node reconnected without this attempt", now
        )
        if requeued:
            log.info("node %s lost %d attempts; they are pending again", node_id, len(requeued))
        # What the agent holds but is no longer current (cancelled, superseded) must stop.
        current = self.store.active_attempts(node_id)
        stale = [ref for ref in held if ref not in current]
        session.send(
            {
                "type": "welcome",
                "node_id": node_id,
                "version": __version__,
                **self._timing(),
            }
        )
        if stale:
            session.send({"type": "cancel", "tasks": stale, "reason": "superseded attempt"})
        self.sessions[node_id] = session
        self._retime()
        self.kick()
        return session

    def _live_nodes(self) -> int:
        return sum(1 for n in self.liveness.values() if n.state is not NodeState.LOST)

    def _timing(self) -> dict[str, float]:
        n = self._live_nodes()
        return {"heartbeat_interval": self.policy.interval(n), "lease": self.policy.lease(n)}

    def _retime(self) -> None:
        """Stretch (or shrink) every agent's heartbeat interval as the mesh grows or shrinks."""
        interval = self.policy.interval(self._live_nodes())
        if interval != self._interval:
            self._interval = interval
            timing = {"type": "timing", **self._timing()}
            for session in self.sessions.values():
                session.send(timing)

    def agent_heard(self, session: AgentSession, usage: Usage | None = None) -> None:
        """Any message on a session is a heartbeat; a silent-suspect node is ready again."""
        if session.closed:
            return
        self._note_usage(session.node_id, usage)
        now = self.clock()
        current = self.liveness.get(session.node_id)
        if current is not None and current.state is NodeState.SUSPECT and current.connected:
            self.store.update_node(session.node_id, state=NodeState.READY, now=now)
            self.event(
                "node_back", f"node {session.node_id} is heard again", node_id=session.node_id
            )
            self.kick()
        self.liveness[session.node_id] = NodeLiveness(
            session.node_id, NodeState.READY, True, self.ticks()
        )

    def _note_usage(self, node_id: str, usage: Usage | None) -> None:
        if usage is not None:
            self.usage[node_id] = usage

    def agent_heartbeat(self, session: AgentSession) -> None:
        self.metrics.heartbeats.inc()
        session.send({"type": "lease"})  # renews the agent's lease on its running tasks

    def agent_disconnected(self, session: AgentSession) -> None:
        session.closed = True
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self.usage.pop(session.node_id, None)
            now = self.clock()
            self.store.update_node(session.node_id, state=NodeState.SUSPECT, now=now)
            self.liveness[session.node_id] = NodeLiveness(
                session.node_id, NodeState.SUSPECT, False, self.ticks()
            )
            self.event(
                "node_suspect", f"node {session.node_id}: session closed", node_id=session.node_id
            )

    def event(self, kind: str, message: str, **where: Any) -> None:
        """Log a notable event and keep it in the store."""
        log.warning("%s", message)
        self.store.add_event(kind, message, self.clock(), **where)

    # -- liveness and drain -----------------------------------------------------------------

    def check_liveness(self) -> None:
        """Apply what the pure liveness rules say, then hand back work past drain deadlines."""
        now, ticks = self.clock(), self.ticks()
        watched = [n for n in self.liveness.values() if n.state is not NodeState.LOST]
        for change in liveness_changes(watched, ticks, self.policy):
            record = self.liveness[change.node_id]
            heard_at = now - (ticks - record.last_heard)  # as wall time, for the store
            if change.state is NodeState.LOST:
                try:
                    self._node_lost(record, change.reason, heard_at)
                except Exception:
                    # Nothing of the loss was kept (memory or store): the node is still
                    # watched, so the next tick declares it lost again and retries.
                    log.exception("declaring node %s lost failed; retrying", change.node_id)
                continue
            self.liveness[change.node_id] = NodeLiveness(
                record.node_id, change.state, record.connected, record.last_heard,
                record.not_lost_before,
            )  # fmt: skip
            self.store.update_node(change.node_id, state=change.state, now=heard_at)
            self.event(
                "node_suspect", f"node {change.node_id}: {change.reason}", node_id=change.node_id
            )
        for node_id, deadline in self.draining.items():
            if deadline is not None and now >= deadline:
                self._hand_back(node_id, "drain deadline passed")

    def _node_lost(self, record: NodeLiveness, why: str, heard_at: float) -> None:
        """Mark the node lost and put its tasks back in the queue, in one commit: a node is
        never lost in the store (or in memory, which stops watching it) with work left on it."""
        node_id = record.node_id
        with self.store.transaction():
            self.store.update_node(node_id, state=NodeState.LOST, now=heard_at)
            requeued = self.store.requeue_node_attempts(
                node_id, set(), f"node lost ({why})", self.clock()
            )
            self.event(
                "node_lost",
                f"node {node_id} lost ({why}); {len(requeued)} tasks back in the queue",
                node_id=node_id,
            )
        self.metrics.reassignments.inc(len(requeued))
        session = self.sessions.pop(node_id, None)
        if session is not None:
            session.close()
        self.liveness[node_id] = NodeLiveness(node_id, NodeState.LOST, False, self.ticks())
        self._retime()
        self.kick()

    def _hand_back(self, node_id: str, why: str) -> None:
        active = self.store.active_attempts(node_id)
        if not active:
            return
        requeued = self.store.requeue_node_attempts(node_id, set(), why, self.clock())
        self.metrics.reassignments.inc(len(requeued))
        session = self.sessions.get(node_id)
        if session is not None:
            session.send({"type": "cancel", "tasks": sorted(active), "reason": why})
        self.event(
            "reassigned", f"node {node_id}: {why}; {len(requeued)} tasks handed back",
            node_id=node_id,
        )  # fmt: skip
        self.kick()

    def drain(self, node_id: str, deadline: float | None, by: str) -> None:
        self._known_node(node_id)
        at = None if deadline is None else self.clock() + deadline
        self.store.set_drain(node_id, True, at)
        self.draining[node_id] = at
        self.event("node_drain", f"node {node_id} drained by {by}", node_id=node_id)

    def undrain(self, node_id: str, by: str) -> None:
        self._known_node(node_id)
        self.store.set_drain(node_id, False, None)
        self.draining.pop(node_id, None)
        self.event("node_undrain", f"node {node_id} undrained by {by}", node_id=node_id)
        self.kick()

    def remove_node(self, node_id: str, by: str) -> int:
        """Take a node out of the mesh for good: its certificate is refused from now on, its
        live session closes, its tasks go back to the queue. Returns how many went back."""
        self._known_node(node_id)
        now = self.clock()
        # The node's certificate was issued at most one lifetime ago: deny it that long.
        until = now + self.node_cert_lifetime.total_seconds()
        serial, requeued = self.store.remove_node(node_id, f"node removed by {by}", now, until)
        self.metrics.reassignments.inc(requeued)
        self._denied_serials.add(int(serial))
        self._denied_names.add(("node", node_id))
        session = self.sessions.pop(node_id, None)
        if session is not None:
            session.close()
        self.liveness.pop(node_id, None)
        self.draining.pop(node_id, None)
        self.event(
            "node_removed",
            f"node {node_id} removed by {by}; {requeued} tasks back in the queue",
            node_id=node_id,
        )
        self._retime()
        self.kick()
        return requeued

    def check_not_denied(self, identity: certs.Identity) -> None:
        """Refuse a certificate of a removed node or user before it expires."""
        if identity.serial in self._denied_serials or (
            (identity.kind.value, identity.name) in self._denied_names
        ):
            remedy = (
                "ask an admin for a new one (`mesh users add`)"
                if identity.kind is certs.PeerKind.USER
                else "join again with a new token"
            )
            raise TrustError(
                f"this certificate ({identity.kind.value} {identity.name}) was revoked when its"
                f" holder was removed from the mesh; {remedy}"
            )

    # -- what /metrics reads at scrape time ----------------------------------------------

    def node_states(self) -> dict[str, int]:
        return self.store.node_state_counts()

    def task_states(self) -> dict[str, int]:
        return self.store.task_state_counts()

    def live_sessions(self) -> int:
        return len(self.sessions)

    # -- users ------------------------------------------------------------------------------

    def register_user(self, cert: x509.Certificate, by: str) -> None:
        """Record a user certificate made outside the API (`mesh init`'s admin), once."""
        who = certs.identity_of(cert)
        record = UserRecord(
            who.name, who.admin, who.serial, self.clock(), who.not_after.timestamp(), by
        )
        self.store.add_user(record)

    def add_user(self, name: str, admin: bool, csr: str, by: str) -> str:
        """Sign a person's certificate (PEM) for a key made on the admin's machine."""
        if any(user.name == name for user in self.store.users()):
            raise RequestRejected(
                f"a user named {name!r} exists already: pick another name, or"
                f" `mesh users remove {name}` first",
                409,
            )
        cert = certs.sign_user_csr(
            self.ca_cert, self.ca_key, csr.encode(), name, USER_CERT_LIFETIME, admin
        )
        record = UserRecord(
            name, admin, cert.serial_number, self.clock(), cert.not_valid_after_utc.timestamp(), by
        )
        if not self.store.add_user(record):
            raise RequestRejected(f"a user named {name!r} was added just now", 409)
        role = "admin" if admin else "user"
        self.event("user_added", f"{role} {name} added by {by}")
        return certs.cert_to_pem(cert).decode()

    def users(self) -> list[UserInfo]:
        return [
            UserInfo(
                name=u.name,
                admin=u.admin,
                created_at=u.created_at,
                expires_at=u.expires_at,
                created_by=u.created_by,
            )
            for u in self.store.users()
        ]

    def remove_user(self, name: str, by: str) -> None:
        """Deny the person's certificate from now on (until it expires)."""
        if name == by:
            raise RequestRejected("you cannot remove yourself: ask another admin to", 400)
        removed = self.store.remove_user(name, f"user removed by {by}", self.clock())
        if removed is None:
            raise NotFound(f"no user {name!r}: `mesh users list` shows them")
        self._denied_serials.add(removed.cert_serial)
        self.event("user_removed", f"user {name} removed by {by}")

    def _known_node(self, node_id: str) -> None:
        if not self.store.node_known(node_id):
            raise NotFound(f"no node {node_id!r}: `mesh nodes` lists the nodes of this mesh")

    async def run_liveness(self, tick: float = 0.1) -> None:
        while True:
            await asyncio.sleep(tick)
            try:
                self.check_liveness()
            except Exception:  # keep watching; the next tick retries
                log.exception("liveness check failed")

    def agent_report(self, session: AgentSession, report: Report) -> None:
        """Commit one agent report at once (see agent_reports)."""
        self.agent_reports([(session, report)])

    def agent_report_soon(self, session: AgentSession, report: Report) -> None:
        """Commit ``report`` with the others that reach the event loop in the same turn: the
        agents' reports then share one transaction, one fsync and one placement round (a group
        commit). Each is acknowledged only once committed."""
        self._queued_reports.append((session, report))
        if len(self._queued_reports) == 1:
            asyncio.get_running_loop().call_soon(self._commit_queued_reports)

    def _commit_queued_reports(self) -> None:
        batch, self._queued_reports = self._queued_reports, []
        # A session closed meanwhile (replaced, or its node declared lost) is not heard: its
        # agent sends what was not acknowledged again on its next session.
        batch = [(session, report) for session, report in batch if not session.closed]
        try:
            self.agent_reports(batch)
        except Exception:
            # Nothing of the batch was committed: the agents must send it again, which they do
            # on a new session.
            log.exception("could not commit the agents' reports; their sessions are closed")
            for session, _ in batch:
                session.close()

    def agent_reports(self, batch: list[tuple[AgentSession, Report]]) -> None:
        """Commit batches of agent events in one transaction, then acknowledge each so its
        agent can forget it."""
        if not batch:
            return
        now = self.clock()
        freed = retrying = False
        assigned: list[tuple[str, Assignment]] = []
        with self.metrics.store_writes.time(), self.store.transaction():
            for session, report in batch:
                logs: list[tuple[int, int, int, bytes]] = []
                for event in report.events:
                    task_id, attempt, epoch = event.task
                    if isinstance(event, Log):
                        # Whatever an agent sends, an attempt's stored output is bounded.
                        room = MAX_LOG_BYTES + LOG_MARKER_ROOM - event.offset
                        if room > 0:
                            data = base64.b64decode(event.data)[:room]
                            logs.append((task_id, attempt, event.offset, data))
                    elif isinstance(event, Started):
                        self.store.record_started(
                            task_id, attempt, epoch, now, node_id=session.node_id
                        )
                    elif isinstance(event, Ended):
                        # Output is stored before the end it precedes.
                        self.store.record_logs(logs)
                        logs = []
                        state = self._record_end(session.node_id, event, now)
                        freed |= state is not None
                        retrying |= state is TaskState.PENDING
                self.store.record_logs(logs)
            if freed:
                # The freed room is filled in the same commit as the ends that freed it: one
                # fsync, not two, between a task's end and the next one's start.
                assigned = self._place_safely()
        for session, report in batch:
            session.send({"type": "ack", "seq": report.seq})
        self._dispatch(assigned)
        if retrying or len(assigned) >= SCHEDULE_BATCH:
            # The round above filled the freed room; the loop is needed only when more of
            # the queue may fit, or a retry's backoff is a new time for it to wake at.
            self.kick()

    def _place_safely(self) -> list[tuple[str, Assignment]]:
        """A round inside the caller's transaction, as a savepoint: if it fails, the caller's
        change (a report, a submit) still commits and the scheduler loop tries again."""
        try:
            with self.store.transaction():
                return self._place()
        except Exception:
            log.exception("scheduling in the same commit failed; the scheduler loop retries")
            self.kick()
            return []

    def _record_end(self, node_id: str, event: Ended, now: float) -> TaskState | None:
        """The task's state after this end, or None for a refused (late) result."""
        task_id, attempt, epoch = event.task
        outputs = {name: base64.b64decode(data) for name, data in event.outputs.items()}
        if sum(len(data) for data in outputs.values()) > MAX_OUTPUT_BYTES:
            outputs = {}
        result = None if event.result is None else base64.b64decode(event.result)
        if result is not None and len(result) > MAX_RESULT_BYTES:
            result = None
        succeeded = event.end == "exited" and event.exit_code == 0
        state = self.store.record_ended(
            task_id,
            attempt,
            epoch,
            succeeded=succeeded,
            counts_against_retries=event.end in _COUNTS_AGAINST_RETRIES,
            exit_code=event.exit_code,
            reason=event.message,
            outputs=outputs,
            now=now,
            node_id=node_id,  # an agent may only report on its own attempts
            backoff_base=self.retry_backoff[0],
            backoff_cap=self.retry_backoff[1],
            killed=event.end == "cancelled",
            end_kind=event.end,
            result=result,
        )
        started = self.store.attempt_started_at(task_id, attempt)
        if state is not None and started is not None:
            started_at, job_seq = started
            self.metrics.task_duration.observe(max(0.0, now - started_at))
            self.durations.record(job_seq, now - started_at)
        if state is None:
            self.event(
                "late_result",
                f"refused a late result from node {node_id} for task {task_id} attempt "
                f"{attempt}: {event.message}",
                node_id=node_id,
            )
        return state

    # -- scheduling -------------------------------------------------------------------------

    def kick(self) -> None:
        """Ask for a scheduling round soon; many kicks in a row cost one round."""
        self._kick.set()

    async def run_scheduler(self, retry_after: float = SCHEDULE_RETRY_AFTER) -> None:
        failed = False
        while True:
            # Sleep until kicked, or until the earliest retry's backoff is over; after a failed
            # round, not longer than ``retry_after``: the kick that asked for it is spent, and
            # in a quiet mesh (a node just lost, its work requeued) none may come for minutes.
            wake = self.store.next_retry_time()
            timeout = None if wake is None else max(0.0, wake - self.clock()) + 0.001
            if failed:
                timeout = retry_after if timeout is None else min(timeout, retry_after)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)
            self._kick.clear()
            try:
                # A full batch placed means more of the queue may fit: go on, letting I/O in.
                while self.schedule_round() >= SCHEDULE_BATCH:
                    await asyncio.sleep(0)
                failed = False
            except Exception:
                log.exception("scheduling round failed; retrying in %.1f s", retry_after)
                failed = True

    def schedule_round(self) -> int:
        """Place queued tasks on connected nodes, send each node its batch; how many placed."""
        assigned = self._place()
        self._dispatch(assigned)
        return len(assigned)

    def _place(self) -> list[tuple[str, Assignment]]:
        """Plan and commit a round (inside the caller's transaction, if any); sending is
        _dispatch's, after the commit, so no agent hears of a placement the store may lose."""
        if not self.sessions:
            return []
        with self.metrics.scheduling.time():
            return self._place_round()

    def _dispatch(self, assigned: list[tuple[str, Assignment]]) -> None:
        by_node: dict[str, list[Assignment]] = defaultdict(list)
        for node_id, assignment in assigned:
            by_node[node_id].append(assignment)
        for node_id, assignments in by_node.items():
            session = self.sessions.get(node_id)
            if session is not None:
                self._send_assignments(session, assignments)

    def _place_round(self) -> list[tuple[str, Assignment]]:
        placements = plan_round(self.store, self._loads, self.durations.depths(), self.clock())
        with self.metrics.store_writes.time():
            return self.store.assign(placements, self.clock())

    def _loads(self) -> list[NodeLoad]:
        """Every node that may be given work now, with what its tasks hold."""
        usage = self.store.usage_by_node()
        loads = []
        for node_id, session in self.sessions.items():
            live = self.liveness.get(node_id)
            if node_id in self.draining or live is None or live.state is not NodeState.READY:
                continue  # draining, or silent (suspect): it keeps its work but gets no more
            used_cpus, used_memory, used_gpus = usage.get(node_id, (0.0, 0, 0))
            loads.append(
                NodeLoad(
                    node_id,
                    session.cpus,
                    session.memory,
                    used_cpus,
                    used_memory,
                    session.gpus,
                    used_gpus,
                )
            )
        # Placement gives a task to the node with the most free room, the first such on a tie:
        # starting each round from the next node spreads jobs that come one after another over
        # equally idle nodes instead of sending them all to one (whose spare sandboxes run out).
        if loads:
            turn = next(self._turns) % len(loads)
            loads = loads[turn:] + loads[:turn]
        return loads

    def _send_assignments(self, session: AgentSession, assignments: list[Assignment]) -> None:
        jobs: dict[str, Any] = {}
        for job_id in {a.job_id for a in assignments} - session.known_jobs:
            spec = self.store.job_spec(job_id)
            files = self.store.job_files(job_id)
            jobs[job_id] = {
                **spec.to_dict(),
                "files": {n: base64.b64encode(d).decode() for n, d in files.items()},
            }
            session.known_jobs.add(job_id)
            if spec.python is not None:
                session.function_jobs.add(job_id)
        calls = [a.task_id for a in assignments if a.job_id in session.function_jobs]
        payloads = self.store.call_payloads(calls) if calls else {}
        # Calls travel with their tasks, in messages of a bounded size (the agent's limit).
        batch: list[Assignment] = []
        size = 0
        for assignment in assignments:
            payload = len(payloads.get(assignment.task_id, b""))
            if batch and size + payload > ASSIGN_MESSAGE_BYTES:
                session.send(_assign_message(jobs, batch, payloads))
                jobs, batch, size = {}, [], 0
            batch.append(assignment)
            size += payload
        session.send(_assign_message(jobs, batch, payloads))

    def check_peer_is_node(self, identity: certs.Identity) -> str:
        if identity.kind is not certs.PeerKind.NODE:
            raise TrustError("only agent certificates may open an agent session")
        self.check_not_denied(identity)
        if not self.store.node_known(identity.name):
            raise TrustError(f"node {identity.name} is not a member of this mesh")
        return identity.name


def _assign_message(
    jobs: dict[str, Any], assignments: list[Assignment], payloads: dict[int, bytes]
) -> dict[str, Any]:
    return {
        "type": "assign",
        "jobs": jobs,
        "tasks": [[a.task_id, a.attempt, a.epoch, a.job_id, a.index] for a in assignments],
        "calls": {
            str(a.task_id): base64.b64encode(payloads[a.task_id]).decode()
            for a in assignments
            if a.task_id in payloads
        },
    }


def _shared_spec(body: JobSubmit | FunctionSubmit) -> dict[str, Any]:
    """What a command job and a job of calls declare alike, as JobSpec takes it."""
    return {
        "name": body.name,
        "env": dict(body.env),
        "cpus": body.cpus,
        "memory": body.memory,
        "timeout": body.timeout,
        "retries": body.retries,
        "priority": body.priority,
        "network": body.network,
        "gpus": body.gpus,
    }


def _decode_calls(calls: list[str]) -> list[bytes]:
    try:
        return [base64.b64decode(call, validate=True) for call in calls]
    except ValueError as exc:
        raise RequestRejected(f"a call is not valid base64: {exc}", 422) from exc


def _cancel_message(assignments: list[Assignment], reason: str) -> dict[str, Any]:
    return {
        "type": "cancel",
        "tasks": [[a.task_id, a.attempt, a.epoch] for a in assignments],
        "reason": reason,
    }
