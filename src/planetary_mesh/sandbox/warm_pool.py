"""The warm sandboxes of one runner (warm.py), by job, and the spares made ahead for new jobs.

A job's tasks on this agent share its warm sandbox; at most MAX_WARM_SANDBOXES are kept, each
closed once its job has had no task here for a while. An agent that has run a task also keeps
SPARES spare sandboxes, made ahead in its quiet moments at low CPU priority, so that a new
job's first task starts as quickly as its later ones: a spare is given to one job only, and
then is that job's sandbox like any other (ADR 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from planetary_mesh.sandbox.bwrap_spawn import CgroupReaper
from planetary_mesh.sandbox.limits import CgroupBackend, Limits, TaskCgroup
from planetary_mesh.sandbox.runner import OutputSink, RunningTask, TaskLaunch
from planetary_mesh.sandbox.warm import FreeCgroups, WarmMode, WarmSandbox, WarmUnavailable

log = logging.getLogger(__name__)

WARM_IDLE_S = 5.0  # a warm sandbox whose job has had no task here for this long is closed
MAX_WARM_SANDBOXES = 8  # at once per agent; more busy jobs at once get fresh sandboxes
SPARES = 3  # kept ready per agent once it runs tasks: one-task jobs come faster than one is made
SPARE_IDLE_S = 60.0  # a spare sandbox no job has taken for this long is closed
# A one-task job's sandbox is closed once its task is done: lingering (0.5 s), such sandboxes
# filled the pool and left no room for spares when one-task jobs came back to back. Not at once:
# closing it (~0.5 ms on the agent's event loop) then ran before the task's end was sent.
SINGLE_TASK_IDLE_S = 0.003
# A spare is made once the agent has started or ended no task for SPARE_QUIET_S (or, with tasks
# starting and ending back to back, SPARE_MAX_WAIT_S after it was wanted): spawning bwrap holds
# the agent's event loop ~1-3 ms (Popen forks the agent and waits for the exec), and made right
# after a task's start it sat between that task's end and its report (traced: a one-task job's
# end reached the coordinator 1-7 ms later).
SPARE_QUIET_S = 0.005
SPARE_MAX_WAIT_S = 0.1
# After a task's end only SPARE_AFTER_END_S: its end is reported by then, and a new job's task
# is ~5 ms away (the coordinator commits the end, answers, takes the next submit). Made
# SPARE_QUIET_S after the end, a spare (~7 ms of bwrap setting up namespaces and mounts, at low
# priority but holding the kernel's locks all the same) was being made just as the next job's
# task started, on this agent or the other, whose launcher then took 1.2 ms to start it, against
# 0.6 ms with no spare being made (traced over 300 one-task jobs).
SPARE_AFTER_END_S = 0.001
MAX_START_FAILURES = 3  # in a row, before the agent gives up on warm sandboxes
# A spare's folder holds, made ahead, the work directory of the first task it is given: the
# agent renames it into place rather than make the job's folder and the task's directory (two
# mkdirs on a new job's critical path, 0.4 ms here, against two renames, 0.06 ms).
PREMADE_WORKDIR = ".next-task"

Key = tuple[str, bool, Path, tuple[str, ...]]


class WarmPool:
    """The warm sandboxes of one runner, by job."""

    def __init__(
        self,
        mode: WarmMode,
        command: Callable[[Path, bool, tuple[str, ...], list[int], int], list[str]],
        cgroups: CgroupBackend,
        executable: str,
        idle_s: float = WARM_IDLE_S,
        size: int = MAX_WARM_SANDBOXES,
    ) -> None:
        self.mode = mode
        self._failures = 0  # starts that failed in a row
        self.enabled = True
        self._command = command
        self._cgroups = cgroups
        self._executable = executable
        self._idle_s = idle_s
        self._size = size
        self._sandboxes: dict[Key, WarmSandbox] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._spares: list[WarmSandbox] = []  # made ahead for the next jobs (no network)
        self._spare_ids = itertools.count(1)
        self._reaper = CgroupReaper()
        self._root: Path | None = None  # where the agent keeps jobs' folders, and spares'
        self._likely_limits: Limits | None = None  # a spare's first task cgroup is limited so
        self._free_cgroups = FreeCgroups()  # see WarmSandbox.give_back
        self._closed = False
        self._spares_timer: asyncio.TimerHandle | None = None
        self._spares_wanted_since: float | None = None

    def sandboxes(self) -> list[WarmSandbox]:
        """The jobs' sandboxes (not the spare)."""
        return list(self._sandboxes.values())

    def free_cgroups(self) -> list[TaskCgroup]:
        """Clean, empty cgroups kept for the next tasks and sandboxes (WarmSandbox.give_back)."""
        return [group for free in self._free_cgroups.values() for group in free]

    def spares(self) -> list[WarmSandbox]:
        """The spare sandboxes, ready or being made."""
        return list(self._spares)

    def _takes(self, launch: TaskLaunch) -> bool:
        # A warm sandbox is made once for a job's tasks: it cannot show each task only its own
        # devices (a GPU's), so those tasks get fresh sandboxes.
        return not (
            launch.share is None or launch.devices or not self.enabled or self.mode is WarmMode.OFF
        )

    @staticmethod
    def _key(launch: TaskLaunch) -> Key:
        assert launch.share is not None
        return (launch.share, launch.network, launch.workdir.parent, launch.ro_binds)

    def make_workdir(self, launch: TaskLaunch) -> bool:
        """Make the work directory of a job's first task here out of the one made ahead in a
        ready spare, which becomes the job's sandbox, its folder the job's. False: no spare
        fits (the job has a sandbox here already, or needs network or extra binds, or none is
        ready); the caller makes the directory."""
        if not self._takes(launch) or launch.network or launch.ro_binds or self._closed:
            return False
        key = self._key(launch)
        if key in self._sandboxes:
            return False
        self._make_room()
        spare = next((s for s in self._spares if s.ready and not s.closed), None)
        if spare is None or len(self._sandboxes) >= self._size:
            return False
        premade, workdir = spare.jobdir / PREMADE_WORKDIR, spare.jobdir / launch.workdir.name
        try:
            os.rename(premade, workdir)
        except OSError:
            return False  # (a spare made before, without one) the old way, at its spawn
        try:
            os.rename(spare.jobdir, launch.workdir.parent)  # none there yet, or an empty one
        except OSError as error:
            log.warning("could not give a spare sandbox to %s: %s", key[2].name, error)
            with contextlib.suppress(OSError):
                os.rename(workdir, premade)
            return False
        self._spares.remove(spare)
        self._adopt(spare, key, launch)
        return True

    async def spawn(self, launch: TaskLaunch, on_output: OutputSink) -> RunningTask | None:
        """The task started in its job's warm sandbox; None: start it in a fresh one. A job's
        first launch here takes the spare sandbox if it fits, else makes the job a warm
        sandbox: in the background (auto), or waiting for it (always)."""
        if not self._takes(launch):
            return None
        jobdir = launch.workdir.parent
        key = self._key(launch)
        if launch.limits is not None:
            self._likely_limits = launch.limits  # the next job's are most often the same
        sandbox = self._sandboxes.get(key)
        if sandbox is None:
            self._make_room()
        fits_spare = not launch.network and not launch.ro_binds
        if sandbox is None and self._spares and fits_spare and len(self._sandboxes) < self._size:
            # A spare being made will be ready sooner than a fresh sandbox would be.
            first = self._spares[0]
            if not first.ready and first.starting is not None:
                first.hurry()
                await asyncio.shield(first.starting)
            sandbox = self._sandboxes.get(key) or self._claim_spare(key, launch)
        self._root = jobdir.parent
        try:
            return await self._spawn_in(sandbox, key, launch, on_output)
        finally:
            self._want_spares()  # once this task has started: making one takes CPU it needs

    async def _spawn_in(
        self,
        sandbox: WarmSandbox | None,
        key: Key,
        launch: TaskLaunch,
        on_output: OutputSink,
    ) -> RunningTask | None:
        jobdir = launch.workdir.parent
        if sandbox is None and self.mode is WarmMode.AUTO and launch.share_size < 2:
            return None
        if sandbox is None and len(self._sandboxes) < self._size:
            sandbox = self._new_sandbox(jobdir, launch.network, launch.ro_binds, self._idle_s)
            self._sandboxes[key] = sandbox
        if sandbox is None:
            return None
        if self.mode is WarmMode.ALWAYS and sandbox.starting is not None:
            await asyncio.shield(sandbox.starting)  # _start raises nothing but CancelledError
        if not sandbox.ready:
            return None
        try:
            return await sandbox.spawn(launch, on_output)
        except WarmUnavailable as why:
            log.debug("task goes to a fresh sandbox: %s", why)
            return None

    def _new_sandbox(
        self,
        jobdir: Path,
        network: bool,
        ro_binds: tuple[str, ...],
        idle_s: float,
        background: bool = False,
    ) -> WarmSandbox:
        """A sandbox for ``jobdir``, being made in the background."""
        sandbox = WarmSandbox(
            jobdir,
            functools.partial(self._command, jobdir, network, ro_binds),
            self._cgroups,
            self._executable,
            idle_s,
            self._forget,
            self._reaper,
            background,
            self._free_cgroups,
        )
        sandbox.on_task_done = functools.partial(self._want_spares, SPARE_AFTER_END_S)
        sandbox.starting = asyncio.create_task(self._start(sandbox))
        self._starting.add(sandbox.starting)
        sandbox.starting.add_done_callback(self._starting.discard)
        return sandbox

    def _want_spares(self, quiet_s: float = SPARE_QUIET_S) -> None:
        """Make spares (_keep_spares) once no task has started or ended here for ``quiet_s``
        (SPARE_AFTER_END_S after an end), or SPARE_MAX_WAIT_S after the first call, whichever
        comes first."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._spares_wanted_since is None:
            self._spares_wanted_since = now
        if self._spares_timer is not None:
            self._spares_timer.cancel()
        latest = self._spares_wanted_since + SPARE_MAX_WAIT_S - now
        self._spares_timer = loop.call_later(max(0.0, min(quiet_s, latest)), self._keep_spares)

    def _keep_spares(self) -> None:
        """Have SPARES spare sandboxes ready, each in a folder of its own beside the jobs'
        folders: the next jobs that fit take them, so a job's first task starts as quickly as
        its later ones. Made only once the agent has run something, and closed after
        SPARE_IDLE_S unused, so an idle agent holds none. Made one at a time, at low CPU
        priority (SPARE_NICE), when no task has started or ended for a moment (_want_spares);
        so is each ready spare's first task cgroup."""
        self._spares_timer = None
        self._spares_wanted_since = None
        self._spares = [spare for spare in self._spares if not spare.closed]
        root = self._root
        if root is None or self._closed or not self.enabled:
            return
        for spare in self._spares:
            if spare.ready:
                spare.premake_cgroup(self._likely_limits)
        if any(not s.ready for s in self._spares):
            return  # one is being made; the next is made once it is ready
        if len(self._spares) >= SPARES:
            return
        if len(self._sandboxes) >= self._size:
            return  # a job's idle sandbox is not closed for a spare: its job may go on
        folder = root / f".spare-{next(self._spare_ids)}"
        try:
            folder.mkdir(mode=0o711)  # as the agent makes a job's folder
            (folder / PREMADE_WORKDIR).mkdir(mode=0o700)  # and a task's directory
        except OSError as error:
            log.warning("no spare sandbox: cannot make %s: %s", folder, error)
            return
        spare = self._new_sandbox(folder, False, (), SPARE_IDLE_S, background=True)
        self._spares.append(spare)
        assert spare.starting is not None
        spare.starting.add_done_callback(lambda _: self._want_spares())

    def _claim_spare(self, key: Key, launch: TaskLaunch) -> WarmSandbox | None:
        """Make a ready spare sandbox this job's (the launch has no network or extra binds).
        A spare's /work is bound to its own folder: the job's folder, made by the agent with
        this task's directory in it, gives its entries to that folder, which then takes the
        job folder's name (a bind mount follows a renamed folder)."""
        spare = next((s for s in self._spares if s.ready and not s.closed), None)
        if spare is None:
            return None
        self._spares.remove(spare)
        jobdir = launch.workdir.parent
        moved: list[str] = []
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(spare.jobdir / PREMADE_WORKDIR)  # the task's directory is made already
            for name in os.listdir(jobdir):
                os.rename(jobdir / name, spare.jobdir / name)
                moved.append(name)
            os.rename(spare.jobdir, jobdir)  # replaces the job's folder, now empty
        except OSError as error:
            log.warning("could not give a spare sandbox to %s: %s", jobdir.name, error)
            for name in moved:
                with contextlib.suppress(OSError):
                    os.rename(spare.jobdir / name, jobdir / name)
            spare.close()
            shutil.rmtree(spare.jobdir, ignore_errors=True)
            return None
        self._adopt(spare, key, launch)
        return spare

    def _adopt(self, spare: WarmSandbox, key: Key, launch: TaskLaunch) -> None:
        """A spare, its folder renamed to the job's, becomes the job's sandbox."""
        idle_s = self._idle_s if launch.share_size > 1 else SINGLE_TASK_IDLE_S
        spare.adopt(launch.workdir.parent, idle_s)
        self._sandboxes[key] = spare

    async def _start(self, sandbox: WarmSandbox) -> None:
        """Make ``sandbox``; raises nothing but CancelledError. Failing to make several in a row
        turns warm sandboxes off for this runner: the next would most likely fail alike."""
        try:
            await sandbox.start()
        except Exception as error:
            self._failures += 1
            sandbox.close()
            if self._failures < MAX_START_FAILURES:
                log.warning("could not make a warm sandbox: %s; the task starts fresh", error)
                return
            log.warning(
                "warm sandboxes are off on this agent: %s (%d times in a row). Every task gets"
                " a fresh sandbox, which is slower to start but as safe.",
                error,
                self._failures,
            )
            self.enabled = False
        except BaseException:
            sandbox.close()
            raise
        else:
            self._failures = 0

    def _make_room(self) -> None:
        """When the pool is full, close the sandbox of a job with no task here right now."""
        if len(self._sandboxes) < self._size:
            return
        for sandbox in self._sandboxes.values():
            if sandbox.active == 0 and sandbox.ready:
                sandbox.close()  # forgets itself
                return

    def _forget(self, sandbox: WarmSandbox) -> None:
        if sandbox in self._spares:  # closed unused: its folder goes with it
            self._spares.remove(sandbox)
            shutil.rmtree(sandbox.jobdir, ignore_errors=True)
        for key, held in list(self._sandboxes.items()):
            if held is sandbox:
                del self._sandboxes[key]

    def close(self) -> None:
        self._closed = True
        if self._spares_timer is not None:
            self._spares_timer.cancel()
        for starting in list(self._starting):
            starting.cancel()
        for sandbox in list(self._sandboxes.values()):
            sandbox.close()
        for spare in list(self._spares):
            spare.close()
        self._reaper.finish()
        self._free_cgroups.closed = True
        for free in self._free_cgroups.values():
            for group in free:
                group.remove()
        self._free_cgroups.clear()
