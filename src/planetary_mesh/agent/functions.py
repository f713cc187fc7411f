"""Warm Python workers: the agent runs a job's function calls in long-lived worker processes.

A fresh interpreter per call would cost tens of milliseconds; so each job (an executor) gets,
on each agent, worker processes that stay up between its calls, as Dask's and Ray's do. A
worker is started like a task of its job (runner.start: its job's sandbox, its own cgroup with
the job's memory limit, as the task user) running ``py_worker.py``; the agent talks to it over
a Unix socket it made in the worker's work directory before the start (see py_worker.py).

One call at a time per worker; the agent's admission already bounds how many calls of a job
run at once, and a job gets a new worker when all of its workers are busy. A worker is
replaced after anything goes wrong with it (a crash, a kill for memory, time or a cancel) and
when its memory passes a high-water mark; one idle for ``IDLE_S`` is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planetary_mesh.agent.gpus import gpu_device_files, gpu_environment
from planetary_mesh.agent.python_env import VERSION, PythonEnv
from planetary_mesh.errors import SandboxError
from planetary_mesh.protocol import MAX_RESULT_BYTES
from planetary_mesh.sandbox.limits import Limits
from planetary_mesh.sandbox.runner import (
    EndReason,
    OutputSink,
    Runner,
    RunningTask,
    TaskLaunch,
    TaskOutcome,
)

log = logging.getLogger(__name__)

IDLE_S = 5.0  # a worker with no call for this long is stopped
START_TIMEOUT_S = 60.0  # from spawn to the worker's hello (a cold disk, a slow import)
HIGH_WATER = 0.8  # of the job's memory limit: past it after a call, the worker is replaced
SOCKET_NAME = "agent.sock"
# A result, and what a call printed (the worker caps it at 16 MiB), each; more is nonsense.
BLOB_LIMIT = MAX_RESULT_BYTES + 32 * 1024 * 1024
_HEADER = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024  # a worker's JSON header; its blobs are bounded on their own


@dataclass(frozen=True)
class CallJob:
    """What the agent knows of a function job: the same for all of its calls."""

    job_id: str
    python: str  # the major.minor the calls were pickled by
    cpus: float
    memory: int
    timeout: float | None
    network: bool
    env: dict[str, str]


class OutputSwitch:
    """Where a worker's raw output goes: the log of the call it runs now, nowhere between
    calls (what a call prints through Python comes back with its answer instead)."""

    def __init__(self) -> None:
        self.target: OutputSink | None = None

    def __call__(self, data: bytes) -> None:
        if self.target is not None:
            self.target(data)


class Worker:
    """One worker process and the socket to it; ``devices``: the GPUs it was started with (its
    calls are those that hold exactly these)."""

    def __init__(
        self,
        job: CallJob,
        devices: tuple[int, ...],
        workdir: Path,
        running: RunningTask,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        output: OutputSwitch,
    ) -> None:
        self.job = job
        self.devices = devices
        self.workdir = workdir
        self.running = running
        self.reader = reader
        self.writer = writer
        self.busy = False
        self.retired = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self._output = output
        self.ended: asyncio.Task[TaskOutcome] = asyncio.ensure_future(running.wait())

    def attach(self, sink: OutputSink | None) -> None:
        self._output.target = sink

    def stop(self, why: str) -> None:
        self.retired = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.running.cancel(why)
        self.writer.close()


class FunctionCall:
    """A call sent to a worker: a :class:`RunningTask` for the agent, with a result."""

    def __init__(self, pool: FunctionWorkers, worker: Worker, on_output: OutputSink) -> None:
        self.pid = 0  # the worker's process is not the call's own
        self.result: bytes | None = None
        self._pool = pool
        self._worker = worker
        self._on_output = on_output
        self._cancelled: str | None = None
        self._timed_out = False
        self._outcome: TaskOutcome | None = None

    def cancel(self, why: str) -> None:
        """Kill the call: its worker goes with it (a call cannot be stopped any other way)."""
        if self._outcome is None and self._cancelled is None:
            self._cancelled = why
            self._worker.stop(why)

    async def wait(self) -> TaskOutcome:
        if self._outcome is None:
            self._outcome = await self._wait()
        return self._outcome

    async def _wait(self) -> TaskOutcome:
        worker = self._worker
        timeout = worker.job.timeout
        reply = asyncio.ensure_future(_read_frame(worker.reader))
        try:
            done, _ = await asyncio.wait(
                {reply, worker.ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:  # past the call's timeout: the worker is killed to stop it
                self._timed_out = True
                worker.stop("timed out")
                await asyncio.wait({reply, worker.ended}, return_when=asyncio.FIRST_COMPLETED)
            if reply.done() and not reply.cancelled() and reply.exception() is None:
                message = reply.result()
                if message is not None and self._cancelled is None and not self._timed_out:
                    return self._answered(*message)
            died = await worker.ended
            return self._died(died)
        finally:
            reply.cancel()
            self._pool.call_ended(worker)

    def _answered(self, header: dict[str, Any], blobs: list[bytes]) -> TaskOutcome:
        data, printed = [*blobs, b"", b""][:2]
        if printed:
            self._on_output(printed)
        self.result = data
        if header.get("retire"):
            self._worker.retired = True  # it exits by itself; the pool starts another
        if header.get("ok") is True:
            return TaskOutcome(EndReason.EXITED, 0, None, "returned")
        return TaskOutcome(EndReason.EXITED, 1, None, _raised(header))

    def _died(self, outcome: TaskOutcome) -> TaskOutcome:
        if self._timed_out:
            assert self._worker.job.timeout is not None
            return TaskOutcome.timed_out(self._worker.job.timeout)
        if self._cancelled is not None or outcome.reason in (EndReason.OOM, EndReason.TIMEOUT):
            return outcome
        if outcome.reason is EndReason.SANDBOX_ERROR:
            return outcome
        return TaskOutcome(
            outcome.reason,
            outcome.exit_code,
            outcome.signal,
            f"the Python worker running it died ({outcome.message})",
        )


class FunctionWorkers:
    """This agent's Python workers, by job."""

    def __init__(self, runner: Runner, env: PythonEnv, work_root: Path, task_disk: int) -> None:
        self.runner = runner
        self.env = env
        self.work_root = work_root
        self.task_disk = task_disk
        self.idle: dict[tuple[str, tuple[int, ...]], list[Worker]] = {}
        self._workers: set[Worker] = set()
        self._ids = itertools.count(1)

    async def start(
        self,
        job: CallJob,
        payload: bytes,
        on_output: OutputSink,
        devices: tuple[int, ...] = (),
    ) -> FunctionCall:
        """Send one call to a worker of its job that has the GPUs ``devices`` the call holds
        (started if none is free). Raises SandboxError when no worker can run it, saying why."""
        if job.python != VERSION:
            raise SandboxError(
                f"refused: the function was pickled by Python {job.python}, and this agent runs"
                f" Python {VERSION}; pickled code only loads in the same major.minor. Submit from"
                f" Python {VERSION}, or add agents that run Python {job.python}"
            )
        if self.env.python is None:
            raise SandboxError(f"refused: {self.env.problem}")
        worker = self._idle_worker((job.job_id, devices)) or await self._start_worker(job, devices)
        worker.busy = True
        worker.attach(on_output)
        call = FunctionCall(self, worker, on_output)
        try:
            header = json.dumps({"call": next(self._ids), "sizes": [len(payload)]}).encode()
            worker.writer.write(_HEADER.pack(len(header)) + header + payload)
            await worker.writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the worker is gone: the call's wait() says how it died
        return call

    def _idle_worker(self, key: tuple[str, tuple[int, ...]]) -> Worker | None:
        workers = self.idle.get(key, [])
        while workers:
            worker = workers.pop()
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
                worker.idle_timer = None
            if not worker.retired and not worker.ended.done():
                return worker
        return None

    async def _start_worker(self, job: CallJob, devices: tuple[int, ...]) -> Worker:
        assert self.env.python is not None
        name = f"worker-{next(self._ids)}"
        workdir = self.work_root / job.job_id / name
        workdir.parent.mkdir(mode=0o711, exist_ok=True)
        workdir.mkdir(mode=0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(workdir / SOCKET_NAME))
            listener.listen(1)
            listener.setblocking(False)
            output = OutputSwitch()
            launch = TaskLaunch(
                argv=(
                    self.env.python,
                    "-I",
                    self.env.script,
                    str(int(job.memory * HIGH_WATER)),
                    str(MAX_RESULT_BYTES),
                    *self.env.site_dirs,
                ),
                env={**job.env, **gpu_environment(devices), "MESH_JOB_ID": job.job_id},
                workdir=workdir,
                timeout=None,
                network=job.network,
                limits=Limits(memory=job.memory, cpus=job.cpus, disk=self.task_disk),
                # Workers of one job share its warm sandbox, where there is one.
                share=job.job_id,
                share_size=2,
                ro_binds=self.env.ro_binds,
                devices=gpu_device_files(devices),
            )
            try:
                running = await self.runner.start(launch, output)
                connection = await self._accept(listener, running, workdir)
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)  # it never ran, or is gone already
                raise
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                (workdir / SOCKET_NAME).unlink()
        reader, writer = await asyncio.open_unix_connection(sock=connection)
        worker = Worker(job, devices, workdir, running, reader, writer, output)
        hello = await _read_frame(reader)
        if hello is None or "ready" not in hello[0]:
            worker.stop("it did not say hello")
            raise SandboxError("the Python worker did not start properly")
        self._workers.add(worker)
        worker.ended.add_done_callback(lambda _: self._forget(worker))
        return worker

    async def _accept(
        self, listener: socket.socket, running: RunningTask, workdir: Path
    ) -> socket.socket:
        """The worker's connection, or SandboxError with its last words if it died first."""
        loop = asyncio.get_running_loop()
        accepted = asyncio.ensure_future(loop.sock_accept(listener))
        ended = asyncio.ensure_future(running.wait())
        done, _ = await asyncio.wait(
            {accepted, ended}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if accepted in done:
            ended.cancel()
            connection, _ = accepted.result()
            return connection
        accepted.cancel()
        if ended in done:
            outcome = ended.result()
            raise SandboxError(f"the Python worker did not start ({outcome.message})")
        running.cancel("it did not start in time")
        with contextlib.suppress(Exception):
            await ended
        raise SandboxError(f"the Python worker did not start in {START_TIMEOUT_S:g}s")

    def call_ended(self, worker: Worker) -> None:
        worker.busy = False
        worker.attach(None)
        if worker.retired or worker.ended.done():
            if not worker.ended.done():
                worker.writer.close()  # retiring: it exits by itself on its own say
            return
        self.idle.setdefault((worker.job.job_id, worker.devices), []).append(worker)
        loop = asyncio.get_running_loop()
        worker.idle_timer = loop.call_later(IDLE_S, self._stop_idle, worker)

    def _stop_idle(self, worker: Worker) -> None:
        worker.idle_timer = None
        if not worker.busy:
            worker.stop("idle")

    def _forget(self, worker: Worker) -> None:
        self._workers.discard(worker)
        key = (worker.job.job_id, worker.devices)
        idle = self.idle.get(key)
        if idle is not None and worker in idle:
            idle.remove(worker)
            if not idle:
                del self.idle[key]
        if worker.idle_timer is not None:
            worker.idle_timer.cancel()
        worker.writer.close()
        # Its process tree is gone (the runner's wait says so): nothing writes there any more.
        shutil.rmtree(worker.workdir, ignore_errors=True)

    async def close(self) -> None:
        """Stop every worker and wait until they are gone."""
        workers = list(self._workers)
        for worker in workers:
            worker.stop("the agent is stopping")
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.ended
        self.env.close()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[bytes]] | None:
    """One message from a worker (its header and blobs), or None at its end or if it speaks
    nonsense. The worker is untrusted: JSON and sizes only, never a pickle."""
    try:
        size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
        if size > MAX_HEADER_BYTES:
            return None
        header = json.loads(await reader.readexactly(size))
        sizes = header.get("sizes", []) if isinstance(header, dict) else None
        if not isinstance(sizes, list) or len(sizes) > 2:
            return None
        blobs = []
        for blob_size in sizes:
            if not isinstance(blob_size, int) or not 0 <= blob_size <= BLOB_LIMIT:
                return None
            blobs.append(await reader.readexactly(blob_size))
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return None
    return header, blobs


def _raised(header: dict[str, Any]) -> str:
    """The one-line reason for a call that raised: its exception's type and message."""
    if "too_large" in header:
        return (
            f"its result is {header['too_large']} bytes pickled, over the {header['limit']}-byte"
            " limit: return less (write big data to a file or a store the caller can read)"
        )
    message = str(header.get("message", ""))[:500]
    return f"raised {header.get('type', 'an exception')}: {message}"
