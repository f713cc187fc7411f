"""`mesh events -f` on a real local mesh: job, task and node events stream as they happen, each
a JSON line, with the reason a task ended; past events come back after a coordinator restart."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_job

from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e


class Stream:
    """The JSON lines of a running `mesh events -f`, read on a thread."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "planetary_mesh", "events", "-f", "-o", "json",
             "--config", str(config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def wait_for(self, kind: str, job_id: str | None = None, timeout: float = 20) -> dict[str, Any]:
        for event in self.seen:
            if event["kind"] == kind and job_id in (None, event["job_id"]):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(event)
            if event["kind"] == kind and job_id in (None, event["job_id"]):
                return event
        kinds = [e["kind"] for e in self.seen]
        raise AssertionError(f"no {kind} event for {job_id} within {timeout}s; saw {kinds}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_events_stream_as_they_happen_and_survive_a_restart(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, agents=2, agent_cpus=1) as mesh, mesh.client() as client:
        stream = Stream(mesh.client_config)
        try:
            ok = client.submit(JobSubmit(name="fine", argv=["true"], count=2))
            bad = client.submit(JobSubmit(name="broken", argv=["sh", "-c", "exit 3"]))
            assert stream.wait_for("job_submitted", ok.id)["message"].endswith("by admin")
            stream.wait_for("task_placed", ok.id)
            stream.wait_for("task_started", ok.id)
            ended = stream.wait_for("task_ended", bad.id)
            assert "failed: exit code 3" in ended["message"], ended
            assert wait_job(client, ok.id).state == "succeeded"
            long = client.submit(JobSubmit(name="long", argv=["sleep", "60"]))
            stream.wait_for("task_started", long.id)
            client.cancel(long.id)
            assert "cancelled by admin" in stream.wait_for("job_cancelled", long.id)["message"]
            node = client.nodes()[0]
            client.drain(node.id, None)
            assert stream.wait_for("node_drain")["node_id"] == node.id
        finally:
            stream.stop()
        mesh.kill_coordinator()
        mesh.start_coordinator()
        done = subprocess.run(
            [sys.executable, "-m", "planetary_mesh", "events", "--job", bad.id,
             "-o", "json", "--config", str(mesh.client_config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        kinds = [json.loads(line)["kind"] for line in done.stdout.splitlines()]
        assert kinds[0] == "job_submitted" and "task_ended" in kinds
        assert all(json.loads(line)["job_id"] == bad.id for line in done.stdout.splitlines())
