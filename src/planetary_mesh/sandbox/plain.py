"""Tasks without a sandbox: the operator's explicit opt-out (``--no-sandbox``) for hosts with no
working bubblewrap. A task here can do whatever the agent's user can.

The task runs in a new session whose id (and process group id) is the main process's pid. To
kill the tree we look for every process in that session or group and every descendant of those,
stop them all (a stopped process cannot fork, so nothing is born after we looked), look again
until nothing new turns up, then SIGKILL them and the group. After the main process exits, the
same sweep removes what it left behind.

Known gap, and the reason bwrap is the default: a process that calls setsid() and whose parent
then exits (the classic double fork of a daemon) is in no session, group or ancestry of ours, so
it survives here. It also keeps the output pipe open, which is why the end of output is only
waited for briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess

import psutil

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.runner import (
    OutputSink,
    ProcessPipes,
    ProcessTask,
    RunningTask,
    TaskLaunch,
    make_workdir,
)
from planetary_mesh.sandbox.user import TaskUser

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.005
TREE_GONE_TIMEOUT_S = 10.0  # a process stuck in the kernel (D state) cannot be killed
_MAX_ROUNDS = 100  # of stop-and-look; a tree grows only while we have not stopped all of it


class PlainRunner:
    """Runs each task as a plain child process of the agent."""

    name = "none"
    sandboxed = False
    user: TaskUser | None = None  # tasks run as the agent's own user

    def describe(self) -> str:
        return "none (UNSANDBOXED: --no-sandbox)"

    def close(self) -> None:
        pass

    def make_workdir(self, launch: TaskLaunch) -> None:
        make_workdir(launch.workdir)

    async def start(self, launch: TaskLaunch, on_output: OutputSink) -> RunningTask:
        launch.check_workdir()
        workdir = str(launch.workdir.resolve())
        loop = asyncio.get_running_loop()
        try:
            transport, pipes = await loop.subprocess_exec(
                functools.partial(ProcessPipes, on_output),
                *launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=launch.environment(workdir),  # the PATH in it is where argv[0] is looked up
                start_new_session=True,
            )
        except OSError as error:
            raise SandboxError(f"{launch.argv[0]}: {error.strerror or error}") from error
        return _PlainTask(launch, transport, pipes)


class _PlainTask(ProcessTask):
    def _kill_tree(self) -> None:
        _stop_and_kill(self.pid)

    async def _wait_tree_gone(self) -> None:
        # Sweeps block the event loop for a scan of the process table (milliseconds); acceptable
        # for the opt-out runner, and they stop once a scan finds nothing.
        deadline = asyncio.get_running_loop().time() + TREE_GONE_TIMEOUT_S
        while left := _stop_and_kill(self.pid):
            if asyncio.get_running_loop().time() > deadline:
                log.error(
                    "task %d: processes %s survive SIGKILL; giving up on them",
                    self.pid,
                    sorted(p.pid for p in left),
                )
                return
            await asyncio.sleep(SWEEP_INTERVAL_S)


def _stop_and_kill(leader: int) -> list[psutil.Process]:
    """SIGKILL the task led by ``leader``; returns the processes that were still alive."""
    found: dict[int, psutil.Process] = {}
    for _ in range(_MAX_ROUNDS):
        new = [p for p in _task_processes(leader) if p.pid not in found]
        if not new:
            break
        for proc in new:
            found[proc.pid] = proc
            _send(proc, signal.SIGSTOP)
    with contextlib.suppress(OSError):
        os.killpg(leader, signal.SIGKILL)
    for proc in found.values():
        _send(proc, signal.SIGKILL)
    return list(found.values())


def _task_processes(leader: int) -> list[psutil.Process]:
    """Live processes in the session or group of ``leader``, and all their descendants.

    Looked up by session and group, not only by parent: an orphan is handed to init and keeps no
    parent link to the task, only its session and group.
    """
    children: dict[int, list[psutil.Process]] = {}
    members: list[psutil.Process] = []
    for proc in psutil.process_iter(["ppid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:  # already dead: runs nothing, holds nothing
            continue
        children.setdefault(proc.info["ppid"], []).append(proc)
        try:
            if proc.pid == leader or leader in (os.getsid(proc.pid), os.getpgid(proc.pid)):
                members.append(proc)
        except OSError:  # gone meanwhile
            continue
    tree: dict[int, psutil.Process] = {}
    stack = members
    while stack:
        proc = stack.pop()
        if proc.pid not in tree:
            tree[proc.pid] = proc
            stack.extend(children.get(proc.pid, []))
    return list(tree.values())


def _send(proc: psutil.Process, signum: signal.Signals) -> None:
    # psutil checks the process is still the one it found (not a reused pid) before signalling.
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signum)
