"""Python function calls in the store: each task of a function job holds one pickled call, and
once it ends its pickled result (or error record) and how it ended.

A caller follows its job through the ``changed`` stamp: a store-wide sequence number written on
a task whenever it starts or ends (see ``stamp``), read from the tasks_changed index. A mixin of
SQLiteStore, on its one connection.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from planetary_mesh.core.states import TaskState
from planetary_mesh.errors import StoreError


@dataclass(frozen=True)
class CallRecord:
    """A call as its caller follows it."""

    index: int
    state: TaskState
    changed: int
    exit_code: int | None
    reason: str | None
    end_kind: str | None  # the agent's word for how it ended: exited, oom, timeout, ...
    result: bytes | None


class CallRecords:
    _db: sqlite3.Connection
    _changed: int  # the last stamp handed out

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # SQLiteStore's

    def _load_stamp(self) -> None:
        (last,) = self._db.execute("SELECT COALESCE(MAX(changed), 0) FROM tasks").fetchone()
        self._changed = int(last)

    def stamp(self, count: int = 1) -> int:
        """The first of ``count`` new, increasing change stamps. In memory: the store has one
        writer, and the largest stamp is read back from the tasks at open."""
        first = self._changed + 1
        self._changed += count
        return first

    def insert_calls(
        self, db: sqlite3.Connection, job_seq: int, first_index: int, payloads: Sequence[bytes]
    ) -> None:
        """The calls of tasks ``first_index``... of a job, inside the caller's transaction."""
        db.executemany(
            "INSERT INTO calls (task_id, payload)"
            " SELECT id, ? FROM tasks WHERE job_seq=? AND idx=?",
            ((payload, job_seq, first_index + i) for i, payload in enumerate(payloads)),
        )

    def append_calls(self, job_id: str, payloads: Sequence[bytes], priority: int) -> int:
        """Add tasks to a function job, one per call; the index of the first one."""
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET count = count + ?, spec = json_set(spec, '$.count', count + ?)"
                " WHERE id=? RETURNING seq, count",
                (len(payloads), len(payloads), job_id),
            ).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} is not in the store")
            seq, count = row
            first = count - len(payloads)
            db.executemany(
                "INSERT INTO tasks (job_seq, idx, state, priority) VALUES (?, ?, ?, ?)",
                ((seq, first + i, TaskState.PENDING.value, priority) for i in range(len(payloads))),
            )
            self.insert_calls(db, seq, first, payloads)
        return int(first)

    def job_seq(self, job_id: str) -> int | None:
        row = self._db.execute("SELECT seq FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else int(row[0])

    def call_payloads(self, task_ids: Sequence[int]) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        for start in range(0, len(task_ids), 500):
            chunk = task_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(
                    f"SELECT task_id, payload FROM calls WHERE task_id IN ({marks})", chunk
                )
            )
        return found

    def record_call_end(
        self, db: sqlite3.Connection, task_id: int, end_kind: str, result: bytes | None
    ) -> None:
        """How a call ended for good, and its result; nothing for a command task."""
        db.execute(
            "UPDATE calls SET end_kind=?, result=? WHERE task_id=?", (end_kind, result, task_id)
        )

    def call_updates(
        self, job_seq: int, after: int, limit: int, max_bytes: int
    ) -> list[CallRecord]:
        """The job's tasks that started or ended after stamp ``after``, oldest change first:
        at most ``limit``, and no more results than ``max_bytes`` (one at least)."""
        records: list[CallRecord] = []
        size = 0
        for row in self._db.execute(
            "SELECT t.idx, t.state, t.changed, t.exit_code, t.reason, c.end_kind, c.result"
            " FROM tasks t LEFT JOIN calls c ON c.task_id = t.id"
            " WHERE t.job_seq=? AND t.changed > ? ORDER BY t.changed LIMIT ?",
            (job_seq, after, limit),
        ):
            result = row[6]
            size += len(result) if result else 0
            if records and size > max_bytes:
                break
            records.append(CallRecord(row[0], TaskState(row[1]), *row[2:]))
        return records
