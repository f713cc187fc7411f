"""How a task's processes are started, watched and killed: what every runner promises, and the
process plumbing the runners share.

A :class:`Runner` turns a :class:`TaskLaunch` into a :class:`RunningTask`, whose ``wait()`` gives
one :class:`TaskOutcome` and only once *nothing* the task started is still alive. A task that is
reported finished while a daemonised child still writes into its work directory would hand that
directory, and its CPU, to whatever comes next.

Failing to start shows up in one of two places, and the caller treats both alike:

- ``start()`` raises :class:`SandboxError` when nothing could be started at all (the command or
  the bwrap binary is missing, bwrap gave up before it made the sandbox). The message says what
  went wrong without a "could not start" prefix, which the caller adds.
- ``wait()`` returns ``EndReason.SANDBOX_ERROR`` when bwrap made the sandbox but the command never
  ran in it (a bind failed, the command was not found inside).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.limits import Limits
from planetary_mesh.sandbox.user import TaskUser
from planetary_mesh.units import format_size

log = logging.getLogger(__name__)

OutputSink = Callable[[bytes], None]

DEFAULT_PATH = "/usr/bin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Once the process tree is gone its output pipe reaches EOF at once, unless something we could
# not find (the unsandboxed runner's setsid + double-fork escape) holds it open: stop reading then.
OUTPUT_GRACE_S = 0.5
DISK_CHECK_INTERVAL_S = 1.0
# How much output to keep for error messages: bwrap's own complaint is its last line.
_TAIL_BYTES = 2048


class EndReason(StrEnum):
    """Why a task ended, in the plain words users read (and the coordinator stores)."""

    EXITED = "exited"  # the command exited, with any exit code
    SIGNALLED = "signalled"  # a signal that did not come from us killed it
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    OOM = "oom"  # killed for going over its declared memory
    DISK_QUOTA = "disk_quota"  # killed for filling its work directory past the quota
    SANDBOX_ERROR = "sandbox_error"  # the command never ran


@dataclass(frozen=True)
class TaskLaunch:
    """Everything a runner needs to start one task. Checked on creation, so a bad one fails early.

    ``env`` is the task's whole environment, over defaults for PATH (``/usr/bin:/bin``) and HOME
    (the work directory as the task sees it); PWD is set to that directory too.
    """

    argv: tuple[str, ...]
    env: Mapping[str, str]
    workdir: Path  # a host directory, already created and holding the inputs; the task's cwd
    timeout: float | None  # wall-clock seconds from start
    network: bool = False
    limits: Limits | None = None  # enforced where the runner can (cgroups, rlimits)
    # Launches with the same key may share one warm sandbox: tasks of one job, so the same
    # command owner, limits and network, each still in its own work directory. Their work
    # directories must then share a parent, which the warm sandbox shows at /work.
    share: str | None = None
    share_size: int = 1  # how many tasks the key has in all: whether a warm sandbox pays
    # Host folders a sandbox shows read only at the same path (a Python worker's code and the
    # agent's site-packages); a runner without a sandbox shows everything anyway.
    ro_binds: tuple[str, ...] = ()
    # Device files (a GPU's) a sandbox shows at the same path; others of the host stay hidden.
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.argv:
            raise SandboxError("the task has no command to run")
        if any("\0" in arg for arg in self.argv):
            raise SandboxError("the task's command holds a NUL character")
        for name, value in self.env.items():
            if not _ENV_NAME.fullmatch(name):
                raise SandboxError(
                    f"environment variable name {name!r} is not allowed: use letters, digits"
                    " and _, not starting with a digit"
                )
            if "\0" in value:
                raise SandboxError(f"environment variable {name} holds a NUL character")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise SandboxError(f"timeout must be a positive number of seconds, not {self.timeout}")

    def environment(self, cwd: str) -> dict[str, str]:
        """The task's environment when its work directory appears at ``cwd``."""
        return {"PATH": DEFAULT_PATH, "HOME": cwd, **self.env, "PWD": cwd}

    @property
    def sandbox_workdir(self) -> str:
        """Where a sandbox shows the work directory: /work/<its name>, in a fresh sandbox and in
        a warm one alike (there /work holds the directories of all the job's tasks)."""
        return f"/work/{self.workdir.name}"

    def check_workdir(self) -> None:
        if not self.workdir.is_dir():
            raise SandboxError(f"the task's work directory {self.workdir} does not exist")


