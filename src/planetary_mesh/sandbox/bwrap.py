"""Tasks inside bubblewrap: their own PID, network, IPC and mount namespaces, the host's /usr read
only, the work directory at /work, and nothing else of the host (DESIGN.md §5).

How the whole tree is killed and known to be gone: bwrap's first child is the init (PID 1) of the
task's PID namespace. When that init dies the kernel kills every process in the namespace, and
daemonised ones too; the init only finishes dying once all of them are reaped. So we learn the
init's host pid from ``--json-status-fd``, hold a pidfd on it, SIGKILL it (and bwrap) to kill the
task, and take "the pidfd is readable" to mean "nothing of the task is left". Waiting for bwrap
alone is not enough: bwrap exits as soon as the command does, and the init it leaves behind (killed
through --die-with-parent) was seen still alive right after bwrap was reaped in 30 runs out of 30.

How bwrap reports the end: its exit status is the command's exit code, or 128 + N when a signal N
killed the command (we read that back as SIGNALLED N, so a command that itself exits 130 is read as
killed by SIGINT). Its ``{"exit-code": N}`` status line is written only if the command was
actually exec'd: without it the command never ran, and the last output line is bwrap's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.limits import CgroupBackend, TaskCgroup, set_rlimits
from planetary_mesh.sandbox.reaper import start_reaper
from planetary_mesh.sandbox.runner import (
    OUTPUT_GRACE_S,
    OutputSink,
    ProcessPipes,
    ProcessTask,
    RunningTask,
    TaskLaunch,
    TaskOutcome,
)
from planetary_mesh.sandbox.user import TaskUser

log = logging.getLogger(__name__)

TMP_BYTES = 256 * 1024 * 1024  # size of the task's private /tmp (a tmpfs)
SHM_BYTES = 64 * 1024 * 1024  # size of its /dev/shm (POSIX shared memory, semaphores)
SETUP_TIMEOUT_S = 10.0  # bwrap makes a sandbox in milliseconds; this long means it is stuck
TREE_GONE_TIMEOUT_S = 30.0  # a process stuck in the kernel (D state) can hold a namespace up
ABANDON_TIMEOUT_S = 2.0  # for a task killed during its set-up to leave its cgroup
_SIGNAL_BASE = 128  # bwrap, like a shell, exits 128 + N for a command killed by signal N
_MAX_SIGNAL = 64


class BwrapRunner:
    """Runs each task in a fresh bubblewrap sandbox."""

    name = "bwrap"
    sandboxed = True

    def __init__(
        self,
        executable: str | None = None,
        user: TaskUser | None = None,
        cgroups: CgroupBackend | None = None,
    ) -> None:
        found = executable or shutil.which("bwrap")
        if found is None:
            raise SandboxError("bubblewrap (bwrap) is not installed")
        self.executable = found
        self.user = user
        self.cgroups = cgroups
        self._has_lib64 = Path("/usr/lib64").is_dir()
        # With task cgroups, a watchdog sweeps them should this process die without closing.
        self._reaper_pipe = (
            start_reaper(cgroups.tag) if cgroups is not None and cgroups.controllers else None
        )

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()
        if self._reaper_pipe is not None:
            os.close(self._reaper_pipe)  # the watchdog sees EOF, finds nothing left, and exits
            self._reaper_pipe = None

    def describe(self) -> str:
        who = f"as {self.user.name}" if self.user else "as the agent's user"
        if self.cgroups is None or not self.cgroups.controllers:
            limits = "no cgroups"
        else:
            limits = f"{self.cgroups.name} ({', '.join(self.cgroups.controllers)})"
        return f"bwrap {who}; {limits}; rlimits; private /tmp {TMP_BYTES // 2**20}M"

    def command(self, launch: TaskLaunch, status_fd: int | None = None) -> list[str]:
        """The bwrap command line that runs ``launch``."""
        argv = [*(self.user.setpriv() if self.user else []), self.executable]
        if status_fd is not None:
            argv += ["--json-status-fd", str(status_fd)]
        argv += ["--unshare-all"]
        if launch.network:
            argv += ["--share-net"]
        # As root, bwrap without a user namespace and --cap-drop would let the task remount /usr.
        argv += ["--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
        argv += ["--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
        argv += ["--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib"]
        if self._has_lib64:  # the dynamic loader lives there on x86-64
            argv += ["--symlink", "usr/lib64", "/lib64"]
        argv += ["--symlink", "usr/sbin", "/sbin", "--proc", "/proc", "--dev", "/dev"]
        argv += ["--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
        argv += ["--size", str(SHM_BYTES), "--tmpfs", "/dev/shm"]
        argv += ["--bind", str(launch.workdir.resolve()), "/work", "--chdir", "/work"]
        # Only /work, /tmp and /dev/shm are writable (and sized): not the sandbox's own root
        # or /dev, which are unsized in-memory file systems.
        argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
        argv += ["--clearenv"]
        for name, value in launch.environment("/work").items():
            argv += ["--setenv", name, value]
        return [*argv, "--", *launch.argv]

    async def start(self, launch: TaskLaunch, on_output: OutputSink) -> RunningTask:
        launch.check_workdir()
        loop = asyncio.get_running_loop()
        if self.user is not None:
            _hand_over(launch.workdir, self.user)
        group = None
        if self.cgroups is not None and launch.limits is not None:
            try:
                group = self.cgroups.create(launch.limits)
            except OSError as error:
                raise SandboxError(f"cannot make the task's cgroup: {error}") from error
        procs = [] if group is None else group.procs_files()

        def enter_limits() -> None:
            # In the child, before it execs: join the task's cgroup (so all it starts is
            # counted there from the first instruction) and take the rlimits.
            pid = str(os.getpid())
            for path in procs:
                with open(path, "w") as handle:
                    handle.write(pid)
            set_rlimits()

        status_read, status_write = os.pipe()
        transport: asyncio.SubprocessTransport | None = None
        status_transport: asyncio.ReadTransport | None = None
        bwrap_pidfd: int | None = None
        try:
            try:
                # Spawned from the event loop's thread, which lives as long as the agent:
                # bwrap's --die-with-parent fires when the *thread* that forked it ends.
                transport, pipes = await loop.subprocess_exec(
                    functools.partial(ProcessPipes, on_output),
                    *self.command(launch, status_write),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=(status_write,),
                    env={},  # bwrap needs none; the task's comes from --setenv
                    preexec_fn=enter_limits,
                )
            except (OSError, subprocess.SubprocessError) as error:
                raise SandboxError(f"cannot run bwrap ({self.executable}): {error}") from error
            finally:
                os.close(status_write)
            bwrap_pidfd = _pidfd_open(transport.get_pid())
            status_transport, status = await loop.connect_read_pipe(
                _StatusPipe,
                open(status_read, "rb", buffering=0),  # noqa: SIM115 - the transport closes it
            )
            status_read = -1  # the transport owns it now
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
            _kill(bwrap_pidfd)
            _close(bwrap_pidfd)
            if status_read >= 0:
                os.close(status_read)
            for closing in (transport, status_transport):
                if closing is not None:
                    closing.close()
            if group is not None:
                _abandon(group)
            if isinstance(error, TimeoutError):
                raise SandboxError(f"bwrap made no sandbox in {SETUP_TIMEOUT_S:g}s") from error
            raise
        return _BwrapTask(
            launch, transport, pipes, status, status_transport, bwrap_pidfd, info, group
        )


class _BwrapTask(ProcessTask):
    def __init__(
        self,
        launch: TaskLaunch,
        transport: asyncio.SubprocessTransport,
        pipes: ProcessPipes,
        status: _StatusPipe,
        status_transport: asyncio.ReadTransport,
        bwrap_pidfd: int | None,
        info: dict[str, object],
        group: TaskCgroup | None,
    ) -> None:
        self._group = group
        self._memory = launch.limits.memory if launch.limits else None
        self._status = status
        self._status_transport = status_transport
        self._bwrap_pidfd = bwrap_pidfd
        self._init_pidfd = _sandbox_init_pidfd(info)
        super().__init__(launch, transport, pipes)

    def _kill_tree(self) -> None:
        # Either kill alone takes the namespace down; both at once is quickest and does not lean
        # on --die-with-parent alone. The cgroup, where there is one, catches anything else.
        _kill(self._init_pidfd)
        _kill(self._bwrap_pidfd)
        if self._group is not None:
            self._group.kill()

    async def _wait_tree_gone(self) -> None:
        if self._init_pidfd is not None:
            try:
                await asyncio.wait_for(_readable(self._init_pidfd), TREE_GONE_TIMEOUT_S)
            except TimeoutError:
                log.error(
                    "task %d: its sandbox is still not gone %gs after it was killed; giving up",
                    self.pid,
                    TREE_GONE_TIMEOUT_S,
                )
        # bwrap writes its exit-code line before it exits, so this is at hand already.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._status.closed), OUTPUT_GRACE_S)

    def _outcome_of(self, returncode: int) -> TaskOutcome:
        if self._group is not None and self._group.oom_killed():
            return TaskOutcome.out_of_memory(self._memory)
        if returncode < 0:  # bwrap itself was killed, and not by us
            return TaskOutcome.signalled(-returncode)
        if self._status.exit_code is None:
            reason = self._pipes.last_line() or f"bwrap failed with exit status {returncode}"
            return TaskOutcome.could_not_start(reason)
        if _SIGNAL_BASE < returncode <= _SIGNAL_BASE + _MAX_SIGNAL:
            return TaskOutcome.signalled(returncode - _SIGNAL_BASE)
        return TaskOutcome.exited(returncode)

    def _release(self) -> None:
        if self._group is not None:
            self._group.remove()  # empty now: the whole tree is gone
        self._status_transport.close()
        _close(self._init_pidfd)
        _close(self._bwrap_pidfd)
        self._init_pidfd = self._bwrap_pidfd = None


class _StatusPipe(asyncio.Protocol):
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


def _abandon(group: TaskCgroup) -> None:
    """Kill all of a task that never got going, wait (briefly) for it to die, free its cgroup."""
    deadline = time.monotonic() + ABANDON_TIMEOUT_S
    while True:
        group.kill()
        if group.empty() or time.monotonic() > deadline:
            break
        time.sleep(0.005)  # dying processes leave the cgroup within milliseconds
    group.remove()


def _hand_over(workdir: Path, user: TaskUser) -> None:
    """Give the task user its work directory (and the inputs in it), and only it."""
    for path in (workdir, *workdir.rglob("*")):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
    workdir.chmod(0o700)


def _sandbox_init_pidfd(info: dict[str, object]) -> int | None:
    """A pidfd on the sandbox's init, or None if it is gone already (then so is its namespace)."""
    pid = info.get("child-pid")
    if not isinstance(pid, int):
        return None
    pidfd = _pidfd_open(pid)
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


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _kill(pidfd: int | None) -> None:
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


async def _readable(fd: int) -> None:
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


def bwrap_problem(executable: str, user: TaskUser | None = None) -> str | None:
    """Why ``executable`` cannot make our sandbox on this machine (as ``user``), or None."""
    runner = BwrapRunner(executable, user)
    with tempfile.TemporaryDirectory(prefix="pm-bwrap-probe-") as workdir:
        if user is not None:
            _hand_over(Path(workdir), user)
        launch = TaskLaunch(argv=("true",), env={}, workdir=Path(workdir), timeout=None)
        try:
            done = subprocess.run(
                runner.command(launch), capture_output=True, env={}, timeout=SETUP_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"bubblewrap (bwrap) cannot make a sandbox here ({error})"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    detail = lines[-1] if lines else f"exit status {done.returncode}"
    return f"bubblewrap (bwrap) cannot make a sandbox here ({detail})"
