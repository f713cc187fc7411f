"""Warm sandboxes for real: real bwrap, the real task user, the host's real cgroups, the
launcher forking tasks inside.

What a user relies on: the tasks of a job share one sandbox and start quicker, yet each keeps
its own work directory, limits, exit status and kill; different jobs never share one; no task
can take the sandbox down or reach into its launcher; nothing is left once the sandbox closes.
Needs root and cgroups, like test_bwrap_limits.py; fails (never skips) elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from helpers import kill_leftovers, processes_with, wait_for

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.bwrap import BwrapRunner
from planetary_mesh.sandbox.launchers import (
    C_SOURCE,
    COMPILE_RECIPE,
    LAUNCHER_INSIDE,
    PYTHON_SOURCE,
    cache_folder,
    native_launcher,
)
from planetary_mesh.sandbox.limits import CGROUP_ROOT, Limits, detect_cgroups, own_cgroups
from planetary_mesh.sandbox.runner import EndReason, RunningTask, TaskLaunch, TaskOutcome
from planetary_mesh.sandbox.user import TaskUser
from planetary_mesh.sandbox.warm import WarmMode, WarmSandbox
from planetary_mesh.sandbox.warm_pool import PREMADE_WORKDIR, SPARES

MIB = 2**20
# The tests of the launcher's own work run with both: the C one the agent compiles, and the
# Python one it falls back to.
BOTH_LAUNCHERS = pytest.mark.parametrize("native", [True, False], ids=["c", "python"])


@dataclass
class Jobs:
    """Job folders like the agent's: root-owned and passable, a directory per task inside."""

    root: Path
    mark: str
    made: int = 0
    runners: list[BwrapRunner] = field(default_factory=list)

    def workdir(self, job: str) -> Path:
        self.made += 1
        folder = self.root / job
        folder.mkdir(mode=0o711, exist_ok=True)
        path = folder / f"{self.made}-1"
        path.mkdir(mode=0o700)
        return path


@pytest.fixture
def jobs(task_account: TaskUser) -> Iterator[Jobs]:
    root = Path(tempfile.mkdtemp(prefix="pm-warm-test-"))
    root.chmod(0o711)
    made = Jobs(root, f"pm-warm-{uuid.uuid4().hex}")
    try:
        yield made
    finally:
        for runner in made.runners:
            runner.close()
        kill_leftovers(made.mark)
        shutil.rmtree(root, ignore_errors=True)


def drive(
    jobs: Jobs,
    user: TaskUser,
    mode: WarmMode,
    body: Callable[[BwrapRunner], Awaitable[None]],
    idle_s: float = 30,
    native: bool = True,
) -> None:
    """Run ``body`` with a runner in one event loop, the runner closed in that loop at the end."""

    async def go() -> None:
        runner = make_runner(jobs, user, mode, idle_s, native)
        try:
            await body(runner)
        finally:
            runner.close()

    asyncio.run(go())


def make_runner(
    jobs: Jobs, user: TaskUser, mode: WarmMode, idle_s: float = 30, native: bool = True
) -> BwrapRunner:
    runner = BwrapRunner(
        user=user,
        cgroups=detect_cgroups(),
        warm=mode,
        warm_idle_s=idle_s,
        native_launcher=native,
    )
    jobs.runners.append(runner)
    assert runner.warm is not None, "no warm sandboxes: no cgroups or no Python under /usr"
    assert runner.launcher is not None and runner.launcher.native is native, runner.launcher
    return runner


def launch(
    jobs: Jobs,
    job: str,
    script: str,
    size: int = 10,
    limits: Limits | None = None,
    timeout: float = 20,
) -> TaskLaunch:
    return TaskLaunch(
        ("sh", "-c", f"{script} # {jobs.mark}"),
        {"JOB": job},
        jobs.workdir(job),
        timeout=timeout,
        limits=limits or Limits(memory=256 * MIB, cpus=1),
        share=job,
        share_size=size,
    )


async def run(
    runner: BwrapRunner,
    task_launch: TaskLaunch,
    during: Callable[[RunningTask, list[bytes]], Awaitable[None]] | None = None,
) -> tuple[TaskOutcome, str]:
    chunks: list[bytes] = []
    task = await runner.start(task_launch, chunks.append)
    if during is not None:
        await during(task, chunks)
    outcome = await task.wait()
    return outcome, b"".join(chunks).decode(errors="replace")


