"""The task runners with real processes: output, exit statuses, environment, files, timeouts,
and above all that killing a task leaves no process of it behind."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from planetary_mesh.errors import SandboxError
from planetary_mesh.sandbox.bwrap import BwrapRunner, bwrap_problem
from planetary_mesh.sandbox.plain import PlainRunner
from planetary_mesh.sandbox.runner import (
    EndReason,
    Runner,
    TaskLaunch,
    TaskOutcome,
    default_runner,
)

BWRAP = shutil.which("bwrap")
BWRAP_PROBLEM = "bwrap is not installed" if BWRAP is None else bwrap_problem(BWRAP)


def _bwrap() -> Runner:
    # Fail, never skip: the test suite installs bubblewrap (scripts/install.sh).
    if BWRAP_PROBLEM is not None:
        pytest.fail(f"the sandbox tests need a working bwrap: {BWRAP_PROBLEM}", pytrace=False)
    return BwrapRunner()


@pytest.fixture(params=["none", "bwrap"])
def runner(request: pytest.FixtureRequest) -> Runner:
    return PlainRunner() if request.param == "none" else _bwrap()


@pytest.fixture
def bwrap_runner() -> Runner:
    return _bwrap()


@pytest.fixture
def marker() -> Iterator[str]:
    """A string only this test's processes carry; kills any left over, whatever the test did."""
    mark = f"pm-test-{uuid.uuid4().hex}"
    yield mark
    for proc in marked(mark):
        proc.kill()


