"""Tasks inside bubblewrap: their own PID, network, IPC and mount namespaces, the host's /usr read
only, the work directory at /work/<its name>, and nothing else of the host (DESIGN.md §5). Each
task in a fresh sandbox of its own, or in its job's warm sandbox (warm.py, ADR 8).

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
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.bwrap_spawn import (
    SETUP_TIMEOUT_S,
    Spawned,
    abandon,
    close_fd,
    hand_over,
    kill,
    readable,
    sandbox_init_pidfd,
    spawn_bwrap,
)
from planetary_mesh.sandbox.launchers import LAUNCHER_INSIDE, Launcher, prepare_launcher
from planetary_mesh.sandbox.limits import (
    RLIMITS,
    CgroupBackend,
    TaskCgroup,
    move_warmer,
    open_procs,
)
from planetary_mesh.sandbox.reaper import start_reaper
from planetary_mesh.sandbox.runner import (
    OUTPUT_GRACE_S,
    OutputSink,
    ProcessPipes,
    ProcessTask,
    RunningTask,
    TaskLaunch,
    TaskOutcome,
    make_workdir,
)
from planetary_mesh.sandbox.scratch import make_scratch
from planetary_mesh.sandbox.user import TaskUser
from planetary_mesh.sandbox.warm import WarmMode
from planetary_mesh.sandbox.warm_pool import MAX_WARM_SANDBOXES, WARM_IDLE_S, WarmPool

log = logging.getLogger(__name__)

TMP_BYTES = 256 * 1024 * 1024  # size of the task's private /tmp (a tmpfs)
SHM_BYTES = 64 * 1024 * 1024  # size of its /dev/shm (POSIX shared memory, semaphores)
TREE_GONE_TIMEOUT_S = 30.0  # a process stuck in the kernel (D state) can hold a namespace up
# The tasks' rlimits as the launcher and its helper mode read them: "RLIMIT_CORE=0,...".
_RLIMITS_SPEC = ",".join(f"{name}={value}" for name, value in RLIMITS.items())
_SIGNAL_BASE = 128  # bwrap, like a shell, exits 128 + N for a command killed by signal N
_MAX_SIGNAL = 64


class BwrapRunner:
    """Runs each task in a bubblewrap sandbox: a fresh one, or its job's warm one (warm.py)."""

    name = "bwrap"
    sandboxed = True

    def __init__(
        self,
        executable: str | None = None,
        user: TaskUser | None = None,
        cgroups: CgroupBackend | None = None,
        warm: WarmMode = WarmMode.AUTO,
        warm_idle_s: float = WARM_IDLE_S,
        warm_pool_size: int = MAX_WARM_SANDBOXES,
        native_launcher: bool = True,
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
        self._move_warmer = None if cgroups is None else move_warmer(cgroups)
        # Warm sandboxes rely on task cgroups to kill a task whole, and run a launcher: the
        # task user must be able to reach the copy bwrap binds (see launchers.py).
        self._launcher_dir = make_scratch("launcher")
        self._launcher_dir.chmod(0o711)
        self.launcher: Launcher | None = None
        if self._reaper_pipe is not None:
            # Fresh sandboxes use the C one too, as a helper that starts bwrap (see _helper).
            self.launcher = prepare_launcher(self._launcher_dir, native_launcher)
        self.warm = (
            None
            if self.launcher is None or cgroups is None or warm is WarmMode.OFF
            else WarmPool(
                warm,
                self.warm_command,
                cgroups,
                self.executable,
                warm_idle_s,
                warm_pool_size,
            )
        )

    def close(self) -> None:
        if self._move_warmer is not None:
            self._move_warmer.close()
        if self.warm is not None:
            self.warm.close()
        shutil.rmtree(self._launcher_dir, ignore_errors=True)
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
        if self.warm is None:
            reuse = "fresh sandbox per task"
        elif self.warm.mode is WarmMode.ALWAYS:
            reuse = "warm sandbox per job, always"
        else:
            reuse = "warm sandbox per job"
        return f"bwrap {who}; {limits}; rlimits; private /tmp {TMP_BYTES // 2**20}M; {reuse}"

    def _bwrap(self, status_fd: int | None, by_helper: bool = False) -> list[str]:
        """bwrap, run as the task user: the C launcher's helper becomes it (``_helper``), or,
        with no helper, setpriv does."""
        drop = self.user.setpriv() if self.user and not by_helper else []
        argv = [*drop, self.executable]
        if status_fd is not None:
            argv += ["--json-status-fd", str(status_fd)]
        return argv

    def _namespaces(self, network: bool) -> list[str]:
        """What every sandbox is made of, before its work directory and command."""
        argv = ["--unshare-all"]
        if network:
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
        return argv

    # Only the work directories, /tmp and /dev/shm are writable (and sized): not the sandbox's
    # own root or /dev, which are unsized in-memory file systems.
    _READ_ONLY = ("--remount-ro", "/dev", "--remount-ro", "/")

    def command(
        self, launch: TaskLaunch, status_fd: int | None = None, by_helper: bool = False
    ) -> list[str]:
        """The bwrap command line that runs ``launch`` in a fresh sandbox of its own; with
        ``by_helper``, for the helper to start (see ``_helper``)."""
        inside = launch.sandbox_workdir
        argv = [*self._bwrap(status_fd, by_helper), *self._namespaces(launch.network)]
        argv += ["--bind", str(launch.workdir.resolve()), inside, "--chdir", inside]
        argv += _read_only_binds(launch.ro_binds)
        for device in launch.devices:
            argv += ["--dev-bind", device, device]
        argv += [*self._READ_ONLY, "--clearenv"]
        for name, value in launch.environment(inside).items():
            argv += ["--setenv", name, value]
        return [*argv, "--", *launch.argv]

    def warm_command(
        self,
        jobdir: Path,
        network: bool,
        ro_binds: tuple[str, ...],
        launcher_fds: list[int],
        status_fd: int,
    ) -> list[str]:
        """The bwrap command line of a warm sandbox: its launcher as PID 1, and the folder that
        holds its tasks' work directories at /work. ``launcher_fds``: its control socket, then its
        own cgroup.procs files; it takes the rlimits itself (see warm_launcher.py)."""
        assert self.launcher is not None  # no warm pool without one
        native = self.launcher.native
        argv = [*self._bwrap(status_fd, native), *self._namespaces(network), "--as-pid-1"]
        if native:
            # It joins the sandbox's cgroup, then execs bwrap: all bwrap forks is born there.
            argv = [*self._helper(launcher_fds[1:], rlimits=False), *argv]
        argv += ["--bind", str(jobdir.resolve()), "/work", "--chdir", "/work"]
        argv += ["--ro-bind", str(self.launcher.path), LAUNCHER_INSIDE]
        argv += _read_only_binds(ro_binds)
        argv += [*self._READ_ONLY, "--clearenv", "--", *self.launcher.argv]
        return [*argv, str(launcher_fds[0]), _RLIMITS_SPEC, *map(str, launcher_fds[1:])]

    def make_workdir(self, launch: TaskLaunch) -> None:
        # A new job's first task here takes a ready spare sandbox now, with the work directory
        # made ahead in it, rather than once its folders are made (see WarmPool.make_workdir).
        if self.warm is None or not self.warm.make_workdir(launch):
            make_workdir(launch.workdir)

    async def start(self, launch: TaskLaunch, on_output: OutputSink) -> RunningTask:
        launch.check_workdir()
        if self.user is not None:
            hand_over(launch.workdir, self.user)
        if self._move_warmer is not None:
            self._move_warmer.touch()
        if self.warm is not None and self.warm.enabled:
            running = await self.warm.spawn(launch, on_output)
            if running is not None:
                return running
        group = None
        if self.cgroups is not None and launch.limits is not None:
            try:
                group = self.cgroups.create(launch.limits)
            except OSError as error:
                raise SandboxError(f"cannot make the task's cgroup: {error}") from error
        helper = self.launcher is not None and self.launcher.native
        procs: list[int] = []
        if helper and group is not None:
            try:
                procs = open_procs(group)
            except OSError as error:
                abandon(group)
                raise SandboxError(f"cannot open the task's cgroup: {error}") from error
        try:
            spawned = await spawn_bwrap(
                lambda status_fd: (
                    [*self._helper(procs, rlimits=True), *self.command(launch, status_fd, True)]
                    if helper
                    else self.command(launch, status_fd)
                ),
                functools.partial(ProcessPipes, on_output),
                group,
                self.executable,
                pass_fds=tuple(procs),
                joins_itself=helper,
                joined=helper,
            )
        finally:
            for fd in procs:
                os.close(fd)
        return _BwrapTask(launch, spawned, group)

    def _helper(self, procs: list[int], rlimits: bool) -> list[str]:
        """The C launcher's helper mode before a sandbox's bwrap command: it joins the cgroup
        whose ``cgroup.procs`` are open on ``procs``, takes the rlimits (a warm sandbox's
        launcher takes them itself) and becomes the task user, then execs bwrap. Nothing of the
        sandbox is born outside its cgroup, and the agent's spawn needs no code between fork
        and exec (see spawn_bwrap)."""
        assert self.launcher is not None
        argv = [str(self.launcher.path), "--join", *map(str, procs)]
        if rlimits:
            argv += ["--rlimits", _RLIMITS_SPEC]
        if self.user is not None:
            argv += ["--user", f"{self.user.uid}:{self.user.gid}"]
        return [*argv, "--"]


class _BwrapTask(ProcessTask):
    def __init__(self, launch: TaskLaunch, spawned: Spawned, group: TaskCgroup | None) -> None:
        self._group = group
        self._memory = launch.limits.memory if launch.limits else None
        self._status = spawned.status
        self._status_transport = spawned.status_transport
        self._bwrap_pidfd = spawned.bwrap_pidfd
        self._init_pidfd = sandbox_init_pidfd(spawned.info)
        super().__init__(launch, spawned.transport, spawned.pipes)

    def _kill_tree(self) -> None:
        # Either kill alone takes the namespace down; both at once is quickest and does not lean
        # on --die-with-parent alone. The cgroup, where there is one, catches anything else.
        kill(self._init_pidfd)
        kill(self._bwrap_pidfd)
        if self._group is not None:
            self._group.kill()

    async def _wait_tree_gone(self) -> None:
        if self._init_pidfd is not None:
            try:
                await asyncio.wait_for(readable(self._init_pidfd), TREE_GONE_TIMEOUT_S)
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
        close_fd(self._init_pidfd)
        close_fd(self._bwrap_pidfd)
        self._init_pidfd = self._bwrap_pidfd = None


def _read_only_binds(paths: tuple[str, ...]) -> list[str]:
    argv = []
    for path in paths:
        argv += ["--ro-bind", path, path]
    return argv


def bwrap_problem(executable: str, user: TaskUser | None = None) -> str | None:
    """Why ``executable`` cannot make our sandbox on this machine (as ``user``), or None."""
    runner = BwrapRunner(executable, user)
    try:
        with tempfile.TemporaryDirectory(prefix="pm-bwrap-probe-") as workdir:
            if user is not None:
                hand_over(Path(workdir), user)
            launch = TaskLaunch(argv=("true",), env={}, workdir=Path(workdir), timeout=None)
            try:
                done = subprocess.run(
                    runner.command(launch), capture_output=True, env={}, timeout=SETUP_TIMEOUT_S
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                return f"bubblewrap (bwrap) cannot make a sandbox here ({error})"
    finally:
        runner.close()  # its launcher folder, left for the next agent's sweep before
    if done.returncode == 0:
        return None
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    detail = lines[-1] if lines else f"exit status {done.returncode}"
    return f"bubblewrap (bwrap) cannot make a sandbox here ({detail})"