@dataclass(frozen=True)
class TaskOutcome:
    reason: EndReason
    exit_code: int | None  # set for EXITED
    signal: int | None  # set for SIGNALLED
    message: str  # one sentence for people

    @classmethod
    def exited(cls, code: int) -> TaskOutcome:
        return cls(EndReason.EXITED, code, None, f"exit code {code}")

    @classmethod
    def signalled(cls, signum: int) -> TaskOutcome:
        return cls(EndReason.SIGNALLED, None, signum, f"killed by signal {signal_name(signum)}")

    @classmethod
    def timed_out(cls, seconds: float) -> TaskOutcome:
        return cls(EndReason.TIMEOUT, None, None, f"timed out after {seconds:g}s")

    @classmethod
    def cancelled(cls, why: str) -> TaskOutcome:
        return cls(EndReason.CANCELLED, None, None, f"cancelled: {why}")

    @classmethod
    def out_of_memory(cls, limit: int | None) -> TaskOutcome:
        over = f" (over its {format_size(limit)} limit)" if limit else ""
        return cls(EndReason.OOM, None, None, f"killed: out of memory{over}")

    @classmethod
    def over_disk_quota(cls, quota: int) -> TaskOutcome:
        return cls(
            EndReason.DISK_QUOTA,
            None,
            None,
            f"killed: its work directory grew past the {format_size(quota)} disk quota",
        )

    @classmethod
    def could_not_start(cls, detail: str) -> TaskOutcome:
        return cls(EndReason.SANDBOX_ERROR, None, None, f"could not start: {detail}")


def disk_usage(root: Path) -> int:
    """Bytes of disk the files under ``root`` take (allocated blocks; links not followed)."""
    total = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += info.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return total


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunningTask(Protocol):
    pid: int

    async def wait(self) -> TaskOutcome:
        """The outcome, once the task and all its descendants are gone; enforces the timeout."""
        ...

    def cancel(self, why: str) -> None:
        """Kill the whole tree now; idempotent. A task that has already ended keeps its outcome."""
        ...


class Runner(Protocol):
    name: str  # "bwrap" or "none", as the agent reports it
    sandboxed: bool
    user: TaskUser | None  # whom tasks run as, if not the agent's own user

    def describe(self) -> str:
        """What this runner enforces, in a line for `mesh nodes`."""
        ...

    def close(self) -> None:
        """Release what the runner holds (its cgroup subtree) when the agent stops."""
        ...

    def make_workdir(self, launch: TaskLaunch) -> None:
        """Make the launch's work directory, and its job's folder above it, empty; the caller
        puts the task's inputs in, then starts it."""
        ...

    async def start(self, launch: TaskLaunch, on_output: OutputSink) -> RunningTask:
        """Start the task; stdout and stderr come merged to ``on_output`` in chunks as read."""
        ...


def make_workdir(workdir: Path) -> None:
    """A task's work directory, for the task user only, in its job's folder, which the task
    user may pass through but not list."""
    workdir.parent.mkdir(mode=0o711, exist_ok=True)
    workdir.mkdir(mode=0o700, exist_ok=True)


def default_runner(allow_unsandboxed: bool, warm: str = "auto") -> Runner:
    """bwrap when it is installed and works here; unsandboxed only when the operator asked."""
    # Imported here because both runners import this module.
    from planetary_mesh.sandbox.bwrap import BwrapRunner, bwrap_problem
    from planetary_mesh.sandbox.limits import detect_cgroups, reap_stale_task_cgroups
    from planetary_mesh.sandbox.plain import PlainRunner
    from planetary_mesh.sandbox.scratch import sweep_scratch
    from planetary_mesh.sandbox.user import task_user
    from planetary_mesh.sandbox.warm import WarmMode

    executable = shutil.which("bwrap")
    if executable is None:
        problem = "bubblewrap (bwrap) is not installed"
        remedy = "install it (apt-get install bubblewrap)"
    else:
        user = task_user()
        problem = bwrap_problem(executable, user) or ""
        remedy = "make bwrap work for this user (it needs user namespaces)"
        if not problem:
            stale = reap_stale_task_cgroups()
            if stale:
                log.warning("killed %d processes left behind by agents that died", stale)
            sweep_scratch()  # folders of agents that died outright
            return BwrapRunner(executable, user, detect_cgroups(), WarmMode(warm))
    if not allow_unsandboxed:
        raise SandboxError(
            f"{problem}, so tasks cannot be sandboxed: {remedy} or start the agent with"
            " --no-sandbox to run tasks unsandboxed"
        )
    log.warning(
        "RUNNING TASKS WITHOUT A SANDBOX (--no-sandbox): %s. Every task can read, change and"
        " delete whatever this agent's user can, and reach the network.",
        problem,
    )
    return PlainRunner()


