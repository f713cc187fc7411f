"""What people and the API read: jobs, tasks, attempts, nodes, events, logs, and the
aggregates the dashboard shows. Read-only queries, kept apart from the transitions in sqlite.py.

A mixin of SQLiteStore: it uses the store's one connection, on the event-loop thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from planetary_mesh.core.model import (
    Attempt,
    Event,
    Job,
    JobSpec,
    Node,
    NodeAttempt,
    Task,
    Throughput,
)
from planetary_mesh.core.states import AttemptState, NodeState, TaskState, job_state
from planetary_mesh.errors import StoreError

ACTIVE = (TaskState.ASSIGNED.value, TaskState.RUNNING.value)


class StoreReads:
    _db: sqlite3.Connection

    def node_state_counts(self) -> dict[str, int]:
        return {
            str(state): int(count)
            for state, count in self._db.execute("SELECT state, COUNT(*) FROM nodes GROUP BY state")
        }

    def task_state_counts(self) -> dict[str, int]:
        return {
            str(state): int(count)
            for state, count in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        }

    def attempt_started_at(self, task_id: int, attempt: int) -> tuple[float, int] | None:
        """When an attempt started (if it did) and its job's seq."""
        row = self._db.execute(
            "SELECT a.started_at, t.job_seq FROM attempts a JOIN tasks t ON t.id = a.task_id"
            " WHERE a.task_id=? AND a.attempt=?",
            (task_id, attempt),
        ).fetchone()
        return None if row is None or row[0] is None else (float(row[0]), int(row[1]))

    def node_known(self, node_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM nodes WHERE id=?", (node_id,)).fetchone() is not None

    def events(
        self, after: int = 0, limit: int = 1000, *, job_id: str | None = None
    ) -> list[Event]:
        """Events after seq ``after``, oldest first; only ``job_id``'s when given."""
        return [
            Event(
                seq=r[0],
                time=r[1],
                kind=r[2],
                node_id=r[3],
                job_id=r[4],
                task_index=r[5],
                message=r[6],
            )
            for r in self._db.execute(
                "SELECT seq, time, kind, node_id, job_id, task_index, message FROM events"
                " WHERE seq > ? AND (? IS NULL OR job_id = ?) ORDER BY seq LIMIT ?",
                (after, job_id, job_id, limit),
            )
        ]

    def latest_events(self, count: int) -> list[Event]:
        """The last ``count`` events, oldest first."""
        (first,) = self._db.execute(
            "SELECT COALESCE(MIN(seq), 1) FROM (SELECT seq FROM events ORDER BY seq DESC LIMIT ?)",
            (count,),
        ).fetchone()
        return self.events(int(first) - 1, count)

    def _active_usage(self) -> dict[str, tuple[float, int, int, int]]:
        """CPUs, memory, task count and GPUs that active attempts hold, by node."""
        return {
            row[0]: (float(row[1]), int(row[2]), int(row[3]), int(row[4]))
            for row in self._db.execute(
                "SELECT t.node_id, SUM(j.cpus), SUM(j.memory), COUNT(*), SUM(j.gpus) FROM tasks t"
                " JOIN jobs j ON j.seq = t.job_seq WHERE t.state IN (?, ?) GROUP BY t.node_id",
                ACTIVE,
            )
        }

    def nodes(self) -> list[Node]:
        usage = self._active_usage()
        result = []
        for row in self._db.execute(
            "SELECT id, name, state, cpus, memory, sandbox, version, joined_at, last_seen,"
            " draining, drain_deadline, labels, gpus FROM nodes ORDER BY joined_at"
        ):
            used_cpus, used_memory, running, used_gpus = usage.get(row[0], (0.0, 0, 0, 0))
            result.append(
                Node(
                    id=row[0],
                    name=row[1],
                    state=NodeState(row[2]),
                    cpus=row[3],
                    memory=row[4],
                    # Prefetched tasks wait on the node beyond its size: it holds at most all.
                    used_cpus=min(used_cpus, row[3]),
                    used_memory=min(used_memory, row[4]),
                    running=running,
                    sandbox=row[5],
                    version=row[6],
                    joined_at=row[7],
                    last_seen=row[8],
                    draining=bool(row[9]),
                    drain_deadline=row[10],
                    labels=json.loads(row[11]),
                    gpus=row[12],
                    used_gpus=min(used_gpus, row[12]),
                )
            )
        return result

    def _job_counts(self, seqs: Iterable[int]) -> dict[int, dict[TaskState, int]]:
        counts: dict[int, dict[TaskState, int]] = {seq: {} for seq in seqs}
        if not counts:
            return counts
        marks = ",".join("?" * len(counts))
        for seq, state, n in self._db.execute(
            f"SELECT job_seq, state, COUNT(*) FROM tasks WHERE job_seq IN ({marks})"
            " GROUP BY job_seq, state",
            tuple(counts),
        ):
            counts[seq][TaskState(state)] = n
        return counts

    _JOB_COLUMNS = "seq, id, owner, spec, created_at, cancelled_by"

    def _jobs_from_rows(
        self, rows: list[tuple[int, str, str, str, float, str | None]]
    ) -> list[Job]:
        counts = self._job_counts(row[0] for row in rows)
        names: dict[str, list[str]] = {}
        if rows:
            marks = ",".join("?" * len(rows))
            for job_id, name in self._db.execute(
                f"SELECT job_id, name FROM job_files WHERE job_id IN ({marks}) ORDER BY name",
                tuple(row[1] for row in rows),
            ):
                names.setdefault(job_id, []).append(name)
        jobs = []
        for seq, job_id, owner, spec_json, created_at, cancelled_by in rows:
            spec = spec_from_json(spec_json)
            jobs.append(
                Job(
                    id=job_id,
                    owner=owner,
                    spec=spec,
                    state=job_state(counts[seq], cancelled_by is not None),
                    created_at=created_at,
                    file_names=tuple(names.get(job_id, ())),
                    counts=counts[seq],
                    cancelled_by=cancelled_by,
                )
            )
        return jobs

    def has_job(self, job_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is not None

    def job(self, job_id: str) -> Job | None:
        rows = self._db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)
        ).fetchall()
        jobs = self._jobs_from_rows(rows)
        return jobs[0] if jobs else None

    def jobs(self, limit: int = 200) -> list[Job]:
        rows = self._db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)
        ).fetchall()
        return self._jobs_from_rows(rows)

    def job_spec(self, job_id: str) -> JobSpec:
        row = self._db.execute("SELECT spec FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"job {job_id} is not in the store")
        return spec_from_json(row[0])

    def job_files(self, job_id: str) -> dict[str, bytes]:
        return dict(self._db.execute("SELECT name, data FROM job_files WHERE job_id=?", (job_id,)))

    _TASK_COLUMNS = (
        "t.id, j.id, t.idx, t.state, t.attempt, t.epoch, t.node_id, t.exit_code, t.reason,"
        " t.started_at, t.ended_at"
    )

    def tasks(self, job_id: str) -> list[Task]:
        rows = self._db.execute(
            f"SELECT {self._TASK_COLUMNS} FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id=? ORDER BY t.idx",
            (job_id,),
        )
        return [_task_from_row(row) for row in rows]

    def task(self, job_id: str, index: int) -> Task | None:
        row = self._db.execute(
            f"SELECT {self._TASK_COLUMNS} FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id=? AND t.idx=?",
            (job_id, index),
        ).fetchone()
        return _task_from_row(row) if row else None

    def attempts_of_job(self, job_id: str) -> dict[int, list[Attempt]]:
        """Every attempt of every task of a job, by task index."""
        result: dict[int, list[Attempt]] = {}
        for row in self._db.execute(
            "SELECT t.idx, a.attempt, a.node_id, a.epoch, a.state, a.assigned_at, a.started_at,"
            " a.ended_at, a.exit_code, a.reason, a.late_result FROM attempts a"
            " JOIN tasks t ON t.id = a.task_id JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id=? ORDER BY t.idx, a.attempt",
            (job_id,),
        ):
            result.setdefault(row[0], []).append(_attempt_from_row(row[1:]))
        return result

    def attempts(self, task_id: int) -> list[Attempt]:
        return [
            _attempt_from_row(row)
            for row in self._db.execute(
                "SELECT attempt, node_id, epoch, state, assigned_at, started_at, ended_at,"
                " exit_code, reason, late_result FROM attempts WHERE task_id=? ORDER BY attempt",
                (task_id,),
            )
        ]

    def logs(self, task_id: int, attempt: int, offset: int) -> tuple[bytes, int]:
        """The output of one attempt from byte ``offset`` on, and the offset after it."""
        data = bytearray()
        end = offset
        for chunk_offset, chunk in self._db.execute(
            "SELECT offset, data FROM logs WHERE task_id=? AND attempt=?"
            " AND offset + length(data) > ? ORDER BY offset",
            (task_id, attempt, offset),
        ):
            if chunk_offset > end:
                break  # a gap: the missing chunk has not arrived yet
            data += chunk[end - chunk_offset :]
            end = max(end, chunk_offset + len(chunk))
        return bytes(data), end

    def log_size(self, task_id: int, attempt: int) -> int:
        """How many bytes of an attempt's output the store holds (its end offset)."""
        (size,) = self._db.execute(
            "SELECT COALESCE(MAX(offset + length(data)), 0) FROM logs"
            " WHERE task_id=? AND attempt=?",
            (task_id, attempt),
        ).fetchone()
        return int(size)

    def log_tail(self, task_id: int, attempt: int, size: int = 4096) -> bytes:
        """About the last ``size`` bytes of an attempt's output (whole stored chunks)."""
        chunks = self._db.execute(
            "SELECT data FROM logs WHERE task_id=? AND attempt=? ORDER BY offset DESC LIMIT 8",
            (task_id, attempt),
        ).fetchall()
        return b"".join(reversed([bytes(c[0]) for c in chunks]))[-size:]

    def queue_place(self, task_id: int) -> tuple[int, float | None]:
        """How many pending tasks the scheduler takes before this pending one (higher
        priority, or as high and older), and when its retry backoff ends (None: no wait)."""
        row = self._db.execute(
            "SELECT j.priority, t.job_seq, t.idx, t.not_before FROM tasks t"
            " JOIN jobs j ON j.seq = t.job_seq WHERE t.id=?",
            (task_id,),
        ).fetchone()
        if row is None:
            return 0, None
        priority, job_seq, index, not_before = row
        (ahead,) = self._db.execute(
            "SELECT COUNT(*) FROM tasks t JOIN jobs j ON j.seq = t.job_seq WHERE t.state=?"
            " AND (j.priority > ? OR (j.priority = ? AND (t.job_seq < ?"
            " OR (t.job_seq = ? AND t.idx < ?))))",
            (TaskState.PENDING.value, priority, priority, job_seq, job_seq, index),
        ).fetchone()
        return int(ahead), None if not_before is None else float(not_before)

    def outputs(self, task_id: int) -> dict[str, bytes]:
        return dict(
            self._db.execute(
                "SELECT name, data FROM outputs WHERE task_id=? ORDER BY name", (task_id,)
            )
        )

    # -- pages and aggregates for people ----------------------------------------------------

    def job_page(self, offset: int, limit: int) -> tuple[list[Job], int]:
        """Jobs newest first, ``limit`` of them from ``offset``, and how many there are."""
        rows = self._db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        (total,) = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()
        return self._jobs_from_rows(rows), int(total)

    def task_page(
        self, job_id: str, offset: int, limit: int, state: TaskState | None = None
    ) -> tuple[list[Task], int]:
        """A job's tasks by index, only those in ``state`` when given, and how many match."""
        wanted = None if state is None else state.value
        rows = self._db.execute(
            f"SELECT {self._TASK_COLUMNS} FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id=? AND (? IS NULL OR t.state=?) ORDER BY t.idx LIMIT ? OFFSET ?",
            (job_id, wanted, wanted, limit, offset),
        )
        tasks = [_task_from_row(row) for row in rows]
        (total,) = self._db.execute(
            "SELECT COUNT(*) FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id=? AND (? IS NULL OR t.state=?)",
            (job_id, wanted, wanted),
        ).fetchone()
        return tasks, int(total)

    def node(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes() if n.id == node_id), None)

    def node_attempts(self, node_id: str, limit: int) -> list[NodeAttempt]:
        """The attempts a node was given, newest first: what it ran and how each ended."""
        rows = self._db.execute(
            "SELECT j.id, t.idx, a.attempt, a.node_id, a.epoch, a.state, a.assigned_at,"
            " a.started_at, a.ended_at, a.exit_code, a.reason, a.late_result FROM attempts a"
            " JOIN tasks t ON t.id = a.task_id JOIN jobs j ON j.seq = t.job_seq"
            " WHERE a.node_id=? ORDER BY a.assigned_at DESC LIMIT ?",
            (node_id, limit),
        )
        return [NodeAttempt(row[0], row[1], _attempt_from_row(row[2:])) for row in rows]

    def throughput(self, since: float, until: float, bucket: float) -> Throughput:
        """Tasks that ended in each ``bucket``-second slot from ``since`` to ``until``, by how
        (succeeded, failed, other), from the tasks' own end times."""
        slots = max(1, int((until - since) // bucket))
        by_state: dict[str, list[int]] = {"succeeded": [0] * slots, "failed": [0] * slots}
        other = [0] * slots
        for slot, state, count in self._db.execute(
            "SELECT CAST((ended_at - ?) / ? AS INTEGER) AS slot, state, COUNT(*) FROM tasks"
            " WHERE ended_at >= ? AND ended_at < ? GROUP BY slot, state",
            (since, bucket, since, since + slots * bucket),
        ):
            if 0 <= slot < slots:
                by_state.get(state, other)[slot] += count
        return Throughput(since, bucket, by_state["succeeded"], by_state["failed"], other)


def spec_from_json(text: str) -> JobSpec:
    raw = json.loads(text)
    raw["argv"] = tuple(raw["argv"])
    raw["outputs"] = tuple(raw["outputs"])
    return JobSpec(**raw)


def _task_from_row(row: tuple[Any, ...]) -> Task:
    task_id, job_id, index, state, attempt, epoch, node_id, exit_code, reason, started, ended = row
    return Task(
        id=task_id,
        job_id=job_id,
        index=index,
        state=TaskState(state),
        attempt=attempt,
        epoch=epoch,
        node_id=node_id,
        exit_code=exit_code,
        reason=reason,
        started_at=started,
        ended_at=ended,
    )


def _attempt_from_row(row: tuple[Any, ...]) -> Attempt:
    number, node_id, epoch, state, assigned, started, ended, exit_code, reason, late = row
    return Attempt(
        number=number,
        node_id=node_id,
        epoch=epoch,
        state=AttemptState(state),
        assigned_at=assigned,
        started_at=started,
        ended_at=ended,
        exit_code=exit_code,
        reason=reason,
        late_result=late,
    )
