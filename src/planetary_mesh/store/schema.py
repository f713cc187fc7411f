"""The SQLite schema and its migrations, applied in order at open.

Each migration is a list of statements; ``meta.schema_version`` records how many have run.
Append new migrations; never edit one that has shipped.
"""

from __future__ import annotations

MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            state TEXT NOT NULL,
            cpus REAL NOT NULL,
            memory INTEGER NOT NULL,
            sandbox TEXT NOT NULL DEFAULT '',
            version TEXT NOT NULL DEFAULT '',
            cert_serial TEXT NOT NULL,
            joined_at REAL NOT NULL,
            last_seen REAL NOT NULL
        )""",
        """CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            uses_left INTEGER,
            revoked INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            owner TEXT NOT NULL,
            priority INTEGER NOT NULL,
            cpus REAL NOT NULL,
            memory INTEGER NOT NULL,
            count INTEGER NOT NULL,
            spec TEXT NOT NULL,
            created_at REAL NOT NULL,
            cancelled_by TEXT
        )""",
        """CREATE TABLE job_files (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            name TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (job_id, name)
        )""",
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            job_seq INTEGER NOT NULL REFERENCES jobs(seq),
            idx INTEGER NOT NULL,
            state TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            epoch INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            node_id TEXT,
            exit_code INTEGER,
            reason TEXT,
            started_at REAL,
            ended_at REAL,
            UNIQUE (job_seq, idx)
        )""",
        "CREATE INDEX tasks_by_state ON tasks (state, job_seq, idx)",
        "CREATE INDEX tasks_by_node ON tasks (node_id, state)",
        """CREATE TABLE attempts (
            task_id INTEGER NOT NULL REFERENCES tasks(id),
            attempt INTEGER NOT NULL,
            node_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            state TEXT NOT NULL,
            assigned_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            exit_code INTEGER,
            reason TEXT,
            PRIMARY KEY (task_id, attempt)
        )""",
        """CREATE TABLE logs (
            task_id INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            offset INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (task_id, attempt, offset)
        )""",
        """CREATE TABLE outputs (
            task_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (task_id, name)
        )""",
        "INSERT INTO meta (key, value) VALUES ('epoch', '0')",
    ],
    [
        # Retries wait (exponential backoff); work taken from a lost node goes first.
        "ALTER TABLE tasks ADD COLUMN not_before REAL",
        "ALTER TABLE tasks ADD COLUMN lost_first INTEGER NOT NULL DEFAULT 0",
        # Drain: no new work; past the deadline the node's tasks are handed back.
        "ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE nodes ADD COLUMN drain_deadline REAL",
        # A result that arrived for a superseded attempt: refused, and kept as a record.
        "ALTER TABLE attempts ADD COLUMN late_result TEXT",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            node_id TEXT,
            job_id TEXT,
            task_index INTEGER,
            message TEXT NOT NULL
        )""",
    ],
    [
        # Certificates refused before they expire: a removed node's (later a removed user's).
        # Kept until the certificate would have expired; the TLS layer refuses it after that.
        """CREATE TABLE denied_certs (
            serial TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            reason TEXT NOT NULL,
            denied_at REAL NOT NULL,
            until REAL NOT NULL
        )""",
    ],
    [
        # The people with client certificates: who may submit, who is an admin.
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            admin INTEGER NOT NULL,
            cert_serial TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            created_by TEXT NOT NULL
        )""",
    ],
    [
        # `mesh events --job`: one job's events without a scan of everyone's.
        "CREATE INDEX events_by_job ON events (job_id, seq)",
    ],
    [
        # Node details for people: the owner's labels and the GPUs the agent found.
        "ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE nodes ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0",
        # The dashboard's throughput chart (tasks ended lately) and a node's recent attempts.
        "CREATE INDEX tasks_by_end ON tasks (ended_at)",
        "CREATE INDEX attempts_by_node ON attempts (node_id, assigned_at)",
    ],
    [
        # Browser sessions survive a coordinator restart; the cookie is kept only as a hash.
        """CREATE TABLE browser_sessions (
            digest TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            admin INTEGER NOT NULL,
            cert_serial TEXT NOT NULL,
            cert_not_after REAL NOT NULL,
            csrf TEXT NOT NULL,
            expires_at REAL NOT NULL
        )""",
    ],
    [
        # A page of jobs counts each job's tasks by state from the index alone (6x quicker
        # with jobs of 10,000 tasks than reading every task row).
        "CREATE INDEX tasks_by_job_state ON tasks (job_seq, state)",
    ],
    [
        # The queue in placement order straight from an index, no sort of every pending task
        # per scheduling round: a task carries its job's priority (fixed at submit).
        "ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "UPDATE tasks SET priority = (SELECT j.priority FROM jobs j WHERE j.seq = tasks.job_seq)",
        "CREATE INDEX tasks_queue ON tasks (state, priority DESC, lost_first DESC, job_seq, idx)",
        # The earliest retry backoff to wake the scheduler for, without a scan.
        "CREATE INDEX tasks_retry ON tasks (state, not_before)",
    ],
    [
        # Python function calls: each task of a function job carries one pickled call, and
        # keeps its pickled result (or error record) and how it ended, for the caller.
        """CREATE TABLE calls (
            task_id INTEGER PRIMARY KEY REFERENCES tasks(id),
            payload BLOB NOT NULL,
            result BLOB,
            end_kind TEXT
        )""",
        # A per-store sequence stamped on a task when it starts or ends: a caller follows its
        # job's calls from a cursor, without reading every task each time.
        "ALTER TABLE tasks ADD COLUMN changed INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX tasks_changed ON tasks (job_seq, changed)",
    ],
    [
        # GPUs are placed like CPUs and memory: whole devices a task of the job asks for.
        "ALTER TABLE jobs ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0",
    ],
]
