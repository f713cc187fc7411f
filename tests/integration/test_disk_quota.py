"""A task's work directory lives on the host's disk: past its quota the task is killed, and the
end says why. Real bwrap, real files."""

from __future__ import annotations

import asyncio
from pathlib import Path

from planetary_mesh.sandbox.bwrap import BwrapRunner
from planetary_mesh.sandbox.limits import Limits
from planetary_mesh.sandbox.runner import EndReason, TaskLaunch, TaskOutcome, disk_usage

MIB = 2**20
# Many files, so the per-file size limit is no help: 1 MiB every 20 ms, up to 200 MiB.
WRITER = (
    "import time\n"
    "for i in range(200):\n"
    "    open(f'f{i}', 'wb').write(b'x' * 1048576)\n"
    "    time.sleep(0.02)\n"
    "print('wrote it all')\n"
)


def _run(workdir: Path, disk: int | None) -> TaskOutcome:
    async def go() -> TaskOutcome:
        launch = TaskLaunch(
            argv=("python3", "-c", WRITER),
            env={},
            workdir=workdir,
            timeout=60,
            limits=Limits(disk=disk),
        )
        task = await BwrapRunner().start(launch, lambda _: None)
        try:
            return await task.wait()
        finally:
            task.cancel("test over")

    return asyncio.run(go())


def test_a_task_past_its_disk_quota_is_killed_and_told_why(tmp_path: Path) -> None:
    outcome = _run(tmp_path, disk=20 * MIB)
    assert outcome.reason is EndReason.DISK_QUOTA
    assert "20.0M disk quota" in outcome.message
    # Stopped within about a second of writing past the quota, far from the 200 MiB it wanted.
    assert disk_usage(tmp_path) < 80 * MIB


def test_a_task_within_its_quota_is_left_alone(tmp_path: Path) -> None:
    outcome = _run(tmp_path, disk=400 * MIB)
    assert outcome.reason is EndReason.EXITED and outcome.exit_code == 0
    assert disk_usage(tmp_path) >= 200 * MIB