def cgroup_dirs(runner: BwrapRunner) -> list[Path]:
    """The cgroups the runner has made and not yet removed, in every hierarchy."""
    assert runner.cgroups is not None
    v1, v2 = own_cgroups(Path("/proc/self/cgroup").read_text())
    parents = [CGROUP_ROOT / c / path.lstrip("/") for c, path in v1.items()]
    if v2 is not None:
        parents.append(CGROUP_ROOT / v2.lstrip("/"))
    bases = [parent / runner.cgroups.tag for parent in parents]
    return sorted(d for base in bases if base.is_dir() for d in base.iterdir() if d.is_dir())


def sandboxes(runner: BwrapRunner) -> list[WarmSandbox]:
    assert runner.warm is not None
    return runner.warm.sandboxes()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


@BOTH_LAUNCHERS
def test_tasks_of_a_job_share_one_warm_sandbox_each_in_its_own_directory(
    jobs: Jobs, task_account: TaskUser, native: bool
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        # The job's first task runs in a fresh sandbox while its warm one is made.
        outcome, output = await run(runner, launch(jobs, "job-a", "cat /proc/1/cmdline"))
        assert outcome.reason is EndReason.EXITED and outcome.exit_code == 0, output
        assert LAUNCHER_INSIDE not in output
        await until(lambda: any(s.ready for s in sandboxes(runner)), "the warm sandbox")
        [sandbox] = sandboxes(runner)
        first = launch(jobs, "job-a", 'echo "$PWD $HOME $JOB"; echo shared > /tmp/note')
        second = launch(
            jobs,
            "job-a",
            "cat /tmp/note; tr '\\0' ' ' < /proc/1/cmdline; echo; ls /work 2>&1; true",
        )
        outcome, output = await run(runner, first)
        assert outcome.exit_code == 0, output
        inside = f"/work/{first.workdir.name}"
        assert output.split() == [inside, inside, "job-a"]
        outcome, output = await run(runner, second)
        assert outcome.exit_code == 0, output
        lines = output.splitlines()
        assert lines[0] == "shared"  # the same /tmp: the same sandbox
        assert LAUNCHER_INSIDE in lines[1]  # its PID 1 is the launcher
        assert "Permission denied" in output  # /work lists no one's directories
        assert sandboxes(runner) == [sandbox] and sandbox.launcher_pid is not None
        assert psutil.Process(sandbox.launcher_pid).is_running()

    drive(jobs, task_account, WarmMode.AUTO, scenario, native=native)


def test_a_new_job_takes_the_spare_sandbox_made_ahead_and_another_is_made(
    jobs: Jobs, task_account: TaskUser, caplog: pytest.LogCaptureFixture
) -> None:
    def ready_spare(runner: BwrapRunner) -> WarmSandbox | None:
        assert runner.warm is not None
        return next((spare for spare in runner.warm.spares() if spare.ready), None)

    async def scenario(runner: BwrapRunner) -> None:
        # An agent that has run nothing holds no spare: an idle agent costs no more memory.
        assert runner.warm is not None and runner.warm.spares() == []
        outcome, output = await run(runner, launch(jobs, "job-a", "echo a > /tmp/note", size=1))
        assert outcome.exit_code == 0, output
        await until(lambda: ready_spare(runner) is not None, "a spare sandbox")
        spare = ready_spare(runner)
        assert spare is not None and sandboxes(runner) == []  # job-a ran fresh: one task

        # A one-task job's first task runs in the spare: under the launcher, in its own
        # directory, seeing none of job-a's /tmp.
        # The spare was made at low CPU priority; its task runs at the normal one.
        script = "tr '\\0' ' ' < /proc/1/cmdline; echo; cat /tmp/note 2>&1; echo out > result"
        single = launch(jobs, "job-b", f"{script}; echo nice=$(nice)", size=1)
        outcome, output = await run(runner, single)
        assert outcome.exit_code == 0, output
        assert LAUNCHER_INSIDE in output.splitlines()[0]
        assert "nice=0" in output.splitlines()
        assert "No such file" in output  # job-a's /tmp is not here
        assert (single.workdir / "result").read_text() == "out\n"  # its files are the job's
        assert spare.jobdir == single.workdir.parent  # the spare became job-b's
        # Another spare is made for the next jobs; the one-task job's sandbox closes once its
        # task is done.
        pool = runner.warm
        assert pool is not None and spare not in pool.spares()
        await until(lambda: [s.ready for s in pool.spares()] == [True] * SPARES, "new spares")
        claimed = spare
        await until(lambda: claimed.closed and sandboxes(runner) == [], "the one-task sandbox")
        assert single.workdir.parent.is_dir()  # the job's folder stays the agent's to remove

        # A job with network does not fit the spare (made without): fresh sandbox, spare kept.
        spare = ready_spare(runner)
        networked = launch(jobs, "job-c", "tr '\\0' ' ' < /proc/1/cmdline", size=1)
        networked = TaskLaunch(
            networked.argv, {}, networked.workdir, 10, network=True, share="job-c", share_size=1
        )
        outcome, output = await run(runner, networked)
        assert outcome.exit_code == 0 and LAUNCHER_INSIDE not in output, output
        assert ready_spare(runner) is spare

        # Its first task's cgroup was made ahead, limited as the last task was: the job's own
        # are set on it as the spare is taken (here a lower memory limit the task goes over).
        assert spare is not None
        await until(lambda: spare.has_premade_cgroup, "the spare's task cgroup made ahead")
        hog = launch(
            jobs,
            "job-d",
            "python3 -c 'x = bytearray(200 * 2**20); print(len(x))'",
            size=1,
            limits=Limits(memory=64 * MIB, cpus=1),
        )
        outcome, output = await run(runner, hog)
        assert outcome.reason is EndReason.OOM, (outcome, output)
        assert spare.jobdir == hog.workdir.parent and not spare.has_premade_cgroup

        async def in_the_spare(job: str, mib: int, limit_mib: int) -> TaskOutcome:
            spare = ready_spare(runner)
            assert spare is not None
            await until(lambda: spare.has_premade_cgroup, "the spare's task cgroup made ahead")
            script = f"python3 -c 'x = bytearray({mib} * 2**20); print(len(x))'"
            limits = Limits(memory=limit_mib * MIB, cpus=1)
            task = launch(jobs, job, script, size=1, limits=limits)
            outcome, output = await run(runner, task)
            assert spare.jobdir == task.workdir.parent, output
            return outcome

        # A higher limit than the one it was made with is set too (memory and memory+swap, in
        # the order the kernel takes: not a cgroup made anew instead)...
        assert (await in_the_spare("job-e", 200, 300)).reason is EndReason.EXITED
        assert "could not limit a cgroup made ahead" not in caplog.text
        # ...and a cgroup made ahead with the very limits the next job has is limited.
        assert (await in_the_spare("job-f", 400, 300)).reason is EndReason.OOM

    drive(jobs, task_account, WarmMode.AUTO, scenario)


def test_a_new_jobs_first_work_directory_is_the_one_made_ahead_in_a_spare(
    jobs: Jobs, task_account: TaskUser
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        pool = runner.warm
        assert pool is not None
        outcome, output = await run(runner, launch(jobs, "job-a", "true", size=1))
        assert outcome.exit_code == 0, output
        await until(lambda: [s.ready for s in pool.spares()] == [True] * SPARES, "spares")
        spare = pool.spares()[0]
        premade = spare.jobdir / PREMADE_WORKDIR
        assert premade.is_dir()

        # As the agent does: the launch first, then its directory (the job's folder is not
        # there yet), then the inputs, then the start.
        workdir = jobs.root / "job-b" / "0-1"
        script = f"pwd; cat input; tr '\\0' ' ' < /proc/1/cmdline # {jobs.mark}"
        first = TaskLaunch(
            ("sh", "-c", script), {}, workdir, 20, limits=Limits(memory=256 * MIB),
            share="job-b", share_size=2,
        )  # fmt: skip
        runner.make_workdir(first)
        assert spare.jobdir == workdir.parent and not premade.exists()  # renamed into place
        assert os.listdir(workdir.parent) == ["0-1"]
        assert spare not in pool.spares() and sandboxes(runner) == [spare]
        assert (workdir.stat().st_mode & 0o777, workdir.parent.stat().st_mode & 0o777) == (
            0o700,
            0o711,
        )
        (workdir / "input").write_text("from the agent\n")
        chunks: list[bytes] = []
        outcome = await (await runner.start(first, chunks.append)).wait()
        output = b"".join(chunks).decode()
        assert outcome.exit_code == 0, output
        cwd, given, init = output.splitlines()
        assert (cwd, given) == ("/work/0-1", "from the agent"), output
        assert LAUNCHER_INSIDE in init  # in the spare, not a fresh sandbox

        # The job's next task here: its folder is there, only its directory is made.
        second = TaskLaunch(("true",), {}, workdir.parent / "1-1", 20, share="job-b", share_size=2)
        runner.make_workdir(second)
        assert second.workdir.is_dir() and sandboxes(runner) == [spare]

        # A job that needs network does not fit a spare: plain directories, spares kept.
        networked = TaskLaunch(
            ("true",), {}, jobs.root / "job-c" / "0-1", 20, network=True, share="job-c"
        )
        spares = pool.spares()
        runner.make_workdir(networked)
        assert networked.workdir.is_dir() and pool.spares() == spares

        # A spare taken the other way (the task's directory made before it, as a caller
        # without make_workdir does) shows no trace of the directory made ahead.
        await until(lambda: [s.ready for s in pool.spares()] == [True] * SPARES, "spares")
        taken = launch(jobs, "job-d", "true", size=1)
        outcome, output = await run(runner, taken)
        assert outcome.exit_code == 0, output
        assert os.listdir(taken.workdir.parent) == [taken.workdir.name]

    drive(jobs, task_account, WarmMode.AUTO, scenario)


def test_different_jobs_never_share_a_sandbox(jobs: Jobs, task_account: TaskUser) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        outcome, output = await run(runner, launch(jobs, "job-a", "echo from-a > /tmp/note"))
        assert outcome.exit_code == 0, output
        other = launch(jobs, "job-b", "cat /tmp/note; echo $PWD; ls -d /work/*")
        outcome, output = await run(runner, other)
        assert outcome.exit_code != 0
        assert "from-a" not in output and "No such file" in output
        assert len(sandboxes(runner)) == 2
        # Job A's work directories are not even there for job B.
        spy = launch(jobs, "job-b", f"cat /work/{jobs.made - 1}-1/* 2>&1; ls /work/1-1 2>&1")
        outcome, output = await run(runner, spy)
        assert "No such file" in output, output

    drive(jobs, task_account, WarmMode.ALWAYS, scenario)


@BOTH_LAUNCHERS
def test_a_warm_task_keeps_its_own_cgroup_limits_and_exit_status(
    jobs: Jobs, task_account: TaskUser, native: bool
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        outcome, output = await run(runner, launch(jobs, "job", "cat /proc/self/cgroup"))
        assert outcome.exit_code == 0
        [sandbox] = sandboxes(runner)
        assert sandbox.launcher_pid is not None
        launcher_cgroups = set(Path(f"/proc/{sandbox.launcher_pid}/cgroup").read_text().split())
        task_cgroups = {line for line in output.split() if "memory" in line}
        assert task_cgroups and not task_cgroups & launcher_cgroups, (output, launcher_cgroups)

        hog = launch(
            jobs,
            "job",
            "python3 -c 'x = bytearray(200 * 2**20); print(len(x))'",
            limits=Limits(memory=64 * MIB, cpus=1),
        )
        outcome, output = await run(runner, hog)
        assert outcome.reason is EndReason.OOM, (outcome, output)

        # It holds no descriptor of the launcher's: stdin, the output pipe, nothing more.
        outcome, output = await run(runner, launch(jobs, "job", "ls /proc/$$/fd"))
        assert output.split() == ["0", "1", "2"], output
        # As a fresh process: a session of its own, stdin /dev/null, no signal blocked or
        # ignored (but by the Python launcher: glibc's posix_spawn leaves its own two, 32 and
        # 33, ignored, and Python cannot name them to set them back).
        # The signals are read by the task's own process after an exec (which keeps what is
        # blocked or ignored): read from its shell's child, they raced with dash, which
        # blocks every signal around each fork.
        state = (
            "cut -d' ' -f6 /proc/$$/stat; echo $$; readlink /proc/$$/fd/0;"
            " exec grep -E '^Sig(Blk|Ign)' /proc/self/status"
        )
        outcome, output = await run(runner, launch(jobs, "job", state))
        session, shell, stdin, blocked, ignored = output.splitlines()
        assert session == shell and stdin == "/dev/null", output
        assert blocked.split() == ["SigBlk:", "0" * 16], output
        glibc_own = 0 if native else 1 << 31 | 1 << 32
        assert ignored.split()[0] == "SigIgn:" and int(ignored.split()[1], 16) & ~glibc_own == 0

        outcome, _ = await run(runner, launch(jobs, "job", "exit 3"))
        assert (outcome.reason, outcome.exit_code) == (EndReason.EXITED, 3)
        outcome, _ = await run(runner, launch(jobs, "job", "kill -TERM $$"))
        assert (outcome.reason, outcome.signal) == (EndReason.SIGNALLED, 15)
        outcome, _ = await run(runner, launch(jobs, "job", "sleep 30", timeout=0.5))
        assert outcome.reason is EndReason.TIMEOUT

        missing = launch(jobs, "job", "")
        missing = TaskLaunch(("no-such-command",), {}, missing.workdir, 10, share="job")
        with pytest.raises(SandboxError, match="no-such-command: No such file or directory"):
            await run(runner, missing)
        assert sandboxes(runner) == [sandbox] and sandbox.ready  # none of it hurt the sandbox

    # As under `nohup`: the launcher inherits SIGHUP ignored, and no task may.
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        drive(jobs, task_account, WarmMode.ALWAYS, scenario, native=native)
    finally:
        signal.signal(signal.SIGHUP, hangup)


@BOTH_LAUNCHERS
def test_cancel_kills_a_warm_tasks_daemonised_children_and_leaves_its_neighbours(
    jobs: Jobs, task_account: TaskUser, native: bool
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        neighbour = await runner.start(launch(jobs, "job", "sleep 30"), lambda _: None)
        daemon = f"sleep 301 # {jobs.mark}-daemon"

        async def cancel_once_daemonised(task: RunningTask, chunks: list[bytes]) -> None:
            await until(lambda: b"forked" in b"".join(chunks), "the daemon")
            assert processes_with(f"{jobs.mark}-daemon")
            task.cancel("the test cancels it")

        script = f"setsid sh -c '{daemon}' & echo forked; sleep 30"
        outcome, _ = await run(runner, launch(jobs, "job", script), cancel_once_daemonised)
        assert outcome.reason is EndReason.CANCELLED
        assert processes_with(f"{jobs.mark}-daemon") == []
        # Its neighbour in the same sandbox runs on.
        await asyncio.sleep(0)
        neighbour.cancel("done")
        assert (await neighbour.wait()).reason is EndReason.CANCELLED

    drive(jobs, task_account, WarmMode.ALWAYS, scenario, native=native)


@BOTH_LAUNCHERS
def test_no_task_can_kill_or_trace_the_launcher(
    jobs: Jobs, task_account: TaskUser, native: bool
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        attack = (
            "for s in KILL TERM INT HUP QUIT USR1; do kill -$s 1; done; kill -9 -1;"
            " ls /proc/1/fd; cat /proc/1/environ; echo survived"
        )
        outcome, output = await run(runner, launch(jobs, "job", attack))
        [sandbox] = sandboxes(runner)
        assert "Permission denied" in output  # non-dumpable: its fds and memory are closed
        outcome, output = await run(runner, launch(jobs, "job", "echo still-warm"))
        assert outcome.exit_code == 0 and output == "still-warm\n"
        assert sandboxes(runner) == [sandbox] and sandbox.ready

    drive(jobs, task_account, WarmMode.ALWAYS, scenario, native=native)


def test_an_idle_warm_sandbox_closes_and_leaves_nothing_behind(
    jobs: Jobs, task_account: TaskUser
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        outcome, _ = await run(runner, launch(jobs, "job", "true"))
        assert outcome.exit_code == 0
        [sandbox] = sandboxes(runner)
        assert sandbox.launcher_pid is not None
        launcher = psutil.Process(sandbox.launcher_pid)
        await until(lambda: not sandboxes(runner), "the idle sandbox to close")
        await until(lambda: not launcher.is_running(), "the launcher to die")
        # What is left is the spare sandboxes' launchers' cgroups, their first tasks' made
        # ahead, and the closed sandbox's own and its task's, empty, kept for the next ones.
        pool = runner.warm
        assert pool is not None
        await until(
            lambda: (
                all(s.ready and s.has_premade_cgroup for s in pool.spares())
                and len(pool.spares()) == SPARES
            ),
            "the spares",
        )
        launchers = {str(spare.launcher_pid) for spare in pool.spares()}
        left = cgroup_dirs(runner)
        holding = [d for d in left if launchers & set((d / "cgroup.procs").read_text().split())]
        made_ahead = [d for d in left if not (d / "cgroup.procs").read_text().split()]
        assert holding and sorted(holding + made_ahead) == left, left
        assert runner.cgroups is not None
        hierarchies = len(runner.cgroups.controllers)
        free = pool.free_cgroups()
        assert free and len(holding) == SPARES * hierarchies, left
        assert len(made_ahead) == (SPARES + len(free)) * hierarchies, left
        # A later task of the job gets a new one. Cgroups are kept for other jobs: a task sees
        # no host path of its cgroups (a cgroup namespace of its own), and no /sys/fs/cgroup.
        kept = len(free)
        outcome, output = await run(
            runner, launch(jobs, "job", "cat /proc/self/cgroup; ls /sys/fs/cgroup 2>&1 || :")
        )
        assert outcome.exit_code == 0 and len(sandboxes(runner)) == 1
        *cgroups, listing = output.splitlines()
        assert cgroups and not any("planetary-mesh" in line for line in cgroups), output
        assert "No such file" in listing, output
        # The spare made for the next jobs takes a kept cgroup rather than making one.
        await until(lambda: len(pool.free_cgroups()) < kept, "a kept cgroup to be taken")

    drive(jobs, task_account, WarmMode.ALWAYS, scenario, idle_s=0.3)
    assert jobs.runners and not any(cgroup_dirs(runner) for runner in jobs.runners)


def test_closing_the_runner_kills_warm_sandboxes_and_their_tasks(
    jobs: Jobs, task_account: TaskUser
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        task = await runner.start(launch(jobs, "job", "sleep 300"), lambda _: None)
        [sandbox] = sandboxes(runner)
        assert sandbox.launcher_pid is not None
        launcher = psutil.Process(sandbox.launcher_pid)
        runner.close()
        outcome = await asyncio.wait_for(task.wait(), 10)
        assert outcome.reason is EndReason.SIGNALLED
        assert "warm sandbox" in outcome.message
        await until(lambda: not launcher.is_running(), "the launcher to die")
        assert processes_with(jobs.mark) == []
        assert cgroup_dirs(runner) == []

    drive(jobs, task_account, WarmMode.ALWAYS, scenario)


def test_warm_sandboxes_off_or_without_cgroups_mean_a_fresh_sandbox_per_task(
    jobs: Jobs, task_account: TaskUser
) -> None:
    off = BwrapRunner(user=task_account, cgroups=detect_cgroups(), warm=WarmMode.OFF)
    jobs.runners.append(off)
    plain = BwrapRunner(user=task_account, warm=WarmMode.ALWAYS)  # no cgroups: no whole-task kill
    jobs.runners.append(plain)
    for runner in (off, plain):
        assert runner.warm is None
        assert "fresh sandbox per task" in runner.describe()

        async def scenario(runner: BwrapRunner = runner) -> None:
            outcome, output = await run(runner, launch(jobs, "job", "cat /proc/1/cmdline"))
            assert outcome.exit_code == 0 and LAUNCHER_INSIDE not in output

        asyncio.run(scenario())
    assert "warm sandbox per job" in make_runner(jobs, task_account, WarmMode.AUTO).describe()


def test_many_warm_tasks_at_once_each_get_their_own_result(
    jobs: Jobs, task_account: TaskUser
) -> None:
    async def scenario(runner: BwrapRunner) -> None:
        launches = [launch(jobs, "job", f"echo $PWD; exit {i % 7}") for i in range(40)]
        results = await asyncio.gather(*(run(runner, one) for one in launches))
        for i, (one, (outcome, output)) in enumerate(zip(launches, results, strict=True)):
            assert outcome.exit_code == i % 7, (outcome, output)
            assert output == f"/work/{one.workdir.name}\n"
        assert len(sandboxes(runner)) == 1

    drive(jobs, task_account, WarmMode.ALWAYS, scenario)


def test_a_full_pool_makes_room_by_closing_an_idle_jobs_sandbox(
    jobs: Jobs, task_account: TaskUser
) -> None:
    runner = BwrapRunner(
        user=task_account, cgroups=detect_cgroups(), warm=WarmMode.ALWAYS, warm_pool_size=2
    )
    jobs.runners.append(runner)

    async def scenario() -> None:
        try:
            for job in ("job-1", "job-2", "job-3"):
                outcome, output = await run(runner, launch(jobs, job, "cat /proc/1/cmdline"))
                assert outcome.exit_code == 0 and LAUNCHER_INSIDE in output, (job, output)
            assert sorted(s.jobdir.name for s in sandboxes(runner)) == ["job-2", "job-3"]
            # A busy job's sandbox is never closed for another: that one starts fresh.
            busy = [
                await runner.start(launch(jobs, j, "sleep 30"), lambda _: None)
                for j in ("job-2", "job-3")
            ]
            outcome, output = await run(runner, launch(jobs, "job-4", "cat /proc/1/cmdline"))
            assert outcome.exit_code == 0 and LAUNCHER_INSIDE not in output, output
            for task in busy:
                task.cancel("done")
                await task.wait()
        finally:
            runner.close()

    asyncio.run(scenario())


def test_the_launcher_bound_is_a_copy_the_task_user_can_reach(
    jobs: Jobs, task_account: TaskUser
) -> None:
    # The package may live where the task user cannot look (a venv in a private home, a
    # checkout in a 0700 folder); bwrap binds the launcher as that user, so it binds a copy.
    # The C one is compiled once per source and recipe, and cached; the Python one is compiled
    # once, by the Python that runs it: a script is compiled at every start.
    native = make_runner(jobs, task_account, WarmMode.ALWAYS)
    assert native.launcher is not None
    binary = native.launcher.path
    recipe = C_SOURCE.read_bytes() + COMPILE_RECIPE.encode()
    cached = cache_folder() / f"warm-launcher-{hashlib.sha256(recipe).hexdigest()[:16]}"
    assert binary.read_bytes() == cached.read_bytes()
    assert binary.stat().st_mode & 0o777 == 0o755
    assert binary.parent.stat().st_mode & 0o777 == 0o711
    command = native.warm_command(jobs.root, False, (), [3, 5], 4)
    assert command[command.index(LAUNCHER_INSIDE) - 1] == str(binary)
    assert command[-5:-3] == ["--", LAUNCHER_INSIDE]  # run as it is
    # It also starts bwrap from inside the sandbox's cgroup (its home cgroup.procs: fd 5), as
    # the task user (no setpriv: it drops to the user itself).
    user = f"{task_account.uid}:{task_account.gid}"
    assert command[:7] == [str(binary), "--join", "5", "--user", user, "--", native.executable]
    assert (command[-3], command[-1]) == ("3", "5")  # its socket, then its home cgroups

    python = make_runner(jobs, task_account, WarmMode.ALWAYS, native=False)
    assert python.launcher is not None
    compiled = python.launcher.path
    source = compiled.with_suffix(".py")
    assert compiled.suffix == ".pyc" and source.read_bytes() == PYTHON_SOURCE.read_bytes()
    assert compiled.stat().st_mode & 0o777 == 0o644
    command = python.warm_command(jobs.root, False, (), [3, 5], 4)
    assert command[command.index(LAUNCHER_INSIDE) - 1] == str(compiled)
    assert command[:2] == [*task_account.setpriv()[:1], f"--reuid={task_account.uid}"]
    interpreter, *flags = python.launcher.argv
    assert interpreter.startswith("/usr/") and flags == ["-I", "-S", LAUNCHER_INSIDE]
    assert command[-7:-3] == [interpreter, *flags]
    for runner in (native, python):
        runner.close()
    assert not binary.exists() and not compiled.exists() and not source.exists()


def test_the_helper_becomes_the_task_user_exactly_as_setpriv_did(
    jobs: Jobs, task_account: TaskUser
) -> None:
    # The helper drops to the task user itself (no setpriv exec before bwrap): what a process
    # it starts is must match, field by field, what setpriv made of it.
    runner = make_runner(jobs, task_account, WarmMode.ALWAYS)
    assert runner.launcher is not None
    fields = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    show = ["grep", "-E", f"^({'|'.join(fields)}|NoNewPrivs):", "/proc/self/status"]
    user = f"{task_account.uid}:{task_account.gid}"
    helper = [str(runner.launcher.path), "--join", "--user", user, "--"]
    by_helper = subprocess.run([*helper, *show], capture_output=True, text=True, check=True)
    by_setpriv = subprocess.run(
        [*task_account.setpriv(), *show], capture_output=True, text=True, check=True
    )
    assert by_helper.stdout == by_setpriv.stdout
    status = dict(line.split(":\t", 1) for line in by_helper.stdout.splitlines())
    assert status["Uid"].split() == [str(task_account.uid)] * 4
    assert status["Gid"].split() == [str(task_account.gid)] * 4
    assert status["Groups"].strip() == "" and status["NoNewPrivs"] == "1"
    assert all(int(status[name], 16) == 0 for name in fields if name.startswith("Cap"))

    # Root, or a user it cannot read, is refused before anything runs.
    for wrong in ("0:0", "mesh-task", f"{task_account.uid}:", ""):
        refused = subprocess.run(
            [str(runner.launcher.path), "--join", "--user", wrong, "--", "touch", "/ran"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.returncode == 126, (wrong, refused)
        assert f"cannot become the task user {wrong}" in refused.stderr
    assert not Path("/ran").exists()
    runner.close()


def test_without_a_working_c_compiler_the_python_launcher_runs_and_the_log_says_why(
    jobs: Jobs,
    task_account: TaskUser,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No compiler at all: the warning names the package to install.
    bwrap = shutil.which("bwrap")
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(tmp_path))
        runner = BwrapRunner(bwrap, task_account, detect_cgroups(), warm=WarmMode.ALWAYS)
    jobs.runners.append(runner)
    assert runner.launcher is not None and not runner.launcher.native
    assert "apt-get install gcc" in caplog.text

    # A compiler that fails: its own last words are in the warning, nothing half made is kept.
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no space left' >&2\nexit 1\n")
    broken.chmod(0o755)
    caplog.clear()
    cache = tmp_path / "cache"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert native_launcher(cache) is None
    assert "cc: fatal error: no space left" in caplog.text and "Python launcher" in caplog.text
    assert list(cache.iterdir()) == []

    # And the Python launcher runs tasks.
    async def scenario() -> None:
        try:
            outcome, output = await run(runner, launch(jobs, "job", "echo $JOB"))
            assert outcome.exit_code == 0 and output == "job\n", output
            [sandbox] = sandboxes(runner)
            assert sandbox.launcher_pid is not None
            assert psutil.Process(sandbox.launcher_pid).name().startswith("python")
        finally:
            runner.close()

    asyncio.run(scenario())


def test_a_clean_task_cgroup_is_reused_and_one_with_leftovers_or_an_oom_is_not(
    jobs: Jobs, task_account: TaskUser
) -> None:
    # Reusing a finished task's cgroup saves making and removing one per task; the next task
    # must still find it as a fresh one would be: nothing charged to it, no OOM on record.
    limits = Limits(memory=96 * MIB, cpus=1)

    async def memory_cgroup(runner: BwrapRunner, script: str = "") -> tuple[TaskOutcome, str]:
        task = launch(jobs, "job", f"{script} grep memory /proc/self/cgroup", limits=limits)
        return await run(runner, task)

    async def scenario(runner: BwrapRunner) -> None:
        _, first = await memory_cgroup(runner)
        _, second = await memory_cgroup(runner)
        assert first.strip() and first == second  # reused

        hog = "python3 -c 'x = bytearray(200 * 2**20)';"
        outcome, after_oom = await memory_cgroup(runner, hog)
        assert outcome.reason is EndReason.OOM
        assert first in after_oom  # the OOM happened in the reused cgroup
        outcome, fresh = await memory_cgroup(runner)
        assert (outcome.reason, outcome.exit_code) == (EndReason.EXITED, 0), outcome
        assert fresh != first  # the OOM-killed one was not given to another task

        # 48 MiB left in the job's shared /dev/shm stay charged to the cgroup that wrote them.
        outcome, wrote = await memory_cgroup(runner, "head -c 50331648 /dev/zero >/dev/shm/x;")
        assert outcome.exit_code == 0 and wrote == fresh
        # So the next task gets another cgroup, with the whole of its memory to use.
        use = "python3 -c 'x = bytearray(56 * 2**20); print(len(x))';"
        outcome, output = await memory_cgroup(runner, use)
        assert (outcome.reason, outcome.exit_code) == (EndReason.EXITED, 0), (outcome, output)
        assert str(56 * MIB) in output and fresh not in output

    drive(jobs, task_account, WarmMode.ALWAYS, scenario)


def sandbox_processes(jobs: Jobs) -> list[psutil.Process]:
    """bwrap and launcher processes of sandboxes whose folders lie under this test's root."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(jobs.root) in arg for arg in process.info["cmdline"] or []):
                found.append(process)
    return found


def test_a_runner_closed_while_spares_are_being_made_leaves_no_process_behind(
    jobs: Jobs, task_account: TaskUser
) -> None:
    # A spare's bwrap killed before it has named its sandbox's first process must not leave
    # that process behind (it is outside every cgroup until the launcher joins its own).
    for delay in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05):

        async def scenario(runner: BwrapRunner, delay: float = delay) -> None:
            outcome, output = await run(runner, launch(jobs, f"job-{delay}", "true", size=1))
            assert outcome.exit_code == 0, output
            await asyncio.sleep(delay)  # spares are being made; the runner closes now

        drive(jobs, task_account, WarmMode.AUTO, scenario)
        wait_for(lambda: not sandbox_processes(jobs), 5, f"no sandbox left ({delay}s)")
