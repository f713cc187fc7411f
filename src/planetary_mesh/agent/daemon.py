"""The agent: one session to the coordinator, tasks in sandboxes, reports that are never lost.

Read top to bottom: ``run`` reconnects forever; ``_session`` says hello (what it still holds),
resends every unacknowledged report, then handles assignments, cancels and acks while a sender
batches output, starts and ends into reports. A report is forgotten only once the coordinator has
acknowledged it, i.e. committed it; so a coordinator crash loses no result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from planetary_mesh import __version__
from planetary_mesh.agent import probe, python_env
from planetary_mesh.agent.admission import Admission
from planetary_mesh.agent.functions import CallJob, FunctionCall, FunctionWorkers
from planetary_mesh.agent.gpus import gpu_device_files, gpu_environment
from planetary_mesh.agent.join import tls_name
from planetary_mesh.config import AgentPaths, read_toml, write_toml
from planetary_mesh.discovery import find_coordinator
from planetary_mesh.errors import MeshError, TrustError
from planetary_mesh.pki import certs, tls
from planetary_mesh.protocol import MAX_LOG_BYTES, MAX_OUTPUT_BYTES, MAX_REQUEST_BYTES
from planetary_mesh.sandbox.limits import Limits
from planetary_mesh.sandbox.runner import EndReason, Runner, RunningTask, TaskLaunch, TaskOutcome
from planetary_mesh.sandbox.scratch import make_scratch
from planetary_mesh.units import format_size

log = logging.getLogger(__name__)

TaskRef = tuple[int, int, int]  # (task_id, attempt, epoch)
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0


def reconnect_wait(backoff: float, lease_left: float | None) -> float:
    """How long to wait before the next try at a session.

    `backoff` doubles with each failure; `lease_left` is how long this node's running tasks
    may still go on without word from the coordinator (None: none are running). A coordinator
    that restarts takes a second or more on a busy machine, and plain backoff can then sleep
    past the lease and kill tasks the coordinator would have adopted: so while tasks hang on
    the lease, the next try comes within half of what is left of it.
    """
    if lease_left is None or lease_left <= 0:
        return backoff
    return min(backoff, max(RECONNECT_MIN, lease_left / 2))


RENEW_RETRY_MAX = 30.0  # seconds between tries to renew the node certificate
DEFAULT_TASK_DISK = 4 * 1024**3  # what one task's work directory may take on the host's disk
DEFAULT_TASK_LOG = 64 * 1024**2  # output of one attempt kept and sent; the rest is dropped
STARTED_LINGER_S = 0.01  # how long a "started" may wait for company in a report
# How long an "ended" may wait for company while more tasks wait on this node (prefetched):
# their ends then share a report and the coordinator's commit. A node with nothing waiting
# sends an end at once, so a lone task's caller hears of it without delay.
BUSY_ENDED_LINGER_S = 0.005
REDISCOVER_AFTER = 2  # failed tries in a row before an agent found by mDNS looks again
REDISCOVER_SECONDS = 3.0


@dataclass
class JobInfo:
    argv: tuple[str, ...]
    env: dict[str, str]
    count: int
    timeout: float | None
    outputs: tuple[str, ...]
    network: bool
    files: dict[str, bytes]
    cpus: float
    memory: int
    python: str | None = None  # a job of Python function calls
    gpus: int = 0

    def call_job(self, job_id: str) -> CallJob:
        assert self.python is not None
        return CallJob(
            job_id, self.python, self.cpus, self.memory, self.timeout, self.network, self.env
        )


REPORT_BYTES = 24 * 1024 * 1024  # about as much as one report carries (the limit is 64 MiB)


def _event_bytes(event: dict[str, Any]) -> int:
    size = len(event.get("data") or "") + len(event.get("result") or "")
    return size + sum(len(data) for data in event.get("outputs", {}).values())


@dataclass
class Outbox:
    """Events waiting to be sent, and sent reports waiting for their ack."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[TaskRef, tuple[int, bytearray]] = field(default_factory=dict)
    unacked: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    seq: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, event: dict[str, Any], linger: float = 0.0) -> None:
        """Queue an event; with ``linger``, send it only that much later unless something
        else goes first, so that it can share a report (and the coordinator's commit)."""
        self.pending.append(event)
        if linger <= 0:
            self.ready.set()
        else:
            asyncio.get_running_loop().call_later(linger, self._wake)

    def _wake(self) -> None:
        if self.pending or self.logs:
            self.ready.set()

    def add_output(self, ref: TaskRef, offset: int, data: bytes) -> None:
        if ref in self.logs:
            self.logs[ref][1].extend(data)
        else:
            self.logs[ref] = (offset, bytearray(data))
        self.ready.set()

    def flush_logs_of(self, ref: TaskRef) -> None:
        """Output must be queued before the end of its task."""
        if ref in self.logs:
            offset, data = self.logs.pop(ref)
            self.pending.append(_log_event(ref, offset, bytes(data)))

    def take(self) -> tuple[int, list[dict[str, Any]]] | None:
        """The next report: what is pending, up to about REPORT_BYTES (results and output
        can be large; what does not fit goes in the next one, at once)."""
        for ref in list(self.logs):
            self.flush_logs_of(ref)
        self.ready.clear()
        if not self.pending:
            return None
        count, size = 0, 0
        for event in self.pending:
            size += _event_bytes(event)
            if count and size > REPORT_BYTES:
                break
            count += 1
        self.seq += 1
        report = (self.seq, self.pending[:count])
        self.pending = self.pending[count:]
        if self.pending:
            self.ready.set()
        self.unacked.append(report)
        return report

    def ack(self, seq: int) -> None:
        self.unacked = [(s, events) for s, events in self.unacked if s > seq]

    def held_ends(self) -> set[TaskRef]:
        refs = {
            tuple(e["task"]) for _, events in self.unacked for e in events if e["kind"] == "ended"
        }
        refs |= {tuple(e["task"]) for e in self.pending if e["kind"] == "ended"}
        return {(int(r[0]), int(r[1]), int(r[2])) for r in refs}


