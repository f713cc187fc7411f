"""Starting bubblewrap and knowing its sandbox exists: shared by fresh and warm sandboxes.

bwrap reports on ``--json-status-fd``: a first line with the host pid of the process it runs as
the sandbox's PID 1 ("child-pid") once the namespaces exist, and an "exit-code" line only if the
command was exec'd. Without the first line bwrap gave up before it made the sandbox, and its
reason is the last line of its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.limits import TaskCgroup, join_cgroup, set_rlimits
from planetary_mesh.sandbox.runner import OUTPUT_GRACE_S, ProcessPipes
from planetary_mesh.sandbox.user import TaskUser

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 10.0  # bwrap makes a sandbox in milliseconds; this long means it is stuck
ABANDON_TIMEOUT_S = 2.0  # for a task killed during its set-up to leave its cgroup
CGROUP_POLL_S = 0.005  # killed processes leave their cgroup within milliseconds


@dataclass
class Spawned:
    """A bwrap whose sandbox exists, and what reads it."""

    transport: BwrapProcess
    pipes: ProcessPipes
    status: StatusPipe
    status_transport: asyncio.ReadTransport
    bwrap_pidfd: int | None
    info: dict[str, object]  # bwrap's first status line: "child-pid" and the namespaces


async def spawn_bwrap(
    command: Callable[[int], list[str]],
    pipes_factory: Callable[[], ProcessPipes],
    group: TaskCgroup | None,
    executable: str,
    pass_fds: tuple[int, ...] = (),
    joins_itself: bool = False,
    nice: int = 0,
    joined: bool = False,
) -> Spawned:
    """Run ``command(status_fd)`` in ``group`` with the rlimits, and wait for its sandbox.
    ``joins_itself``: the command joins ``group`` and takes the rlimits itself (the C
    launcher's helper mode, or a warm sandbox's launcher), so nothing runs between fork and exec
    and the spawn can vfork: forking the whole agent to run that code blocked its event loop for
    10 to 30 ms.

    ``joined``: the command joins ``group`` before it execs bwrap (the C launcher's helper), so
    bwrap needs no move after the spawn.

    ``nice``: the CPU priority bwrap (and so the sandbox it forks) starts at; the caller
    sets it back (`renice`) once the sandbox is ready.

    Raises SandboxError, having killed everything it started, when there is no sandbox.
    """
    loop = asyncio.get_running_loop()
    procs = [] if group is None else group.procs_files()

    def enter_limits() -> None:
        # In the child, before it execs: join the task's cgroup (so all it starts is
        # counted there from the first instruction), take the rlimits, and set every signal
        # to its default (as the C launcher's helper does).
        pid = str(os.getpid())
        for path in procs:
            with open(path, "w") as handle:
                handle.write(pid)
        set_rlimits()
        reset_signals()

    status_read, status_write = os.pipe()
    output_read, output_write = os.pipe()
    transport: BwrapProcess | None = None
    status_transport: asyncio.ReadTransport | None = None
    bwrap_pidfd: int | None = None
    try:
        try:
            # Spawned from the event loop's thread, which lives as long as the agent:
            # bwrap's --die-with-parent fires when the *thread* that forked it ends.
            popen = subprocess.Popen(
                command(status_write),
                stdin=subprocess.DEVNULL,
                stdout=output_write,
                stderr=output_write,
                pass_fds=(status_write, *pass_fds),
                env={},  # bwrap needs none; the task's comes from --setenv
                preexec_fn=None if joins_itself else enter_limits,
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise SandboxError(f"cannot run bwrap ({executable}): {error}") from error
        finally:
            os.close(status_write)
            os.close(output_write)
        transport = BwrapProcess(popen, pipes_factory())
        pipes = transport.pipes
        if joins_itself and not joined:
            # The launcher joins its cgroup itself, but bwrap forks the sandbox's first process
            # before that: with bwrap moved in now (it first parses and sets up for a while),
            # that process is most often born in the cgroup, where a kill, or the sweep after a
            # crashed agent, reaches it. (A warm sandbox's C launcher's helper has joined
            # already: a no-op move then.)
            join_cgroup(procs, popen.pid)
        if nice:
            # Set before bwrap forks the sandbox's init (it first parses and sets up), which
            # inherits it; a lost race costs only speed.
            renice(transport.get_pid(), nice)
        output_file = open(output_read, "rb", buffering=0)  # noqa: SIM115 - its transport closes it
        output_read = -1
        transport.output, _ = await loop.connect_read_pipe(
            functools.partial(_Output, pipes), output_file
        )
        bwrap_pidfd = pidfd_open(transport.get_pid())
        status_file = open(status_read, "rb", buffering=0)  # noqa: SIM115 - its transport closes it
        # Owned by the file from here: connect_read_pipe closes it if cancelled part way, and
        # closing it here too closed whatever had taken its number meanwhile (seen: EBADF).
        status_read = -1
        status_transport, status = await loop.connect_read_pipe(StatusPipe, status_file)
        info = await asyncio.wait_for(asyncio.shield(status.sandbox), SETUP_TIMEOUT_S)
        if info is None:
            # bwrap gave up before it made the sandbox; its reason is all the output there is.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pipes.output_closed, OUTPUT_GRACE_S)
            reason = pipes.last_line() or "bwrap exited before it made the sandbox"
            raise SandboxError(reason)
    except BaseException as error:
        # Failed or cancelled part way (the agent stopping while a task starts): nothing of
        # the task may go on, unwatched or stuck in bwrap's set-up, nor hold its cgroup.
        if transport is not None:
            # bwrap's child (the sandbox's first process) may be outside any cgroup yet (a
            # warm sandbox's launcher joins its own), and one whose parent died before it set
            # its parent-death signal was seen to wait for ever: kill it first, by name.
            kill_children(transport.get_pid())
        kill(bwrap_pidfd)
        close_fd(bwrap_pidfd)
        for unread in (status_read, output_read):
            if unread >= 0:
                os.close(unread)
        for closing in (transport, status_transport):
            if closing is not None:
                closing.close()
        if group is not None:
            abandon(group)
        if isinstance(error, TimeoutError):
            raise SandboxError(f"bwrap made no sandbox in {SETUP_TIMEOUT_S:g}s") from error
        raise
    return Spawned(transport, pipes, status, status_transport, bwrap_pidfd, info)


class BwrapProcess:
    """bwrap, a child of ours, watched through a pidfd; its output comes on a pipe of ours.

    Not asyncio's ``subprocess_exec``: cancelled part way (the agent stopping, or a runner
    closing, as a sandbox starts), CPython 3.11's waits for ever for output pipes it had not yet
    connected, and the event loop's shutdown waits with it (seen as a hung test). Here nothing
    is left half made: the process is watched from the moment it exists, and reaped when it
    exits (``pipes.process_exited`` then)."""

    def __init__(self, popen: subprocess.Popen[bytes], pipes: ProcessPipes) -> None:
        self.pipes = pipes
        self.output: asyncio.BaseTransport | None = None
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = os.pidfd_open(popen.pid)  # not reaped yet: it is ours
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._popen.poll() is None:
            return
        self._stop_watching()
        self.pipes.process_exited()

    def _stop_watching(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed already
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def get_pid(self) -> int:
        return self._popen.pid

    def get_returncode(self) -> int | None:
        return self._popen.returncode

    def close(self) -> None:
        """Close its output; kill it if it still runs (it is reaped once it has exited)."""
        if self.output is not None:
            with contextlib.suppress(RuntimeError):
                self.output.close()
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()  # still our unreaped child: the pid is its own


class _Output(asyncio.Protocol):
    """bwrap's merged stdout and stderr, handed to its ProcessPipes."""

    def __init__(self, pipes: ProcessPipes) -> None:
        self._pipes = pipes

    def data_received(self, data: bytes) -> None:
        self._pipes.pipe_data_received(1, data)

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipes.pipe_connection_lost(1, exc)