class ProcessPipes(asyncio.SubprocessProtocol):
    """Hands the merged output on as it is read, and says when the process and its output end."""

    def __init__(self, on_output: OutputSink) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        self._on_output = on_output
        self._tail = b""

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self._tail = (self._tail + data)[-_TAIL_BYTES:]
        try:
            self._on_output(data)
        except Exception:
            # A broken consumer must not stop the reading: the task would block on a full pipe.
            log.exception("the task output callback failed; output is lost, the task goes on")

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def last_line(self) -> str:
        lines = self._tail.decode(errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else ""


class OutputPipe(ProcessPipes):
    """The same, for output that comes on a pipe of its own, from a process that is not the
    agent's child: whoever learns of the process's end sets ``exited``."""

    def data_received(self, data: bytes) -> None:
        self.pipe_data_received(1, data)

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe_connection_lost(1, exc)


class SupervisedTask:
    """A running task: its timeout, cancel, disk quota and end, whoever started its process.

    The main process's exit decides the outcome (unless we killed it first); then whatever is left
    of the tree is killed and waited for. Subclasses say how to kill the tree (synchronously, so
    that ``cancel`` and the timeout act at once), how to know it is gone, how to read an exit
    status, and what to close at the end. ``pipes.exited`` must come true when the main process
    has ended, and ``pipes.output_closed`` when its output reaches EOF.
    """

    def __init__(self, launch: TaskLaunch, pid: int, pipes: ProcessPipes) -> None:
        loop = asyncio.get_running_loop()
        self.pid: int = pid
        self._pipes = pipes
        self._ending: TaskOutcome | None = None  # why we killed it; wins over its exit status
        timeout = launch.timeout
        self._timer = (
            None
            if timeout is None
            else loop.call_later(timeout, self._end, TaskOutcome.timed_out(timeout))
        )
        self._outcome = loop.create_task(self._supervise())
        quota = launch.limits.disk if launch.limits else None
        self._disk_watch = (
            None if quota is None else loop.create_task(self._watch_disk(launch.workdir, quota))
        )

    async def _watch_disk(self, workdir: Path, quota: int) -> None:
        """The work directory sits on the host's disk: kill the task once it outgrows its
        quota. Checked every second, so the overshoot is bounded by a second of writing (and
        any one file by RLIMIT_FSIZE)."""
        while True:
            await asyncio.sleep(DISK_CHECK_INTERVAL_S)
            used = await asyncio.to_thread(disk_usage, workdir)
            if used > quota:
                self._end(TaskOutcome.over_disk_quota(quota))
                return

    async def wait(self) -> TaskOutcome:
        # Shielded: a caller that stops waiting must not stop the supervision of the tree.
        return await asyncio.shield(self._outcome)

    def cancel(self, why: str) -> None:
        self._end(TaskOutcome.cancelled(why))

    def _end(self, outcome: TaskOutcome) -> None:
        if self._ending is not None or self._pipes.exited.done():
            return
        self._ending = outcome
        self._kill_tree()

    async def _supervise(self) -> TaskOutcome:
        try:
            await self._pipes.exited
            if self._timer is not None:
                self._timer.cancel()
            ending = self._ending
            returncode = self._returncode()
            # What the main process started ends with it: the task is one unit.
            self._kill_tree()
            await self._wait_tree_gone()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pipes.output_closed), OUTPUT_GRACE_S)
            return ending or self._outcome_of(returncode)
        except BaseException:
            self._kill_tree()  # the loop is shutting down: leave nothing running behind
            raise
        finally:
            if self._disk_watch is not None:
                self._disk_watch.cancel()
            self._close_io()  # after this no more output is delivered
            self._release()

    def _returncode(self) -> int:
        """The main process's end, as asyncio gives it: the exit code, or -N for signal N."""
        raise NotImplementedError

    def _close_io(self) -> None:
        raise NotImplementedError

    def _kill_tree(self) -> None:
        raise NotImplementedError

    async def _wait_tree_gone(self) -> None:
        raise NotImplementedError

    def _outcome_of(self, returncode: int) -> TaskOutcome:
        """The outcome of a main process that ended by itself (``returncode`` as asyncio gives)."""
        if returncode < 0:
            return TaskOutcome.signalled(-returncode)
        return TaskOutcome.exited(returncode)

    def _release(self) -> None:
        """Free what the subclass holds (file descriptors) once the task is over."""


class ChildProcess(Protocol):
    """A child of the agent's: an asyncio subprocess transport, or bwrap's BwrapProcess."""

    def get_pid(self) -> int: ...

    def get_returncode(self) -> int | None: ...

    def close(self) -> None: ...


class ProcessTask(SupervisedTask):
    """A task whose main process is a child of the agent."""

    def __init__(
        self,
        launch: TaskLaunch,
        transport: ChildProcess,
        pipes: ProcessPipes,
    ) -> None:
        self._transport = transport
        super().__init__(launch, transport.get_pid(), pipes)

    def _returncode(self) -> int:
        returncode = self._transport.get_returncode()
        assert returncode is not None  # the process has exited
        return returncode

    def _close_io(self) -> None:
        self._transport.close()