def _never_started(ref: TaskRef, why: str) -> dict[str, Any]:
    return {
        "kind": "ended",
        "task": list(ref),
        "end": EndReason.CANCELLED.value,
        "exit_code": None,
        "signal": None,
        "message": why,
        "outputs": {},
    }


def _refused(ref: TaskRef, why: str) -> dict[str, Any]:
    return {**_never_started(ref, why), "end": EndReason.SANDBOX_ERROR.value}


def _log_event(ref: TaskRef, offset: int, data: bytes) -> dict[str, Any]:
    return {
        "kind": "log",
        "task": list(ref),
        "offset": offset,
        "data": base64.b64encode(data).decode(),
    }


class Agent:
    def __init__(
        self,
        coordinator: str,
        paths: AgentPaths,
        runner: Runner,
        *,
        name: str,
        cpus: float,
        memory: int,
        task_disk: int = DEFAULT_TASK_DISK,
        task_log: int = DEFAULT_TASK_LOG,
        labels: dict[str, str] | None = None,
        gpus: int = 0,
        server_name: str | None = None,
    ) -> None:
        self.base = coordinator.rstrip("/")
        self.url = self.base.replace("https://", "wss://", 1) + "/v1/agent/session"
        self.paths = paths
        # Found by mDNS: the certificate is checked for this fixed name, not the address.
        self.server_name = server_name
        self.task_disk = task_disk
        self.task_log = min(task_log, MAX_LOG_BYTES)
        # Task work directories live outside the data dir (which holds the node's key and may
        # sit in a private home): a folder the task user may pass through but not list.
        self.work_root = make_scratch("work")
        self._cleaner = ThreadPoolExecutor(1, thread_name_prefix="workdir-cleaner")
        self.work_root.chmod(0o711)
        self.runner = runner
        self.functions = FunctionWorkers(
            runner, python_env.prepare(runner.sandboxed, runner.user), self.work_root, task_disk
        )
        self.calls: dict[int, bytes] = {}  # pickled calls of assigned function tasks, by task
        self.name = name
        self.cpus = cpus
        self.memory = memory
        self.labels = dict(labels or {})
        self.gpus = gpus
        self.usage = probe.UsageSampler()
        self.ssl = tls.client_ssl_context(paths.ca_cert.read_bytes(), paths.cert, paths.key)
        self.jobs: dict[str, JobInfo] = {}
        self.running: dict[TaskRef, RunningTask | None] = {}
        self.cancelled: dict[TaskRef, str] = {}
        # Tasks beyond this node's room (prefetched) wait here for their turn.
        self.admission: Admission[TaskRef] = Admission(cpus, memory, gpus)
        self._handles: set[asyncio.Task[None]] = set()  # keeps running task coroutines alive
        self.outbox = Outbox()
        self.heartbeat_interval = 1.0
        # The lease: how long running tasks may go on without word from the coordinator. Past
        # it the coordinator has declared this node lost and moved its work, so the agent kills
        # its own tasks rather than let two copies run (self-fencing).
        self.lease = 5.0
        self.last_renewed = time.monotonic()
        self._stopping = asyncio.Event()
        self._opened = 0  # sessions opened so far

    # -- the connection ---------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until stopped; a dropped session is retried with backoff."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        delay = RECONNECT_MIN
        watchdog = asyncio.create_task(self._lease_watchdog())
        renewal = asyncio.create_task(self._renewal_loop())
        failed = 0  # tries in a row that got no session at all
        looking: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                opened = self._opened
                try:
                    await self._session()
                    delay = RECONNECT_MIN
                except TrustError:
                    raise
                except (TimeoutError, OSError, websockets.WebSocketException) as exc:
                    wait = reconnect_wait(delay, self._lease_left())
                    log.warning(
                        "no session with the coordinator (%s); retrying in %.1fs", exc, wait
                    )
                failed = 0 if self._opened != opened else failed + 1
                # Found by mDNS once: look again, beside the retries, in case it moved.
                idle = looking is None or looking.done()
                if failed >= REDISCOVER_AFTER and self.server_name is not None and idle:
                    looking = asyncio.create_task(self._rediscover())
                with contextlib.suppress(asyncio.TimeoutError):
                    wait = reconnect_wait(delay, self._lease_left())
                    await asyncio.wait_for(self._stopping.wait(), wait)
                delay = min(delay * 2, RECONNECT_MAX)
        finally:
            watchdog.cancel()
            renewal.cancel()
            if looking is not None:
                looking.cancel()
            await self._kill_all("the agent is stopping")
            await self.functions.close()
            self.runner.close()
            self._cleaner.shutdown(wait=True)
            shutil.rmtree(self.work_root, ignore_errors=True)

    async def _rediscover(self) -> None:
        """Look for this mesh's coordinator by mDNS (its CA hash); if it answers at another
        address, use that from now on, and remember it for the next start."""
        ca_hash = certs.ca_fingerprint(certs.load_cert_pem(self.paths.ca_cert.read_bytes()))
        try:
            urls, _ = await find_coordinator(ca_hash, REDISCOVER_SECONDS)
        except Exception as exc:  # zeroconf's errors or OSError: the retries go on regardless
            log.warning("could not look for the coordinator over mDNS: %s", exc)
            return
        if not urls or self.base in urls:
            return
        self.base = urls[0]
        self.url = self.base.replace("https://", "wss://", 1) + "/v1/agent/session"
        self.server_name = certs.COORDINATOR_NAME
        state = read_toml(self.paths.state) if self.paths.state.exists() else {}
        write_toml(self.paths.state, {**state, "coordinator": self.base})
        log.warning("the coordinator moved: found it at %s by mDNS; reconnecting there", self.base)

    def _lease_left(self) -> float | None:
        """What is left of the lease while tasks are running on it; None when none are."""
        if not any(t is not None for t in self.running.values()):
            return None
        return self.lease - (time.monotonic() - self.last_renewed)

    def _lease_holds(self) -> bool:
        return time.monotonic() - self.last_renewed <= self.lease

    async def _lease_watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.admission.waiting:
                self.admission.wake()  # queued tasks held back by an expired lease look again
            silent = time.monotonic() - self.last_renewed
            if silent > self.lease and any(t is not None for t in self.running.values()):
                log.warning(
                    "no word from the coordinator for %.1fs (lease %.1fs): killing my tasks",
                    silent,
                    self.lease,
                )
                await self._kill_all(
                    f"lease expired: no word from the coordinator for {silent:.1f}s"
                )

    # -- the node's certificate --------------------------------------------------------------

    async def _renewal_loop(self) -> None:
        """Renew the node certificate at a random 50-80 % of its lifetime (random, so that
        agents that joined together do not all renew at once); on failure retry soon."""
        while True:
            end = time.time() + RENEW_RETRY_MAX
            try:
                cert = certs.load_cert_pem(self.paths.cert.read_bytes())
                # Issued CLOCK_SKEW after its not-before (backdated for clocks that run behind).
                start = (cert.not_valid_before_utc + certs.CLOCK_SKEW).timestamp()
                end = cert.not_valid_after_utc.timestamp()
                due = start + (end - start) * random.uniform(0.5, 0.8)
                await asyncio.sleep(max(0.0, due - time.time()))
                await asyncio.to_thread(self._renew)
            except (MeshError, OSError, httpx.HTTPError, ValueError) as exc:
                retry = min(RENEW_RETRY_MAX, max(0.1, (end - time.time()) / 10))
                log.warning(
                    "could not renew this node's certificate (%s); it expires in %.0fs;"
                    " retrying in %.1fs",
                    exc,
                    end - time.time(),
                    retry,
                )
                await asyncio.sleep(retry)

    def _renew(self) -> None:
        """A new key and certificate for the same node id, asked for over the current one."""
        key = certs.generate_key()
        csr = certs.make_csr(key, self.name)
        with httpx.Client(verify=self.ssl, timeout=30) as client:
            response = client.post(
                f"{self.base}/v1/agent/renew",
                json={"csr": csr.decode()},
                extensions=tls_name(self.server_name),
            )
        if response.status_code != 200:
            raise TrustError(
                f"the coordinator refused to renew ({response.status_code}):"
                f" {response.json().get('error', response.text[:200])}"
            )
        pem = response.json()["certificate"].encode()
        certs.load_cert_pem(pem)  # refuse garbage before it replaces a working certificate
        # Key first, then certificate: each write is atomic; a crash in between leaves a
        # mismatched pair that the next start reports (and a new token fixes).
        certs.write_private_file(self.paths.key, certs.key_to_pem(key))
        certs.write_public_file(self.paths.cert, pem)
        self.ssl = tls.client_ssl_context(
            self.paths.ca_cert.read_bytes(), self.paths.cert, self.paths.key
        )
        log.info("renewed this node's certificate")

    def _check_certificate(self) -> None:
        """An expired certificate cannot be renewed: say so plainly instead of retrying."""
        cert = certs.load_cert_pem(self.paths.cert.read_bytes())
        expired = cert.not_valid_after_utc
        if expired.timestamp() <= time.time():
            raise TrustError(
                f"this agent's certificate expired at {expired:%Y-%m-%d %H:%M:%S} UTC (it was"
                " off longer than the mesh's certificate lifetime, so it could not renew):"
                " join again with a new token (`mesh token create` on the coordinator) and a"
                " new data dir"
            )

    async def _session(self) -> None:
        self._check_certificate()
        try:
            await self._run_session()
        except websockets.ConnectionClosed as exc:
            # The refusal may surface in the hello's send, the sender or the receiver.
            if exc.rcvd is not None and exc.rcvd.code == 4403:
                raise TrustError(
                    f"the coordinator refused this agent: {exc.rcvd.reason}; join again "
                    "with a new token (`mesh token create` on the coordinator)"
                ) from exc
            raise

    async def _run_session(self) -> None:
        named: dict[str, Any] = {}
        if self.server_name is not None:
            named["server_hostname"] = self.server_name
        async with connect(
            self.url,
            ssl=self.ssl,
            max_size=MAX_REQUEST_BYTES,
            compression=None,  # as the coordinator, which refuses it (ADR 2)
            ping_interval=5,
            ping_timeout=10,
            open_timeout=10,
            **named,
        ) as ws:
            self._opened += 1
            held = set(self.running) | self.outbox.held_ends()
            await ws.send(
                json.dumps(
                    {
                        "type": "hello",
                        "name": self.name,
                        "cpus": self.cpus,
                        "memory": self.memory,
                        "sandbox": self.runner.describe(),
                        "version": __version__,
                        "labels": self.labels,
                        "gpus": self.gpus,
                        "usage": self.usage.sample(),
                        "held": [list(ref) for ref in held],
                    }
                )
            )
            for seq, events in self.outbox.unacked:
                await ws.send(json.dumps({"type": "report", "seq": seq, "events": events}))
            sender = asyncio.create_task(self._send_loop(ws))
            receiver = asyncio.create_task(self._receive_loop(ws))
            stop = asyncio.create_task(self._stopping.wait())
            try:
                done, _ = await asyncio.wait(
                    {sender, receiver, stop}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is not stop:
                        task.result()  # re-raise what ended the session
            finally:
                for task in (sender, receiver, stop):
                    task.cancel()

    async def _receive_loop(self, ws: ClientConnection) -> None:
        async for raw in ws:
            self.last_renewed = time.monotonic()
            self._handle(json.loads(raw))

    async def _send_loop(self, ws: ClientConnection) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.outbox.ready.wait(), self.heartbeat_interval)
            report = self.outbox.take()
            usage = self.usage.sample()
            if report is None:
                await ws.send(json.dumps({"type": "heartbeat", "usage": usage}))
                continue
            seq, events = report
            await ws.send(
                json.dumps({"type": "report", "seq": seq, "events": events, "usage": usage})
            )

    # -- messages from the coordinator ------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ack":
            self.outbox.ack(int(message["seq"]))
        elif kind == "assign":
            for job_id, spec in message["jobs"].items():
                self.jobs[job_id] = JobInfo(
                    argv=tuple(spec["argv"]),
                    env=dict(spec["env"]),
                    count=int(spec["count"]),
                    timeout=spec["timeout"],
                    outputs=tuple(spec["outputs"]),
                    network=bool(spec["network"]),
                    files={n: base64.b64decode(d) for n, d in spec["files"].items()},
                    cpus=float(spec["cpus"]),
                    memory=int(spec["memory"]),
                    python=spec.get("python"),
                    gpus=int(spec.get("gpus", 0)),
                )
            for task_id, call in message.get("calls", {}).items():
                self.calls[int(task_id)] = base64.b64decode(call)
            for task_id, attempt, epoch, job_id, index in message["tasks"]:
                ref = (task_id, attempt, epoch)
                if ref not in self.running:
                    self.running[ref] = None
                    handle = asyncio.create_task(self._run_task(ref, job_id, index))
                    self._handles.add(handle)
                    handle.add_done_callback(self._handles.discard)
        elif kind == "cancel":
            for raw in message["tasks"]:
                ref = (int(raw[0]), int(raw[1]), int(raw[2]))
                why = str(message.get("reason", "cancelled"))
                running = self.running.get(ref)
                if running is not None:
                    running.cancel(why)
                elif ref in self.running:  # queued or starting: it will not run (for long)
                    self.cancelled[ref] = why
                    self.admission.wake()
        elif kind in ("welcome", "timing"):
            self.heartbeat_interval = float(message["heartbeat_interval"])
            self.lease = float(message["lease"])
            if kind == "welcome":
                log.warning("session open as node %s", message.get("node_id"))

    # -- tasks ------------------------------------------------------------------------------

    async def _run_task(self, ref: TaskRef, job_id: str, index: int) -> None:
        job = self.jobs[job_id]
        workdir = self.work_root / job_id / f"{index}-{ref[1]}"
        offset = 0

        def on_output(data: bytes) -> None:
            # Past the log limit, output is dropped, and one line says so where it stops.
            nonlocal offset
            room = self.task_log - offset
            if room <= 0:
                return
            if len(data) >= room:
                data = (
                    data[:room]
                    + (
                        f"\n[planetary-mesh: output truncated at {format_size(self.task_log)};"
                        " the rest was dropped]\n"
                    ).encode()
                )
                room = 0
            self.outbox.add_output(ref, offset, data)
            offset = self.task_log if room == 0 else offset + len(data)

        if job.gpus > self.gpus:  # never placed so by the coordinator; refuse, never wait
            self.outbox.add(_refused(ref, f"it asks {job.gpus} GPUs; this node has {self.gpus}"))
            self.running.pop(ref, None)
            self.calls.pop(ref[0], None)
            return
        devices = await self.admission.enter(
            ref,
            job.cpus,
            job.memory,
            skip=lambda: ref in self.cancelled,
            may_start=self._lease_holds,
            gpus=job.gpus,
        )
        if devices is None:
            # Cancelled while queued: it never ran, and says so.
            self.outbox.add(_never_started(ref, self.cancelled.pop(ref, "cancelled")))
            self.running.pop(ref, None)
            self.calls.pop(ref[0], None)
            return
        try:
            outcome, result = await self._start_and_wait(
                ref, job_id, index, job, workdir, on_output, devices
            )
        finally:
            self.admission.leave(job.cpus, job.memory, devices)
        outputs, note = collect_outputs(workdir, job.outputs)
        if note:
            on_output(note.encode())
        self.outbox.flush_logs_of(ref)
        self.outbox.add(
            {
                "kind": "ended",
                "task": list(ref),
                "end": outcome.reason.value,
                "exit_code": outcome.exit_code,
                "signal": outcome.signal,
                "message": outcome.message,
                "outputs": {n: base64.b64encode(d).decode() for n, d in outputs.items()},
                "result": None if result is None else base64.b64encode(result).decode(),
            },
            linger=BUSY_ENDED_LINGER_S if self.admission.waiting else 0.0,
        )
        self.running.pop(ref, None)
        # Off the event loop: removing even an empty directory waits on the file system's
        # journal (0.2-0.6 ms here), and the next task should not wait for it.
        self._cleaner.submit(_remove_workdir, workdir)

    async def _start_and_wait(
        self,
        ref: TaskRef,
        job_id: str,
        index: int,
        job: JobInfo,
        workdir: Path,
        on_output: Callable[[bytes], None],
        devices: tuple[int, ...],
    ) -> tuple[TaskOutcome, bytes | None]:
        """Run the task to its end: its outcome and, for a function call, its result.
        ``devices``: the indices of the GPUs it holds."""
        running: RunningTask | FunctionCall
        try:
            if job.python is not None:
                payload = self.calls.pop(ref[0], None)
                if payload is None:
                    raise MeshError("its call did not arrive with it; it will be sent again")
                running = await self.functions.start(
                    job.call_job(job_id), payload, on_output, devices
                )
                return await self._watch(ref, running), running.result
            env = {
                **job.env,
                **gpu_environment(devices),
                "MESH_JOB_ID": job_id,
                "MESH_TASK_INDEX": str(index),
                "MESH_TASK_COUNT": str(job.count),
                "MESH_ATTEMPT": str(ref[1]),
            }
            launch = TaskLaunch(
                argv=job.argv,
                env=env,
                workdir=workdir,
                timeout=job.timeout,
                network=job.network,
                limits=Limits(memory=job.memory, cpus=job.cpus, disk=self.task_disk),
                # Tasks of one job may share a warm sandbox on this agent (the runner decides).
                share=job_id,
                share_size=job.count,
                devices=gpu_device_files(devices),
            )
            self.runner.make_workdir(launch)
            for name, data in job.files.items():
                (workdir / name).write_bytes(data)
            running = await self.runner.start(launch, on_output)
            return await self._watch(ref, running), None
        except (MeshError, OSError) as exc:
            outcome = TaskOutcome(
                reason=EndReason.SANDBOX_ERROR,
                exit_code=None,
                signal=None,
                message=f"could not start: {exc}",
            )
        return outcome, None

    async def _watch(self, ref: TaskRef, running: RunningTask) -> TaskOutcome:
        """Say the task started and wait for its end; a cancel that came early applies now."""
        self.running[ref] = running
        if ref in self.cancelled:
            running.cancel(self.cancelled.pop(ref))
        # A start may wait a little: a short task's end then travels with it, and the
        # coordinator commits both at once (one fsync per task instead of two).
        self.outbox.add({"kind": "started", "task": list(ref)}, linger=STARTED_LINGER_S)
        return await running.wait()

    async def _kill_all(self, why: str) -> None:
        tasks = [t for t in self.running.values() if t is not None]
        for task in tasks:
            task.cancel(why)
        for task in tasks:
            with contextlib.suppress(Exception):
                await task.wait()


def _remove_workdir(workdir: Path) -> None:
    try:
        workdir.rmdir()  # most tasks leave nothing behind, and rmtree costs a lot more
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)


def collect_outputs(workdir: Path, patterns: tuple[str, ...]) -> tuple[dict[str, bytes], str]:
    """Files under ``workdir`` matching ``patterns``, within the size cap; and a note if cut."""
    found: dict[str, bytes] = {}
    if not patterns:
        return found, ""
    total = 0
    skipped: list[str] = []
    root = workdir.resolve()
    for pattern in patterns:
        for path in sorted(workdir.glob(pattern)):
            if path.is_symlink() or not path.is_file():
                continue  # a symlink could point outside the task's directory
            name = str(path.relative_to(workdir))
            if name in found or not path.resolve().is_relative_to(root):
                continue
            size = path.stat().st_size
            if total + size > MAX_OUTPUT_BYTES:
                skipped.append(name)
                continue
            found[name] = path.read_bytes()
            total += size
    note = ""
    if skipped:
        note = (
            f"\n[mesh] output files over the {MAX_OUTPUT_BYTES // 2**20} MiB limit were not "
            f"collected: {', '.join(skipped)}\n"
        )
    return found, note
