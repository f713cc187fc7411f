"""Resource limits for real: real bwrap, the real task user, the host's real cgroups.

Needs root (to drop to the task user and to make cgroups), a working bwrap, and cgroups with the
memory, cpu and pids controllers; the tests fail (never skip) elsewhere. Each task carries a
marker in its command line, so whatever a failing test leaves running is found and killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import kill_leftovers, processes_with

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.bwrap import BwrapRunner
from planetary_mesh.sandbox.limits import (
    CGROUP_ROOT,
    OPEN_FILES_LIMIT,
    CgroupBackend,
    Limits,
    detect_cgroups,
    own_cgroups,
)
from planetary_mesh.sandbox.runner import EndReason, RunningTask, TaskLaunch, TaskOutcome
from planetary_mesh.sandbox.user import TaskUser

MIB = 2**20
CONTROLLERS = {"memory", "cpu", "pids"}


@dataclass
class Host:
    runner: BwrapRunner
    user: TaskUser
    cgroups: CgroupBackend
    bases: list[Path]  # the per-agent cgroup directories the backend made, one per hierarchy
    mark: str  # in every task's command line


# A fresh sandbox's bwrap is started by the C launcher's helper (it joins the task's cgroup and
# takes the rlimits, then execs), or without a compiler from the agent's own fork: both run.
@pytest.fixture(params=[True, False], ids=["c-helper", "fork"])
def host(task_account: TaskUser, request: pytest.FixtureRequest) -> Iterator[Host]:
    # Read before the backend is made: a v2 backend moves this process into a leaf.
    v1, v2 = own_cgroups(Path("/proc/self/cgroup").read_text())
    cgroups = detect_cgroups()
    runner = BwrapRunner(user=task_account, cgroups=cgroups, native_launcher=request.param)
    assert runner.launcher is not None and runner.launcher.native is request.param
    mark = f"pm-limits-{uuid.uuid4().hex}"
    bases: list[Path] = []
    try:
        if not CONTROLLERS.issubset(cgroups.controllers):
            pytest.fail(f"no cgroups with memory, cpu and pids here ({cgroups.name})")
        tag = cgroups.tag
        if cgroups.name == "cgroup v1":
            bases = [CGROUP_ROOT / c / v1[c].lstrip("/") / tag for c in cgroups.controllers]
        else:
            assert v2 is not None
            bases = [CGROUP_ROOT / v2.lstrip("/") / tag]
        assert all(base.is_dir() for base in bases)
        yield Host(runner, task_account, cgroups, bases, mark)
    finally:
        # Whatever a failing test left: its processes by pid, then their cgroups, then ours.
        kill_leftovers(mark)
        deadline = time.monotonic() + 5
        while processes_with(mark) and time.monotonic() < deadline:
            time.sleep(0.02)
        for base in bases:
            for cgroup in base.iterdir() if base.is_dir() else ():
                if cgroup.is_dir():
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
        runner.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Outside tmp_path: pytest's root-only base directory is closed to the task user."""
    path = Path(tempfile.mkdtemp(prefix="pm-limits-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def task_cgroups(host: Host) -> list[Path]:
    """The per-task cgroup directories that exist now."""
    return sorted(d for base in host.bases if base.is_dir() for d in base.iterdir() if d.is_dir())


def python(host: Host, script: str) -> list[str]:
    return ["python3", "-c", f"# {host.mark}\n{script}"]


def ignore(output: bytes) -> None:
    pass


def task_launch(argv: Sequence[str], workdir: Path, limits: Limits) -> TaskLaunch:
    return TaskLaunch(tuple(argv), {}, workdir, timeout=15, limits=limits)


def run(
    host: Host,
    argv: Sequence[str],
    workdir: Path,
    limits: Limits,
    during: Callable[[RunningTask, list[bytes]], Awaitable[None]] | None = None,
) -> tuple[TaskOutcome, str]:
    """Run a task to its end, awaiting ``during`` while it runs. Checks that its cgroups are
    gone once it has ended."""

    async def go() -> tuple[TaskOutcome, str]:
        chunks: list[bytes] = []
        task = await host.runner.start(task_launch(argv, workdir, limits), chunks.append)
        try:
            if during is not None:
                await during(task, chunks)
            outcome = await task.wait()
        finally:
            task.cancel("the test is over")  # a no-op once it ended; a kill if the test failed
        return outcome, b"".join(chunks).decode(errors="replace")

    result = asyncio.run(go())
    assert task_cgroups(host) == []
    return result


async def until(condition: Callable[[], bool], deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def test_describe_names_the_user_and_the_cgroups(host: Host) -> None:
    text = host.runner.describe()
    assert "as mesh-task" in text and host.user.name == "mesh-task"
    if host.cgroups.name == "cgroup v1":
        assert "cgroup v1 (memory, cpu, pids)" in text
    else:
        assert "cgroup v2 (cpu, memory, pids)" in text
    assert "rlimits" in text


def test_task_runs_as_the_task_user_and_writes_its_work_directory(
    host: Host, workdir: Path
) -> None:
    script = f"id -u; echo made > out.txt; cat out.txt; : {host.mark}"
    outcome, output = run(host, ["sh", "-c", script], workdir, Limits(memory=64 * MIB))
    assert outcome == TaskOutcome(EndReason.EXITED, 0, None, "exit code 0"), output
    assert output.split() == [str(host.user.uid), "made"]
    assert host.user.uid != 0
    made = workdir / "out.txt"
    assert made.read_text() == "made\n"
    assert (made.stat().st_uid, workdir.stat().st_uid) == (host.user.uid, host.user.uid)


def test_rlimits_inside(host: Host, workdir: Path) -> None:
    script = f"ulimit -c; ulimit -n; : {host.mark}"
    outcome, output = run(host, ["sh", "-c", script], workdir, Limits())
    assert outcome.exit_code == 0, output
    assert output.split() == ["0", str(OPEN_FILES_LIMIT)]
    assert OPEN_FILES_LIMIT == 4096


def test_a_fresh_task_starts_with_every_signal_at_its_default(host: Host, workdir: Path) -> None:
    # As under `nohup`: the agent has SIGHUP ignored (ignored survives fork and exec), and no
    # task may inherit that. Read by the task's own process after an exec: from a child of its
    # shell it would race with dash, which blocks every signal around each fork.
    script = "cat /proc/1/cmdline; echo; exec grep -E '^Sig(Blk|Ign)' /proc/self/status"
    script += f" # {host.mark}"
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        outcome, output = run(host, ["sh", "-c", script], workdir, Limits())
    finally:
        signal.signal(signal.SIGHUP, hangup)
    assert outcome.exit_code == 0, output
    init, blocked, ignored = output.splitlines()
    # A fresh sandbox (its PID 1 is bwrap), not a warm one's launcher.
    assert init.split("\0")[0].endswith("/bwrap"), output
    assert blocked.split() == ["SigBlk:", "0" * 16], output
    assert ignored.split() == ["SigIgn:", "0" * 16], output


MEMORY_BOMB = (
    "hoard = []\n"
    "for _ in range(1024):\n"
    "    hoard.append(b'x' * 1048576)\n"  # written, so resident: 1 GiB in all
    "print('got 1 GiB', flush=True)\n"
)


def test_a_task_over_its_memory_is_oom_killed_and_told_why(host: Host, workdir: Path) -> None:
    outcome, output = run(host, python(host, MEMORY_BOMB), workdir, Limits(memory=64 * MIB))
    assert outcome.reason is EndReason.OOM, (outcome, output)
    assert outcome.message == "killed: out of memory (over its 64.0M limit)"
    assert "got 1 GiB" not in output


def test_a_task_under_its_memory_is_left_alone(host: Host, workdir: Path) -> None:
    script = "data = b'x' * (16 * 1048576)\nprint(len(data) // 1048576, flush=True)\n"
    outcome, output = run(host, python(host, script), workdir, Limits(memory=64 * MIB))
    assert outcome == TaskOutcome(EndReason.EXITED, 0, None, "exit code 0"), output
    assert output == "16\n"


FORK_BOMB = (
    "import os, time\n"
    "forks = 0\n"
    "try:\n"
    "    while forks < 1000:\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(300)\n"
    "            os._exit(0)\n"
    "        forks += 1\n"
    "except BlockingIOError:\n"  # EAGAIN: the pids limit
    "    pass\n"
    "print(forks, flush=True)\n"
    "for _ in range(1000):\n"  # stay until the test has counted the children
    "    if os.path.exists('counted'):\n"
    "        break\n"
    "    time.sleep(0.01)\n"
)


def test_a_fork_bomb_stops_at_the_pids_limit_and_leaves_nothing(host: Host, workdir: Path) -> None:
    seen: list[int] = []

    async def count_children(task: RunningTask, chunks: list[bytes]) -> None:
        await until(lambda: b"\n" in b"".join(chunks))
        seen.append(len(processes_with(host.mark)))
        (workdir / "counted").write_text("")

    outcome, output = run(host, python(host, FORK_BOMB), workdir, Limits(pids=50), count_children)
    assert outcome == TaskOutcome(EndReason.EXITED, 0, None, "exit code 0"), output
    forks = int(output)
    # bwrap, the sandbox's init and the task itself count against the 50 too.
    assert 40 <= forks <= 50 - 3
    # All of them and every child were alive (the children asleep) when the task exited.
    assert seen == [forks + 3]
    assert processes_with(host.mark) == []


CPU_SPIN = (
    "import time\n"
    "wall, cpu = time.monotonic(), time.process_time()\n"
    "while time.monotonic() - wall < 1.5:\n"
    "    pass\n"
    "print((time.process_time() - cpu) / (time.monotonic() - wall), flush=True)\n"
)


def test_a_cpu_spin_gets_its_quota(host: Host, workdir: Path) -> None:
    outcome, output = run(host, python(host, CPU_SPIN), workdir, Limits(cpus=0.25))
    assert outcome.exit_code == 0, output
    assert 0.0 < float(output) <= 0.35


def test_a_task_is_in_its_cgroups_while_it_runs_and_they_go_after(
    host: Host, workdir: Path
) -> None:
    script = f"echo up; while [ ! -e done ]; do sleep 0.01; done; : {host.mark}"
    members: list[set[int]] = []

    async def look(task: RunningTask, chunks: list[bytes]) -> None:
        await until(lambda: b"up\n" in b"".join(chunks))
        for cgroup in task_cgroups(host):
            members.append({int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()})
        members.append({task.pid})
        (workdir / "done").write_text("")

    for _ in range(2):  # the second task gets a cgroup of its own, removed as well
        members.clear()
        (workdir / "done").unlink(missing_ok=True)
        outcome, _ = run(host, ["sh", "-c", script], workdir, Limits(memory=64 * MIB), look)
        assert outcome.exit_code == 0
        *groups, (pid,) = members
        assert len(groups) == len(host.bases)
        # bwrap (as the task's host pid), the sandbox's init, the shell, maybe a sleep.
        assert all(pid in group and len(group) >= 3 for group in groups)
    assert task_cgroups(host) == []  # also checked by run() after each task


def test_an_oom_killed_task_leaves_no_cgroups(host: Host, workdir: Path) -> None:
    outcome, _ = run(host, python(host, MEMORY_BOMB), workdir, Limits(memory=32 * MIB))
    assert outcome.reason is EndReason.OOM
    assert task_cgroups(host) == []


def test_close_removes_the_per_agent_cgroups(host: Host, workdir: Path) -> None:
    outcome, _ = run(host, ["true"], workdir, Limits(memory=64 * MIB, cpus=1, pids=10))
    assert outcome.exit_code == 0
    assert all(base.is_dir() for base in host.bases)
    host.runner.close()
    assert [base for base in host.bases if base.exists()] == []


def test_a_bwrap_that_makes_no_sandbox_leaves_no_cgroups(host: Host, workdir: Path) -> None:
    fake = workdir / "bwrap"  # where the task user may run it
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    runner = BwrapRunner(str(fake), host.user, host.cgroups)

    async def go() -> None:
        await runner.start(task_launch(["true"], workdir, Limits(memory=64 * MIB)), ignore)

    with pytest.raises(SandboxError, match="No permissions to create new namespace"):
        asyncio.run(go())
    assert task_cgroups(host) == []


def test_a_start_cancelled_midway_leaves_no_process_and_no_cgroups(
    host: Host, workdir: Path
) -> None:
    # The agent cancels start() when it stops while a task is starting. Cancelled at any point
    # of bwrap's setup, nothing of the task may go on running (unsupervised, or stuck for ever
    # in its setup) nor hold its cgroups.
    argv = ["sh", "-c", f"sleep 30; : {host.mark}"]

    async def start_and_cancel(delay: float) -> None:
        starting = asyncio.create_task(
            host.runner.start(task_launch(argv, workdir, Limits(memory=64 * MIB)), ignore)
        )
        await asyncio.sleep(delay)
        starting.cancel()
        try:
            task = await starting
        except asyncio.CancelledError:
            return
        task.cancel("the test is over")  # it started before the cancel came
        await task.wait()

    for step in range(40):  # bwrap's setup takes a few milliseconds: cancel all along it
        asyncio.run(start_and_cancel(step * 0.0005))
    deadline = time.monotonic() + 2  # some time to die, once killed
    while (processes_with(host.mark) or task_cgroups(host)) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = [(p.pid, p.name()) for p in processes_with(host.mark)]
    assert left == [], "processes of cancelled starts live on"
    assert task_cgroups(host) == []
