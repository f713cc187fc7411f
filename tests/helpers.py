"""Helpers shared by the integration and end-to-end tests: waiting with deadlines, reading
task output, finding a test's own processes by a marker in their command line."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable

import psutil

from planetary_mesh.client import Client
from planetary_mesh.protocol import JobInfo

ENDED = {"succeeded", "failed", "cancelled"}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def wait_job(client: Client, job_id: str, timeout: float = 60) -> JobInfo:
    """Wait for the job to end; the ended job with every task and attempt."""
    wait_for(
        lambda: client.job(job_id, tasks=False).state in ENDED, timeout, f"job {job_id} to end"
    )
    return client.job(job_id)


def wait_succeeded(client: Client, job_id: str, count: int, timeout: float) -> None:
    """Wait until at least ``count`` of the job's tasks have succeeded."""
    wait_for(
        lambda: client.job(job_id, tasks=False).tasks["succeeded"] >= count,
        timeout,
        f"{count} tasks of job {job_id} to succeed",
    )


def output_of(client: Client, job_id: str, index: int) -> str:
    data = b""
    offset = 0
    while True:
        chunk = client.logs(job_id, index, offset)
        data += base64.b64decode(chunk.data)
        if chunk.next_offset == offset:
            return data.decode()
        offset = chunk.next_offset


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def kill_leftovers(marker: str) -> None:
    """Safety net for a failing test: end what the test itself started, by pid."""
    for proc in processes_with(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