def marked(mark: str) -> list[psutil.Process]:
    """Live processes with ``mark`` in their command line or environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(mark in arg for arg in proc.cmdline()) or mark in proc.environ().values():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sleeps_of(mark: str) -> list[psutil.Process]:
    return [p for p in marked(mark) if p.name() == "sleep"]


def alive(proc: psutil.Process, zombies_count: bool) -> bool:
    try:
        return proc.is_running() and (zombies_count or proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def launch(
    argv: Sequence[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float | None = 10.0,
    network: bool = False,
) -> TaskLaunch:
    return TaskLaunch(tuple(argv), env or {}, workdir, timeout, network)


async def run_task(runner: Runner, task_launch: TaskLaunch) -> tuple[TaskOutcome, bytes]:
    chunks: list[bytes] = []
    task = await runner.start(task_launch, chunks.append)
    try:
        outcome = await task.wait()
    finally:
        task.cancel("the test is over")  # a no-op if it ended; a kill if the test failed
    return outcome, b"".join(chunks)


def run(runner: Runner, task_launch: TaskLaunch) -> tuple[TaskOutcome, bytes]:
    return asyncio.run(run_task(runner, task_launch))


async def until(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def test_output_of_stdout_and_stderr_is_collected(runner: Runner, tmp_path: Path) -> None:
    outcome, output = run(runner, launch(["sh", "-c", "echo hello; echo oops >&2"], tmp_path))
    assert outcome == TaskOutcome(EndReason.EXITED, 0, None, "exit code 0")
    assert output == b"hello\noops\n"


def test_large_output_arrives_whole_before_wait_returns(runner: Runner, tmp_path: Path) -> None:
    outcome, output = run(runner, launch(["head", "-c", "5000000", "/dev/zero"], tmp_path))
    assert outcome.exit_code == 0
    assert len(output) == 5_000_000


def test_exit_code_is_reported(runner: Runner, tmp_path: Path) -> None:
    outcome, _ = run(runner, launch(["sh", "-c", "exit 3"], tmp_path))
    assert outcome == TaskOutcome(EndReason.EXITED, 3, None, "exit code 3")


def test_death_by_signal_is_reported(runner: Runner, tmp_path: Path) -> None:
    outcome, _ = run(runner, launch(["sh", "-c", "kill -SEGV $$"], tmp_path))
    assert outcome == TaskOutcome(EndReason.SIGNALLED, None, 11, "killed by signal SIGSEGV")


def test_task_sees_only_the_environment_it_was_given(
    runner: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PM_AGENT_SECRET", "hunter2")
    home = f"/work/{tmp_path.name}" if runner.sandboxed else str(tmp_path.resolve())
    _, output = run(runner, launch(["env"], tmp_path, env={"GREETING": "hi"}))
    assert set(output.decode().splitlines()) == {
        "GREETING=hi",
        "PATH=/usr/bin:/bin",
        f"HOME={home}",
        f"PWD={home}",
    }
    _, output = run(runner, launch(["env"], tmp_path, env={"HOME": "/nowhere", "PATH": "/usr/bin"}))
    assert {"HOME=/nowhere", "PATH=/usr/bin"} <= set(output.decode().splitlines())


def test_task_reads_and_writes_its_work_directory(runner: Runner, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("the input\n")
    script = "cat input.txt; echo made > output.txt; cat $HOME/input.txt"
    outcome, output = run(runner, launch(["sh", "-c", script], tmp_path))
    assert outcome.reason is EndReason.EXITED and outcome.exit_code == 0
    assert output == b"the input\nthe input\n"
    assert (tmp_path / "output.txt").read_text() == "made\n"


def test_timeout_kills_the_task_promptly(runner: Runner, tmp_path: Path) -> None:
    started = time.monotonic()
    outcome, _ = run(runner, launch(["sleep", "30"], tmp_path, timeout=1))
    assert outcome == TaskOutcome(EndReason.TIMEOUT, None, None, "timed out after 1s")
    assert time.monotonic() - started < 3


def test_missing_command_could_not_start(runner: Runner, tmp_path: Path) -> None:
    # The plain runner fails in start(), bwrap only once its sandbox is made; the agent reports
    # both the same way.
    try:
        outcome, _ = run(runner, launch(["no-such-command-here"], tmp_path))
    except SandboxError as error:
        outcome = TaskOutcome.could_not_start(str(error))
    assert outcome.reason is EndReason.SANDBOX_ERROR
    assert outcome.message.startswith("could not start: ")
    assert "no-such-command-here" in outcome.message


def test_bad_environment_names_are_refused(tmp_path: Path) -> None:
    for name in ("BAD-NAME", "1ABC", "A=B", ""):
        with pytest.raises(SandboxError, match="environment variable name"):
            launch(["true"], tmp_path, env={name: "x"})


def test_cancel_kills_the_whole_tree(runner: Runner, tmp_path: Path, marker: str) -> None:
    # The grandchild goes into its own session (setsid) and lets go of the output pipe, as a
    # daemon does, so the end of output says nothing about it. Under bwrap that is an escape from
    # everything but the PID namespace; with the plain runner its parent stays alive, so it is
    # still found as a descendant (the setsid + double fork escape is the documented gap).
    daemon = f'setsid sh -c "sleep 300; : {marker}" >/dev/null 2>&1 </dev/null'
    script = f"{daemon} & sleep 300; : {marker}"

    async def scenario() -> tuple[TaskOutcome, list[psutil.Process]]:
        task_launch = launch(["sh", "-c", script], tmp_path, {"MARK": marker})
        task = await runner.start(task_launch, lambda chunk: None)
        try:
            await until(lambda: len(sleeps_of(marker)) == 2)
            sleeps = sleeps_of(marker)
            task.cancel("no longer wanted")
            task.cancel("asked twice")
            return await task.wait(), sleeps
        finally:
            task.cancel("the test is over")

    outcome, sleeps = asyncio.run(scenario())
    assert outcome == TaskOutcome(EndReason.CANCELLED, None, None, "cancelled: no longer wanted")
    # Checked at once, no polling: wait() returns only when the tree is gone. bwrap leaves not
    # even zombies (the namespace's init reaps them before it dies); orphans of the plain runner
    # are reaped by the host's init, which may lag.
    assert [p for p in sleeps if alive(p, zombies_count=runner.sandboxed)] == []
    assert marked(marker) == []


def test_stragglers_die_when_the_task_exits(runner: Runner, tmp_path: Path, marker: str) -> None:
    # bwrap catches a setsid'd grandchild after its parent exits; the plain runner cannot.
    escape = "setsid " if runner.sandboxed else ""
    daemon = f'{escape}sh -c "sleep 300; : {marker}" >/dev/null 2>&1 </dev/null'
    script = f"{daemon} & sleep 0.2; echo left; : {marker}"
    outcome, output = run(runner, launch(["sh", "-c", script], tmp_path, {"MARK": marker}))
    assert outcome.reason is EndReason.EXITED and outcome.exit_code == 0
    assert output == b"left\n"
    assert marked(marker) == []


def test_bwrap_hides_the_host(bwrap_runner: Runner, tmp_path: Path) -> None:
    outcome, output = run(bwrap_runner, launch(["ls", "-a", "/"], tmp_path))
    assert outcome.exit_code == 0
    seen = set(output.decode().split())
    assert "root" not in seen and "home" not in seen and "etc" not in seen
    assert {"usr", "work", "tmp", "proc", "dev"} <= seen
    outcome, _ = run(bwrap_runner, launch(["sh", "-c", "test -e /root || test -e /home"], tmp_path))
    assert outcome.exit_code == 1


def test_bwrap_shows_a_device_only_to_the_task_given_it(
    bwrap_runner: Runner, tmp_path: Path
) -> None:
    # As a GPU's device files are shown to the task holding it (agent/gpus.py); /dev/kmsg
    # stands in for one: a character device of the host that bwrap's own /dev lacks.
    device = "/dev/kmsg"
    check = ["sh", "-c", f"test -c {device}"]
    outcome, _ = run(bwrap_runner, launch(check, tmp_path))
    assert outcome.exit_code == 1  # hidden by default
    given = TaskLaunch(tuple(check), {}, tmp_path, 10.0, devices=(device,))
    outcome, _ = run(bwrap_runner, given)
    assert outcome.exit_code == 0


def test_bwrap_has_no_network_unless_asked(bwrap_runner: Runner, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        argv = ["/usr/bin/python3", "-c", connect]
        closed, output = run(bwrap_runner, launch(argv, tmp_path))
        assert closed.reason is EndReason.EXITED and closed.exit_code == 1
        assert b"Errno" in output
        # The same connection works when the job asks for the network: the test is not vacuous.
        opened, output = run(bwrap_runner, launch(argv, tmp_path, network=True))
        assert opened.exit_code == 0, output


@pytest.fixture
def broken_bwrap() -> Iterator[str]:
    """A stand-in for a bwrap that refuses, as it does where user namespaces are off; where the
    task user may run it (pytest's tmp_path is root's alone), as a root agent runs bwrap."""
    folder = Path(tempfile.mkdtemp(prefix="pm-broken-bwrap-"))
    try:
        folder.chmod(0o755)
        fake = folder / "bwrap"
        fake.write_text(
            "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"
        )
        fake.chmod(0o755)
        yield str(fake)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_bwrap_that_makes_no_sandbox_fails_to_start(broken_bwrap: str, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match=r"^bwrap: No permissions to create new namespace$"):
        run(BwrapRunner(broken_bwrap), launch(["true"], tmp_path))


def test_default_runner_with_a_broken_bwrap(
    broken_bwrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name: broken_bwrap if name == "bwrap" else found(name)
    )
    with pytest.raises(SandboxError, match=r"cannot make a sandbox here \(bwrap: No perm"):
        default_runner(allow_unsandboxed=False)
    assert default_runner(allow_unsandboxed=True).name == "none"


def test_default_runner_prefers_bwrap(bwrap_runner: Runner) -> None:
    chosen = default_runner(allow_unsandboxed=False)
    assert (chosen.name, chosen.sandboxed) == ("bwrap", True)


def test_default_runner_without_bwrap(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxError, match=r"not installed.*--no-sandbox"):
        default_runner(allow_unsandboxed=False)
    with caplog.at_level(logging.WARNING):
        chosen = default_runner(allow_unsandboxed=True)
    assert (chosen.name, chosen.sandboxed) == ("none", False)
    assert "WITHOUT A SANDBOX" in caplog.text


def test_the_bwrap_probe_leaves_no_folder_behind() -> None:
    # Every agent probes bwrap as it starts; the probe's launcher folder stayed in /tmp after
    # the agent stopped, until the next agent's sweep.
    assert BWRAP is not None
    mine = f"planetary-mesh-launcher-{os.getpid()}-*"
    before = set(Path(tempfile.gettempdir()).glob(mine))
    assert bwrap_problem(BWRAP) is None
    assert set(Path(tempfile.gettempdir()).glob(mine)) == before
