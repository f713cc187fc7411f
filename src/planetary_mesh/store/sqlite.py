"""The durable record: SQLite in WAL mode, every transition committed before it is acknowledged.

One connection, used from the coordinator's event-loop thread only. ``synchronous=FULL`` makes a
commit survive power loss, not just a killed process; batching (one transaction per scheduling
round or per batch of agent reports) keeps that affordable.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from planetary_mesh.core.liveness import retry_backoff
from planetary_mesh.core.model import (
    Assignment,
    BrowserSessionRecord,
    JobSpec,
    JoinTokenRecord,
    UserRecord,
)
from planetary_mesh.core.scheduler import Demand, Placement
from planetary_mesh.core.states import (
    AttemptState,
    NodeState,
    TaskEvent,
    TaskState,
    end_event,
    next_task_state,
)
from planetary_mesh.errors import StoreError
from planetary_mesh.store.calls import CallRecords
from planetary_mesh.store.reads import ACTIVE, StoreReads
from planetary_mesh.store.schema import MIGRATIONS


class SQLiteStore(CallRecords, StoreReads):
    """Transitions here, each in one transaction; the read-only queries in reads.py."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._depth = 0  # nesting of _tx: only the outermost commits
        self.on_commit: Callable[[], None] | None = None  # told after each committed change
        self._migrate()
        self._load_stamp()

    def close(self) -> None:
        self._db.close()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction; inside another one, a savepoint, so a caller can group many store
        calls into one commit (one fsync) while each call still fails on its own."""
        if self._depth:
            self._depth += 1
            name = f"sp{self._depth}"
            self._db.execute(f"SAVEPOINT {name}")
            try:
                yield self._db
            except BaseException:
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
                raise
            finally:
                self._depth -= 1
            self._db.execute(f"RELEASE {name}")
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
        self._db.execute("COMMIT")
        if self.on_commit is not None:
            self.on_commit()

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """Group several store calls into one atomic commit."""
        return self._tx()

    def _migrate(self) -> None:
        has_meta = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        done = 0
        if has_meta:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            done = int(row[0]) if row else 0
        if done > len(MIGRATIONS):
            raise StoreError(
                f"the store has schema version {done}, newer than this program knows "
                f"({len(MIGRATIONS)}): upgrade planetary-mesh"
            )
        for version, statements in enumerate(MIGRATIONS[done:], start=done + 1):
            with self._tx() as db:
                for statement in statements:
                    db.execute(statement)
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(version),),
                )

    # -- nodes ------------------------------------------------------------------------------

    def add_node(self, node_id: str, name: str, cert_serial: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes (id, name, state, cpus, memory, cert_serial, joined_at,"
                " last_seen) VALUES (?, ?, ?, 0, 0, ?, ?, ?)",
                (node_id, name, NodeState.SUSPECT.value, str(cert_serial), now, now),
            )

    def remove_node(self, node_id: str, reason: str, now: float, until: float) -> tuple[str, int]:
        """Forget a node, deny its certificate until ``until`` and put its active attempts back
        in the queue, in one commit. Returns its certificate serial and the tasks requeued."""
        with self._tx() as db:
            row = db.execute("SELECT cert_serial FROM nodes WHERE id=?", (node_id,)).fetchone()
            if row is None:
                raise StoreError(f"no node {node_id!r}")
            requeued = self.requeue_node_attempts(node_id, set(), reason, now)
            db.execute(
                "INSERT OR REPLACE INTO denied_certs (serial, kind, name, reason, denied_at, until)"
                " VALUES (?, 'node', ?, ?, ?, ?)",
                (row[0], node_id, reason, now, until),
            )
            db.execute("DELETE FROM nodes WHERE id=?", (node_id,))
        return str(row[0]), len(requeued)

    def add_browser_session(self, record: BrowserSessionRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO browser_sessions (digest, user_name, admin, cert_serial,"
                " cert_not_after, csrf, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.digest, record.user, int(record.admin), str(record.cert_serial),
                    record.cert_not_after, record.csrf, record.expires_at,
                ),
            )  # fmt: skip

    def end_browser_sessions(self, now: float, digest: str | None = None) -> None:
        """Forget the session ``digest`` (a logout) and every session expired by ``now``."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM browser_sessions WHERE digest=? OR expires_at<=?", (digest, now)
            )

    def browser_sessions(self, now: float) -> list[BrowserSessionRecord]:
        return [
            BrowserSessionRecord(r[0], r[1], bool(r[2]), int(r[3]), r[4], r[5], r[6])
            for r in self._db.execute(
                "SELECT digest, user_name, admin, cert_serial, cert_not_after, csrf, expires_at"
                " FROM browser_sessions WHERE expires_at > ?",
                (now,),
            )
        ]

    def add_user(self, user: UserRecord) -> bool:
        """Record a person; False if the name is taken."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO users (name, admin, cert_serial, created_at, expires_at,"
                " created_by) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    user.name,
                    int(user.admin),
                    str(user.cert_serial),
                    user.created_at,
                    user.expires_at,
                    user.created_by,
                ),
            )
            return cursor.rowcount > 0

    def users(self) -> list[UserRecord]:
        return [
            UserRecord(str(r[0]), bool(r[1]), int(r[2]), float(r[3]), float(r[4]), str(r[5]))
            for r in self._db.execute(
                "SELECT name, admin, cert_serial, created_at, expires_at, created_by FROM users"
                " ORDER BY name"
            )
        ]

    def remove_user(self, name: str, reason: str, now: float) -> UserRecord | None:
        """Forget a person and deny their certificate until it expires; None if unknown."""
        with self._tx() as db:
            found = [u for u in self.users() if u.name == name]
            if not found:
                return None
            user = found[0]
            db.execute(
                "INSERT OR REPLACE INTO denied_certs (serial, kind, name, reason, denied_at, until)"
                " VALUES (?, 'user', ?, ?, ?, ?)",
                (str(user.cert_serial), name, reason, now, user.expires_at),
            )
            db.execute("DELETE FROM users WHERE name=?", (name,))
            return user

    def denied_certs(self, now: float) -> list[tuple[str, str, str]]:
        """(serial, kind, name) of every certificate still denied at ``now``."""
        return [
            (str(serial), str(kind), str(name))
            for serial, kind, name in self._db.execute(
                "SELECT serial, kind, name FROM denied_certs WHERE until > ?", (now,)
            )
        ]

    def set_node_serial(self, node_id: str, cert_serial: int) -> None:
        """The node renewed its certificate: this is the one a removal deny-lists."""
        with self._tx() as db:
            db.execute("UPDATE nodes SET cert_serial=? WHERE id=?", (str(cert_serial), node_id))

    def update_node(
        self,
        node_id: str,
        *,
        state: NodeState,
        now: float,
        name: str | None = None,
        cpus: float | None = None,
        memory: int | None = None,
        sandbox: str | None = None,
        version: str | None = None,
        labels: dict[str, str] | None = None,
        gpus: int | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET state=?, last_seen=?, name=COALESCE(?, name),"
                " cpus=COALESCE(?, cpus), memory=COALESCE(?, memory),"
                " sandbox=COALESCE(?, sandbox), version=COALESCE(?, version),"
                " labels=COALESCE(?, labels), gpus=COALESCE(?, gpus) WHERE id=?",
                (
                    state.value, now, name, cpus, memory, sandbox, version,
                    None if labels is None else json.dumps(labels, sort_keys=True), gpus, node_id,
                ),
            )  # fmt: skip

    def set_drain(self, node_id: str, draining: bool, deadline: float | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET draining=?, drain_deadline=? WHERE id=?",
                (int(draining), deadline if draining else None, node_id),
            )

    def add_event(
        self,
        kind: str,
        message: str,
        now: float,
        *,
        node_id: str | None = None,
        job_id: str | None = None,
        task_index: int | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (time, kind, node_id, job_id, task_index, message)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, kind, node_id, job_id, task_index, message),
            )

    @staticmethod
    def _task_events(
        db: sqlite3.Connection, rows: list[tuple[float, str, str | None, str, int, str]]
    ) -> None:
        """Record (time, kind, node_id, job_id, task_index, message) task events, in the
        transaction of the change they describe."""
        db.executemany(
            "INSERT INTO events (time, kind, node_id, job_id, task_index, message)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )

    def mark_nodes(self, from_state: NodeState, to_state: NodeState) -> None:
        with self._tx() as db:
            db.execute("UPDATE nodes SET state=? WHERE state=?", (to_state.value, from_state.value))

    # -- join tokens ------------------------------------------------------------------------

    def add_token(
        self, token_id: str, secret_hash: str, expires_at: float, uses: int | None, now: float
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (id, secret_hash, created_at, expires_at, uses_left)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_id, secret_hash, now, expires_at, uses),
            )

    def tokens(self, now: float) -> list[JoinTokenRecord]:
        """Every join token, newest first, with its state at ``now``."""
        found = []
        for token_id, created_at, expires_at, uses_left, revoked in self._db.execute(
            "SELECT id, created_at, expires_at, uses_left, revoked FROM tokens"
            " ORDER BY created_at DESC, id"
        ):
            if revoked:
                state = "revoked"
            elif uses_left is not None and uses_left <= 0:
                state = "used up"
            elif expires_at <= now:
                state = "expired"
            else:
                state = "active"
            found.append(JoinTokenRecord(token_id, created_at, expires_at, uses_left, state))
        return found

    def revoke_token(self, token_id: str) -> bool:
        """Refuse the token from now on; False if there is no such token."""
        with self._tx() as db:
            cursor = db.execute("UPDATE tokens SET revoked=1 WHERE id=?", (token_id,))
            return cursor.rowcount > 0

    def consume_token(self, secret_hash: str, now: float) -> str | None:
        """Use the token once; the reason it cannot be used, or None when it was used."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, expires_at, uses_left, revoked FROM tokens WHERE secret_hash=?",
                (secret_hash,),
            ).fetchone()
            if row is None:
                return "this join token is not known to the coordinator"
            token_id, expires_at, uses_left, revoked = row
            if revoked:
                return "this join token was revoked"
            if expires_at <= now:
                return "this join token has expired"
            if uses_left is not None and uses_left <= 0:
                return "this join token has been used up"
            if uses_left is not None:
                db.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE id=?", (token_id,))
            return None

    # -- jobs -------------------------------------------------------------------------------

    def add_job(
        self,
        job_id: str,
        owner: str,
        spec: JobSpec,
        files: dict[str, bytes],
        now: float,
        calls: Sequence[bytes] = (),
    ) -> None:
        """A new job and its tasks; a function job's ``calls`` (one per task) with them."""
        spec_json = json.dumps(spec.to_dict())
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO jobs (id, name, owner, priority, cpus, memory, count, spec,"
                " created_at, gpus) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    spec.name,
                    owner,
                    spec.priority,
                    spec.cpus,
                    spec.memory,
                    spec.count,
                    spec_json,
                    now,
                    spec.gpus,
                ),
            )
            seq = cursor.lastrowid
            assert seq is not None
            db.executemany(
                "INSERT INTO job_files (job_id, name, data) VALUES (?, ?, ?)",
                ((job_id, name, data) for name, data in files.items()),
            )
            db.executemany(
                "INSERT INTO tasks (job_seq, idx, state, priority) VALUES (?, ?, ?, ?)",
                ((seq, i, TaskState.PENDING.value, spec.priority) for i in range(spec.count)),
            )
            self.insert_calls(db, seq, 0, calls)

    def cancel_job(self, job_id: str, by: str, now: float) -> list[tuple[str, Assignment]]:
        """Cancel every task not yet ended; the attempts that agents must now kill."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} is not in the store")
            db.execute(
                "UPDATE jobs SET cancelled_by=COALESCE(cancelled_by, ?) WHERE seq=?", (by, row[0])
            )
            return self._cancel_tasks(db, row[0], job_id, None, f"cancelled by {by}", now)

    def cancel_tasks(
        self, job_id: str, indices: Sequence[int], by: str, now: float
    ) -> list[tuple[str, Assignment]]:
        """Cancel some of a job's tasks (those not yet ended); the attempts to kill."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} is not in the store")
            return self._cancel_tasks(db, row[0], job_id, indices, f"cancelled by {by}", now)

    def _cancel_tasks(
        self,
        db: sqlite3.Connection,
        seq: int,
        job_id: str,
        indices: Sequence[int] | None,
        reason: str,
        now: float,
    ) -> list[tuple[str, Assignment]]:
        """Cancel the job's tasks at ``indices`` (all when None) that have not ended."""
        states = (TaskState.PENDING.value, *ACTIVE)
        if indices is None:
            rows = db.execute(
                "SELECT id, idx, attempt, epoch, node_id, state FROM tasks"
                " WHERE job_seq=? AND state IN (?, ?, ?) ORDER BY idx",
                (seq, *states),
            ).fetchall()
        else:
            rows = []
            for start in range(0, len(indices), 500):
                chunk = list(indices[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows += db.execute(
                    "SELECT id, idx, attempt, epoch, node_id, state FROM tasks"
                    f" WHERE job_seq=? AND state IN (?, ?, ?) AND idx IN ({marks})",
                    (seq, *states, *chunk),
                ).fetchall()
        active = [
            (node_id, Assignment(task_id, job_id, index, attempt, epoch))
            for task_id, index, attempt, epoch, node_id, state in rows
            if state in ACTIVE
        ]
        db.executemany(
            "UPDATE attempts SET state=?, ended_at=?, reason=? WHERE task_id=? AND attempt=?",
            ((AttemptState.CANCELLED.value, now, reason, a.task_id, a.attempt) for _, a in active),
        )
        first = self.stamp(len(rows))
        db.executemany(
            "UPDATE tasks SET state=?, reason=?, ended_at=?, changed=? WHERE id=?",
            (
                (TaskState.CANCELLED.value, reason, now, first + n, row[0])
                for n, row in enumerate(rows)
            ),
        )
        return active

    # -- scheduling -------------------------------------------------------------------------

    def pending_demands(
        self, limit: int, now: float = float("inf"), offset: int = 0
    ) -> list[Demand]:
        """The queue in placement order: highest priority first, then work taken back from a
        lost node, then oldest job, then index. Tasks still backing off wait. Read in that
        order from the tasks_queue index, so a short page of a long queue is cheap."""
        return [
            Demand(task_id=row[0], cpus=row[1], memory=row[2], job_seq=row[3], gpus=row[4])
            for row in self._db.execute(
                "SELECT t.id, j.cpus, j.memory, t.job_seq, j.gpus FROM tasks t"
                " JOIN jobs j ON j.seq = t.job_seq"
                " WHERE t.state=? AND (t.not_before IS NULL OR t.not_before <= ?)"
                " ORDER BY t.priority DESC, t.lost_first DESC, t.job_seq, t.idx"
                " LIMIT ? OFFSET ?",
                (TaskState.PENDING.value, now, limit, offset),
            )
        ]

    def next_retry_time(self) -> float | None:
        """When the earliest backing-off task may be placed, if any is waiting."""
        row = self._db.execute(
            "SELECT MIN(not_before) FROM tasks WHERE state=? AND not_before IS NOT NULL",
            (TaskState.PENDING.value,),
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def usage_by_node(self) -> dict[str, tuple[float, int, int]]:
        """CPUs, memory and GPUs the active attempts on each node hold."""
        return {
            node: (cpus, memory, gpus)
            for node, (cpus, memory, _, gpus) in self._active_usage().items()
        }

    def assign(self, placements: list[Placement], now: float) -> list[tuple[str, Assignment]]:
        """Commit a plan: each task gets a new attempt and a fresh, globally unique epoch."""
        if not placements:
            return []
        target = next_task_state(TaskState.PENDING, TaskEvent.ASSIGN).value
        assigned: list[tuple[str, Assignment]] = []
        with self._tx() as db:
            (epoch,) = db.execute(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key='epoch'"
            ).fetchone()
            for placement in placements:
                epoch += 1
                row = db.execute(
                    "UPDATE tasks SET state=?, attempt=attempt+1, epoch=?, node_id=?,"
                    " exit_code=NULL, reason=NULL, not_before=NULL, lost_first=0"
                    " WHERE id=? AND state=?"
                    " RETURNING attempt, idx, (SELECT id FROM jobs WHERE seq=job_seq)",
                    (target, epoch, placement.node_id, placement.task_id, TaskState.PENDING.value),
                ).fetchone()
                if row is None:
                    continue
                attempt, index, job_id = row
                db.execute(
                    "INSERT INTO attempts (task_id, attempt, node_id, epoch, state, assigned_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        placement.task_id,
                        attempt,
                        placement.node_id,
                        epoch,
                        AttemptState.ASSIGNED.value,
                        now,
                    ),
                )
                assigned.append(
                    (
                        placement.node_id,
                        Assignment(placement.task_id, job_id, index, attempt, epoch),
                    )
                )
            db.execute("UPDATE meta SET value=? WHERE key='epoch'", (str(epoch),))
            self._task_events(
                db,
                [
                    (
                        now,
                        "task_placed",
                        node_id,
                        a.job_id,
                        a.index,
                        f"task {a.job_id}[{a.index}] attempt {a.attempt} placed on node {node_id}",
                    )
                    for node_id, a in assigned
                ],
            )
        return assigned

    # -- reports from agents (all fenced by attempt and epoch) ------------------------------

    def _current(
        self, db: sqlite3.Connection, task_id: int, attempt: int, epoch: int, node_id: str | None
    ) -> _Current | None:
        """The task if ``(attempt, epoch)`` is its current, active attempt (on ``node_id``)."""
        row = db.execute(
            "SELECT t.state, t.failures, j.spec, j.id, t.idx, t.node_id FROM tasks t"
            " JOIN jobs j ON j.seq = t.job_seq"
            " WHERE t.id=? AND t.attempt=? AND t.epoch=? AND t.node_id=COALESCE(?, t.node_id)",
            (task_id, attempt, epoch, node_id),
        ).fetchone()
        if row is None or not TaskState(row[0]).active:
            return None
        return _Current(TaskState(row[0]), row[1], row[2], row[3], row[4], row[5])

    def record_started(
        self, task_id: int, attempt: int, epoch: int, now: float, *, node_id: str | None = None
    ) -> bool:
        """Fenced: only the current attempt (on ``node_id`` when given) can start."""
        with self._tx() as db:
            current = self._current(db, task_id, attempt, epoch, node_id)
            if current is None or current.state is not TaskState.ASSIGNED:
                return False
            db.execute(
                "UPDATE tasks SET state=?, started_at=?, changed=? WHERE id=?",
                (
                    next_task_state(current.state, TaskEvent.START).value,
                    now,
                    self.stamp(),
                    task_id,
                ),
            )
            db.execute(
                "UPDATE attempts SET state=?, started_at=? WHERE task_id=? AND attempt=?",
                (AttemptState.RUNNING.value, now, task_id, attempt),
            )
            where = f"task {current.job_id}[{current.index}] attempt {attempt}"
            message = f"{where} started on node {current.node_id}"
            row = (now, "task_started", current.node_id, current.job_id, current.index, message)
            self._task_events(db, [row])
        return True

    def record_logs(self, chunks: Iterable[tuple[int, int, int, bytes]]) -> None:
        """Append ``(task_id, attempt, offset, data)`` chunks; a resent chunk is ignored."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO logs (task_id, attempt, offset, data) VALUES (?, ?, ?, ?)",
                chunks,
            )

    def record_ended(
        self,
        task_id: int,
        attempt: int,
        epoch: int,
        *,
        succeeded: bool,
        counts_against_retries: bool,
        exit_code: int | None,
        reason: str,
        outputs: dict[str, bytes],
        now: float,
        node_id: str | None = None,
        backoff_base: float = 0.0,
        backoff_cap: float = 0.0,
        killed: bool = False,
        end_kind: str = "",
        result: bytes | None = None,
    ) -> TaskState | None:
        """Commit the end of an attempt; the task's new state, or None if the report is stale.

        A stale report (its attempt was superseded) changes nothing but is kept on the attempt
        it belongs to, so `mesh status` can show that a late result arrived and was refused.
        A function call's ``result`` is kept only from the attempt that ends the task.
        """
        with self._tx() as db:
            current = self._current(db, task_id, attempt, epoch, node_id)
            if current is None:
                return self._not_current(
                    db, task_id, attempt, epoch, node_id, reason, exit_code, killed
                )
            state, failures = current.state, current.failures
            spec = json.loads(current.spec_json)
            retries = int(spec["retries"])
            if not succeeded and counts_against_retries:
                failures += 1
            event = end_event(succeeded, counts_against_retries, failures, retries)
            new_state = next_task_state(state, event)
            attempt_state = (
                AttemptState.SUCCEEDED
                if succeeded
                else AttemptState.FAILED
                if counts_against_retries
                else AttemptState.LOST
            )
            db.execute(
                "UPDATE attempts SET state=?, ended_at=?, exit_code=?, reason=?,"
                " started_at=COALESCE(started_at, assigned_at) WHERE task_id=? AND attempt=?",
                (attempt_state.value, now, exit_code, reason, task_id, attempt),
            )
            if new_state is TaskState.PENDING:
                # Back in the queue: it waits on no node until it is placed again, and a retry
                # after a failure waits out its backoff first.
                delay = retry_backoff(failures, backoff_base, backoff_cap)
                not_before = now + delay if event is TaskEvent.RETRY and delay > 0 else None
                db.execute(
                    "UPDATE tasks SET state=?, failures=?, exit_code=?, reason=?, node_id=NULL,"
                    " started_at=NULL, not_before=?, lost_first=? WHERE id=?",
                    (
                        new_state.value,
                        failures,
                        exit_code,
                        reason,
                        not_before,
                        int(event is TaskEvent.REQUEUE),
                        task_id,
                    ),
                )
            else:
                db.execute(
                    "UPDATE tasks SET state=?, failures=?, exit_code=?, reason=?, ended_at=?,"
                    " started_at=COALESCE(started_at, ?), changed=? WHERE id=?",
                    (new_state.value, failures, exit_code, reason, now, now, self.stamp(), task_id),
                )
                if spec.get("python") is not None:  # a function call: its caller reads these
                    self.record_call_end(db, task_id, end_kind, result)
            db.executemany(
                "INSERT OR REPLACE INTO outputs (task_id, name, data) VALUES (?, ?, ?)",
                ((task_id, name, data) for name, data in outputs.items()),
            )
            then = " (it will run again)" if new_state is TaskState.PENDING else ""
            where = f"task {current.job_id}[{current.index}] attempt {attempt}"
            message = f"{where} {attempt_state.value}: {reason}{then}"
            row = (now, "task_ended", current.node_id, current.job_id, current.index, message)
            self._task_events(db, [row])
        return new_state

    def _not_current(
        self,
        db: sqlite3.Connection,
        task_id: int,
        attempt: int,
        epoch: int,
        node_id: str | None,
        reason: str,
        exit_code: int | None,
        killed: bool,
    ) -> TaskState | None:
        """An end report for an attempt that is not the task's current, active one.

        Two are expected and recorded nowhere (answered with the task's state): the same report
        again (an agent resends what was not acknowledged; its attempt already ended with this
        very reason), and the news that a superseded attempt was killed (cancelled, handed back,
        or fenced by the agent itself). Anything else is a late result of a superseded
        attempt: refused (None), and kept on that attempt.
        """
        row = db.execute(
            "SELECT a.ended_at, a.reason, a.exit_code, t.state FROM attempts a"
            " JOIN tasks t ON t.id = a.task_id WHERE a.task_id=? AND a.attempt=? AND a.epoch=?"
            " AND a.node_id=COALESCE(?, a.node_id)",
            (task_id, attempt, epoch, node_id),
        ).fetchone()
        if row is None:
            return None
        ended_at, recorded_reason, recorded_exit, task_state = row
        duplicate = ended_at is not None and (recorded_reason, recorded_exit) == (reason, exit_code)
        if duplicate or killed:
            return TaskState(task_state)
        db.execute(
            "UPDATE attempts SET late_result=? WHERE task_id=? AND attempt=?",
            (f"{reason} (refused: superseded)", task_id, attempt),
        )
        return None

    def active_attempts(self, node_id: str) -> set[tuple[int, int, int]]:
        """``(task_id, attempt, epoch)`` of every attempt the node should be running."""
        return {
            (row[0], row[1], row[2])
            for row in self._db.execute(
                "SELECT id, attempt, epoch FROM tasks WHERE node_id=? AND state IN (?, ?)",
                (node_id, *ACTIVE),
            )
        }

    def requeue_node_attempts(
        self, node_id: str, keep: set[tuple[int, int, int]], reason: str, now: float
    ) -> list[int]:
        """Put back every active attempt on ``node_id`` not in ``keep``; the tasks requeued.
        Each one is a ``task_requeued`` event: it will be placed again, first in the queue."""
        requeued = []
        events: list[tuple[float, str, str | None, str, int, str]] = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT t.id, t.attempt, t.epoch, t.state, j.id, t.idx FROM tasks t"
                " JOIN jobs j ON j.seq = t.job_seq WHERE t.node_id=? AND t.state IN (?, ?)",
                (node_id, *ACTIVE),
            ).fetchall()
            for task_id, attempt, epoch, state, job_id, index in rows:
                if (task_id, attempt, epoch) in keep:
                    continue
                new_state = next_task_state(TaskState(state), TaskEvent.REQUEUE)
                db.execute(
                    "UPDATE tasks SET state=?, node_id=NULL, started_at=NULL, not_before=NULL,"
                    " lost_first=1 WHERE id=?",
                    (new_state.value, task_id),
                )
                db.execute(
                    "UPDATE attempts SET state=?, ended_at=?, reason=? WHERE task_id=?"
                    " AND attempt=?",
                    (AttemptState.LOST.value, now, reason, task_id, attempt),
                )
                requeued.append(task_id)
                message = (
                    f"task {job_id}[{index}] attempt {attempt} taken back from node {node_id}"
                    f" ({reason}): it goes back in the queue, first"
                )
                events.append((now, "task_requeued", node_id, job_id, index, message))
            self._task_events(db, events)
        return requeued


@dataclass(frozen=True)
class _Current:
    """A task's active attempt, as the fenced report handlers need it."""

    state: TaskState
    failures: int
    spec_json: str
    job_id: str
    index: int
    node_id: str | None