class StatusPipe(asyncio.Protocol):
    """Reads bwrap's ``--json-status-fd``: one JSON object a line, possibly in several reads.

    The first line (with "child-pid") comes once the namespaces exist; the "exit-code" line only
    if the command was exec'd. EOF comes when bwrap exits: the sandbox does not inherit the fd.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.sandbox: asyncio.Future[dict[str, object] | None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.exit_code: int | None = None
        self._buffer = b""

    def data_received(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("bwrap wrote a status line that is not JSON: %r", line)
                continue
            if not isinstance(record, dict):
                continue
            if "child-pid" in record and not self.sandbox.done():
                self.sandbox.set_result(record)
            if isinstance(record.get("exit-code"), int):
                self.exit_code = record["exit-code"]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.sandbox.done():
            self.sandbox.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)


_CATCHABLE_SIGNALS = tuple(
    number for number in signal.valid_signals() if number not in (signal.SIGKILL, signal.SIGSTOP)
)


def reset_signals() -> None:
    """Every signal to its default and none blocked, in a child about to exec bwrap: bwrap
    passes on the dispositions it gets, and an agent under ``nohup`` has SIGHUP ignored
    (ignored survives exec), which no task may inherit."""
    for number in _CATCHABLE_SIGNALS:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def abandon(group: TaskCgroup) -> None:
    """Kill all of a task that never got going, wait (briefly) for it to die, free its cgroup."""
    deadline = time.monotonic() + ABANDON_TIMEOUT_S
    while True:
        group.kill()
        # Empty as listed is not enough: a process still exiting keeps the cgroup busy.
        if group.empty() and group.remove():
            return
        if time.monotonic() > deadline:
            group.remove()  # a last try; what stays is the sweep's at the agent's exit
            return
        time.sleep(CGROUP_POLL_S)


class CgroupReaper:
    """Frees the cgroups of killed sandboxes without blocking the event loop: ``abandon``
    waits 5 ms at a time for the dead to leave, and a warm sandbox closing at an idle moment
    held up every task of its agent for that long. ``finish`` (at shutdown) waits for the
    rest."""

    def __init__(self) -> None:
        # Each with when to give up (remove it) and what to do with it once empty, if not
        # remove it.
        self._dying: list[tuple[TaskCgroup, float, Reuse | None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False

    def abandon(self, group: TaskCgroup, reuse: Reuse | None = None) -> None:
        """Kill what is in ``group``; once it is empty, remove it, or hand it to ``reuse``."""
        if self._finished:  # shutting down: no event loop turns left to count on
            abandon(group)
            return
        group.kill()
        if group.empty() and _emptied(group, reuse):
            return
        self._dying.append((group, time.monotonic() + ABANDON_TIMEOUT_S, reuse))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CGROUP_POLL_S, self._poll)

    def _poll(self) -> None:
        self._timer = None
        now = time.monotonic()
        dying, self._dying = self._dying, []
        for group, deadline, reuse in dying:
            if group.empty() and _emptied(group, reuse):
                continue
            if now > deadline:
                group.remove()  # a last try; what stays is the sweep's at the agent's exit
                continue
            group.kill()
            self._dying.append((group, deadline, reuse))
        if self._dying:
            self._timer = asyncio.get_running_loop().call_later(CGROUP_POLL_S, self._poll)

    def finish(self) -> None:
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for group, _, _ in self._dying:
            abandon(group)
        self._dying.clear()


Reuse = Callable[[TaskCgroup], None]


def _emptied(group: TaskCgroup, reuse: Reuse | None) -> bool:
    """Done with an empty cgroup: removed (False while it is still busy), or reused."""
    if reuse is None:
        return group.remove()
    reuse(group)
    return True


def hand_over(workdir: Path, user: TaskUser) -> None:
    """Give the task user its work directory (and the inputs in it), and only it."""
    for path in (workdir, *workdir.rglob("*")):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
    workdir.chmod(0o700)


def sandbox_init_pidfd(info: dict[str, object]) -> int | None:
    """A pidfd on the sandbox's init, or None if it is gone already (then so is its namespace)."""
    pid = info.get("child-pid")
    if not isinstance(pid, int):
        return None
    pidfd = pidfd_open(pid)
    if pidfd is None:
        return None
    # The pidfd pins the pid, so this check is free of races: is it still the process bwrap
    # named, and not a newcomer that reused its pid after a very short task?
    namespace = info.get("pid-namespace")
    with contextlib.suppress(OSError):
        if isinstance(namespace, int) and os.stat(f"/proc/{pid}/ns/pid").st_ino != namespace:
            os.close(pidfd)
            return None
    return pidfd


def kill_children(pid: int) -> None:
    """SIGKILL the children of ``pid`` (a process of ours, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            children = [int(child) for child in listing.read().split()]
    except OSError:
        return  # gone: its children, if any, were reparented and are out of reach by name
    for child in children:
        pidfd = pidfd_open(child)
        if pidfd is None:
            continue
        try:
            # The pidfd pins the process: is it still the child of ours, not a newcomer that
            # took its pid after it exited?
            with open(f"/proc/{child}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.close(pidfd)


def renice(pid: int | None, nice: int) -> None:
    """Set a process's CPU priority (the agent is root, so it may raise it back); a process
    gone already needs none."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)


def pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def kill(pidfd: int | None) -> None:
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def close_fd(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


async def readable(fd: int) -> None:
    """Wait until ``fd`` is readable: for a pidfd, until that process has exited."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
