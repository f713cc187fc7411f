"""Warm sandboxes: one bubblewrap sandbox per job on an agent, reused by the job's tasks.

A fresh bwrap costs milliseconds of set-up per task; a job of many short tasks would be paced by
it. So the first task of a job that has more than one task starts in a fresh sandbox as usual,
and meanwhile the agent makes the job a warm one: the same namespaces, the same read-only /usr
and private /tmp, the job's folder of work directories at /work, and a small launcher
(warm_launcher.c, or .py) as its PID 1. Later tasks of the job are sent to that launcher, which
spawns them; each runs in its own work directory, /work/<index>-<attempt>, as in a fresh
sandbox.

What each task keeps of its own: its cgroup (memory, CPU, processes; the launcher spawns the task
from inside it, see the launcher), its rlimits, its session, its timeout and disk quota, and its
kill: the cgroup is killed whole, daemonised children included. A task's cgroup is reused by the
job's next task with the same limits when it is left clean (nothing OOM-killed, next to nothing
charged): making and removing one costs more than starting the task. What the tasks of
one job on one agent share: /tmp, /dev/shm, the PID and network namespaces, and the uid. They
belong to one user and one job, as Ray's or Dask's tasks share a worker; different jobs never
share a sandbox.

Warm sandboxes need task cgroups (without them a daemonised child could outlive its task inside
the sandbox) and a launcher (launchers.py: the C one the agent compiles, or one under the
Python in /usr); without either every task gets a fresh sandbox. A warm sandbox closes once its
job has had no task on the agent for ``idle_s``. The runner's pool of them, and the spares made
ahead for new jobs: warm_pool.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import signal
import socket
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.bwrap_spawn import (
    CGROUP_POLL_S,
    SETUP_TIMEOUT_S,
    CgroupReaper,
    Spawned,
    abandon,
    close_fd,
    kill,
    readable,
    renice,
    sandbox_init_pidfd,
    spawn_bwrap,
)
from planetary_mesh.sandbox.limits import CgroupBackend, Limits, TaskCgroup, open_procs
from planetary_mesh.sandbox.runner import (
    EndReason,
    OutputPipe,
    OutputSink,
    ProcessPipes,
    RunningTask,
    SupervisedTask,
    TaskLaunch,
    TaskOutcome,
)

log = logging.getLogger(__name__)

# A spare is made at the lowest CPU priority, so that making it (the helper, bwrap and its
# namespaces, the launcher's start-up: ~6 ms of CPU with the C launcher) takes no CPU from
# running tasks and the messages that start and end them; ready, or wanted by a job, it is set
# back to normal.
SPARE_NICE = 19
# What the sandbox's own cgroup holds: the launcher (C, or a small Python) and bwrap; tasks are
# spawned from inside their own cgroups.
LAUNCHER_LIMITS = Limits(memory=128 * 1024 * 1024, pids=256)
MAX_REQUEST_BYTES = 128 * 1024  # a launch this large (a huge environment) gets a fresh sandbox
TREE_GONE_TIMEOUT_S = 30.0  # a process stuck in the kernel (D state) can hold its cgroup up
MAX_SPARE_CGROUPS = 4  # per warm sandbox and limits: a clean task cgroup is reused


class FreeCgroups(dict[Limits, list[TaskCgroup]]):
    """Clean, empty cgroups by their limits, kept for the next tasks and sandboxes (see
    WarmSandbox.give_back). Once ``closed`` (the pool has closed), what comes back is removed:
    a task killed by the close ends after it."""

    closed = False


class WarmMode(StrEnum):
    """When tasks use warm sandboxes (the agent's --warm-sandboxes)."""

    AUTO = "auto"  # tasks of jobs with more than one task; a job's first task does not wait
    OFF = "off"  # never: a fresh sandbox for every task
    ALWAYS = "always"  # every task, the first of a job waiting for its sandbox to be made


class WarmUnavailable(Exception):
    """The warm sandbox cannot take this task (closed, full, or the launch does not fit): the
    runner starts the task in a fresh sandbox instead. Not a failure of the task."""


class WarmSandbox:
    """One job's warm sandbox on this agent: a bwrap whose PID 1 is the launcher."""

    def __init__(
        self,
        jobdir: Path,
        # (the launcher's descriptors: control socket, home cgroup.procs; status fd) -> argv
        command: Callable[[list[int], int], list[str]],
        cgroups: CgroupBackend,
        executable: str,
        idle_s: float,
        on_closed: Callable[[WarmSandbox], None],
        reaper: CgroupReaper,
        background: bool = False,
        free_cgroups: FreeCgroups | None = None,
    ) -> None:
        self.jobdir = jobdir
        self.background = background  # made at SPARE_NICE until ready or hurried
        self.ready = False
        self.closed = False
        self.launcher_pid: int | None = None  # on the host
        self._command = command
        self._cgroups = cgroups
        self._executable = executable
        self._idle_s = idle_s
        self._on_closed = on_closed
        self._reaper = reaper
        self._group: TaskCgroup | None = None
        self._spawned: Spawned | None = None
        self._launcher_pidfd: int | None = None
        self._control: socket.socket | None = None
        self._starts: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._exits: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Clean, empty cgroups by their limits, shared by the pool's sandboxes: a task's, or a
        # closed sandbox's own, is the next one's (see give_back).
        self._spare_cgroups = FreeCgroups() if free_cgroups is None else free_cgroups
        self._premade: TaskCgroup | None = None  # a spare's first task's, made ahead
        self._premade_limits: Limits | None = None  # what it is limited to, if anything
        self._ids = itertools.count(1)
        self.active = 0  # tasks starting or running in it
        self._idle_timer: asyncio.TimerHandle | None = None
        self.starting: asyncio.Task[None] | None = None  # set by the pool
        self.on_task_done: Callable[[], None] | None = None  # set by the pool

    async def start(self) -> None:
        """Make the sandbox and wait for its launcher's hello. Raises SandboxError."""
        try:
            self._group = self._take_cgroup(LAUNCHER_LIMITS) or self._cgroups.create(
                LAUNCHER_LIMITS
            )
        except OSError as error:
            raise SandboxError(f"cannot make the warm sandbox's cgroup: {error}") from error
        if self._group is None:
            raise SandboxError("a warm sandbox needs task cgroups, and there are none")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = mine
        mine.setblocking(False)
        # The launcher joins its cgroup through these, and comes home through them after it
        # has spawned a task from inside the task's cgroup.
        home = open_procs(self._group)
        try:
            control_fd = theirs.fileno()
            self._spawned = await spawn_bwrap(
                lambda status_fd: self._command([control_fd, *home], status_fd),
                functools.partial(ProcessPipes, self._log_output),
                self._group,
                self._executable,
                pass_fds=(control_fd, *home),
                joins_itself=True,
                nice=SPARE_NICE if self.background else 0,
            )
        finally:
            theirs.close()
            for fd in home:
                os.close(fd)
        # With --as-pid-1 the process bwrap names is the launcher itself.
        self._launcher_pidfd = sandbox_init_pidfd(self._spawned.info)
        pid = self._spawned.info.get("child-pid")
        self.launcher_pid = pid if isinstance(pid, int) else None
        self._set_priority()  # the launcher may have forked before bwrap was reniced
        try:
            hello = await asyncio.wait_for(_receive(mine), SETUP_TIMEOUT_S)
        except TimeoutError:
            hello = b""
        if not hello:
            raise SandboxError(
                "the warm sandbox's launcher did not start"
                f" ({self._spawned.pipes.last_line() or 'no reason given'})"
            )
        asyncio.get_running_loop().add_reader(mine.fileno(), self._on_control)
        self.hurry()  # before any task: what the launcher spawns inherits its priority
        self.ready = True
        self._arm_idle_timer()

    def hurry(self) -> None:
        """Make the rest of this sandbox at normal CPU priority: a task waits for it."""
        self.background = False
        self._set_priority()

    def _set_priority(self) -> None:
        nice = SPARE_NICE if self.background else 0
        spawned = self._spawned
        if spawned is not None and spawned.transport.get_returncode() is None:
            renice(spawned.transport.get_pid(), nice)  # not reaped: the pid is still bwrap's
        if self._launcher_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                # Alive (so its pid is its own) just before: it is a child of bwrap's, reaped
                # only by it, and bwrap is still running.
                signal.pidfd_send_signal(self._launcher_pidfd, 0)
                renice(self.launcher_pid, nice)

    def _log_output(self, data: bytes) -> None:
        # The launcher writes only when something is badly wrong (a Python traceback).
        log.warning("warm sandbox for %s: %s", self.jobdir.name, data.decode(errors="replace"))

    async def spawn(self, launch: TaskLaunch, on_output: OutputSink) -> RunningTask:
        """Start ``launch`` in this sandbox. Raises WarmUnavailable (start it elsewhere) or
        SandboxError (the command cannot run: not found, not executable)."""
        if not self.ready or self.closed or self._control is None:
            raise WarmUnavailable("the warm sandbox is not ready")
        task_id = next(self._ids)
        request = _request(task_id, launch)
        limits = launch.limits or Limits()
        group = self._task_cgroup(limits)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[dict[str, Any]] = loop.create_future()
        exited: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._starts[task_id] = answered
        self._exits[task_id] = exited
        self._task_started()
        out_read = -1
        started = False
        try:
            out_read, out_write = os.pipe()
            sent = [out_write]
            try:
                sent += open_procs(group)
                socket.send_fds(self._control, [request], sent)
            except OSError as error:  # full (BlockingIOError) or the launcher is gone
                raise WarmUnavailable(f"cannot reach the launcher: {error}") from error
            finally:
                for fd in sent:
                    os.close(fd)
            try:
                reply = await asyncio.wait_for(asyncio.shield(answered), SETUP_TIMEOUT_S)
            except TimeoutError as error:
                self.close()  # a launcher that does not answer is of no more use
                raise WarmUnavailable("the launcher did not start the task") from error
            if "failed" in reply:
                raise SandboxError(str(reply["failed"]))
            pid = reply.get("started")
            if not isinstance(pid, int):
                raise WarmUnavailable(
                    f"the launcher did not start the task ({reply.get('error') or 'gone'})"
                )
            transport, pipes = await loop.connect_read_pipe(
                functools.partial(OutputPipe, on_output),
                open(out_read, "rb", buffering=0),  # noqa: SIM115 - the transport closes it
            )
            started = True
            return _WarmTask(launch, pid, pipes, transport, group, limits, exited, self)
        finally:
            self._starts.pop(task_id, None)
            if not started:
                if out_read >= 0:
                    os.close(out_read)
                self._exits.pop(task_id, None)
                abandon(group)  # kills the spawned child, if there is one
                self.task_done()

    @property
    def has_premade_cgroup(self) -> bool:
        return self._premade is not None

    def premake_cgroup(self, likely: Limits | None = None) -> None:
        """Make the cgroup of this (spare) sandbox's first task now: making one (a folder in
        each of three hierarchies on v1) is ~0.5 ms of a new job's start. With ``likely``
        limits (the last task's: jobs come alike) set too, ~0.35 ms more when they match; set
        again when the task is known if they do not."""
        if self._premade is None and not self.closed:
            limits = likely or Limits(pids=None)
            with contextlib.suppress(OSError):
                self._premade = self._take_cgroup(limits) or self._cgroups.create(limits)
                self._premade_limits = likely

    def _task_cgroup(self, limits: Limits) -> TaskCgroup:
        """A cgroup for a task with ``limits``: one a finished task of this sandbox left clean,
        the one made ahead, or a new one."""
        spare = self._take_cgroup(limits)
        if spare is not None:
            return spare
        premade, self._premade = self._premade, None
        made_for, self._premade_limits = self._premade_limits, None
        if premade is not None and limits == made_for:
            return premade
        # Limited ahead to others, it takes these only if each is given: none to lift.
        if premade is not None and (
            made_for is None or None not in (limits.memory, limits.cpus, limits.pids)
        ):
            try:
                premade.limit(limits)
                return premade
            except OSError as error:
                log.warning("could not limit a cgroup made ahead (%s); making another", error)
        if premade is not None:
            premade.remove()
        try:
            group = self._cgroups.create(limits)
        except OSError as error:
            raise SandboxError(f"cannot make the task's cgroup: {error}") from error
        if group is None:
            raise WarmUnavailable("no cgroup for the task")
        return group

    def _take_cgroup(self, limits: Limits) -> TaskCgroup | None:
        spare = self._spare_cgroups.get(limits)
        return spare.pop() if spare else None

    def give_back(self, group: TaskCgroup, limits: Limits, oom_killed: bool | None = None) -> None:
        """A cgroup done with, empty (a finished task's, or a closed sandbox's own): kept for
        the next task or sandbox with the same limits, of any job, when nothing was OOM-killed
        in it and nothing of its last user stays charged to it; removed otherwise. Making and
        removing one (in three hierarchies on v1: six mkdir and rmdir, and its limits) costs
        more than starting a task. What a cgroup keeps (counters) no task can see: a sandbox
        has a cgroup namespace of its own and no /sys/fs/cgroup."""
        spare = self._spare_cgroups.setdefault(limits, [])
        if (
            self._spare_cgroups.closed
            or len(spare) >= MAX_SPARE_CGROUPS
            or not group.reusable(oom_killed)
        ):
            group.remove()
        else:
            spare.append(group)

    def _on_control(self) -> None:
        assert self._control is not None
        while True:
            try:
                message = self._control.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                log.warning("the warm sandbox for %s ended", self.jobdir.name)
                self.close()
                return
            try:
                task_id, record = _launcher_record(message)
                # Its start's answer comes first, then, once it has ended, its exit status.
                waiters = self._exits if "status" in record else self._starts
                waiter = waiters.pop(task_id, None)
            except ValueError:
                log.warning("the warm sandbox's launcher said %r", message[:200])
                continue
            if waiter is not None and not waiter.done():
                waiter.set_result(record)

    def _task_started(self) -> None:
        self.active += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def task_done(self) -> None:
        self.active -= 1
        self._arm_idle_timer()
        if self.on_task_done is not None:
            self.on_task_done()

    def adopt(self, jobdir: Path, idle_s: float) -> None:
        """A spare sandbox becomes a job's: ``jobdir`` is now the folder bound at /work."""
        self.jobdir = jobdir
        self._idle_s = idle_s
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self.active == 0 and not self.closed and self._idle_timer is None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self._idle_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if self.active == 0:
            self.close()

    def close(self) -> None:
        """Kill the sandbox and all in it now; tasks still running there end as lost."""
        if self.closed:
            return
        self.closed = True
        self.ready = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for waiter in (*self._starts.values(), *self._exits.values()):
            if not waiter.done():
                waiter.set_result({"lost": True})
        self._starts.clear()
        self._exits.clear()
        if self._premade is not None:
            self.give_back(self._premade, self._premade_limits or Limits(pids=None))
            self._premade = None
        if self._control is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()  # the launcher exits on EOF; the kill below makes sure
        kill(self._launcher_pidfd)
        if self._spawned is not None:
            kill(self._spawned.bwrap_pidfd)
            with contextlib.suppress(RuntimeError):  # closed along with its event loop
                self._spawned.transport.close()
                self._spawned.status_transport.close()
            close_fd(self._spawned.bwrap_pidfd)
        close_fd(self._launcher_pidfd)
        self._launcher_pidfd = None
        if self._group is not None:
            # The launcher and bwrap are dead within ms; their cgroup is then the next's.
            self._reaper.abandon(
                self._group, functools.partial(self.give_back, limits=LAUNCHER_LIMITS)
            )
        self._on_closed(self)


class _WarmTask(SupervisedTask):
    """A task the launcher spawned: its exit status comes from the launcher, its tree is its
    cgroup. ``pid`` is its pid inside the sandbox (for messages only)."""

    def __init__(
        self,
        launch: TaskLaunch,
        pid: int,
        pipes: OutputPipe,
        transport: asyncio.ReadTransport,
        group: TaskCgroup,
        limits: Limits,
        exited: asyncio.Future[dict[str, Any]],
        sandbox: WarmSandbox,
    ) -> None:
        self._transport = transport
        self._group = group
        self._limits = limits
        self._exit = exited
        self._sandbox = sandbox
        self._lost = False
        self._tree_gone = False
        self._oom_killed: bool | None = None  # read for its outcome; not if it was killed
        exited.add_done_callback(lambda _: pipes.process_exited())
        super().__init__(launch, pid, pipes)

    def _returncode(self) -> int:
        status = self._exit.result().get("status")
        if not isinstance(status, int):  # the whole sandbox went down under it
            self._lost = True
            return -signal.SIGKILL
        return os.waitstatus_to_exitcode(status)

    def _close_io(self) -> None:
        self._transport.close()

    def _kill_tree(self) -> None:
        self._group.kill()

    async def _wait_tree_gone(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TREE_GONE_TIMEOUT_S
        while not self._group.empty():
            if loop.time() > deadline:
                log.error("task %d: processes of it survive SIGKILL; giving up", self.pid)
                return
            self._group.kill()
            await asyncio.sleep(CGROUP_POLL_S)
        self._tree_gone = True

    def _outcome_of(self, returncode: int) -> TaskOutcome:
        self._oom_killed = self._group.oom_killed()
        if self._oom_killed:
            return TaskOutcome.out_of_memory(self._limits.memory)
        if self._lost:
            return TaskOutcome(
                EndReason.SIGNALLED,
                None,
                signal.SIGKILL,
                "killed: the job's warm sandbox on this node ended while it ran",
            )
        return super()._outcome_of(returncode)

    def _release(self) -> None:
        if self._tree_gone:
            self._sandbox.give_back(self._group, self._limits, self._oom_killed)
        else:
            self._group.remove()  # fails while anything is left: the sweep at exit gets it
        self._sandbox.task_done()


def _request(task_id: int, launch: TaskLaunch) -> bytes:
    """What the launcher is sent: NUL-terminated fields, which C and a bare Python read alike
    (see warm_launcher.py). Raises WarmUnavailable for a launch that cannot be sent so."""
    env = launch.environment(launch.sandbox_workdir)
    fields = [str(task_id), launch.sandbox_workdir, str(len(launch.argv)), *launch.argv]
    fields += [f"{name}={value}" for name, value in env.items()]
    encoded = [os.fsencode(field) for field in fields]
    if any(b"\0" in field for field in encoded):
        raise WarmUnavailable("an argument or environment variable holds a NUL byte")
    request = b"\0".join(encoded) + b"\0"
    if len(request) > MAX_REQUEST_BYTES:
        raise WarmUnavailable("the launch is too large to send")
    return request


def _launcher_record(message: bytes) -> tuple[int, dict[str, Any]]:
    """What the launcher said about a task: "<id> started <pid>", "<id> status <wait status>",
    "<id> failed <reason>" or "<id> error <reason>". Raises ValueError for anything else."""
    task, word, value = message.decode(errors="replace").split(" ", 2)
    if word in ("started", "status"):
        return int(task), {word: int(value)}
    if word in ("failed", "error"):
        return int(task), {word: value}
    raise ValueError(word)


async def _receive(sock: socket.socket) -> bytes:
    """One message from a non-blocking SOCK_SEQPACKET socket (b"" at EOF)."""
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await readable(sock.fileno())
