"""What a sandbox costs per task, from the agent's view: start to outcome of /bin/true in a
fresh bubblewrap sandbox, in a job's warm sandbox, and as a plain fork+exec (the floor)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from planetary_mesh.sandbox.limits import Limits
from planetary_mesh.sandbox.runner import TaskLaunch, default_runner

MIB = 1024 * 1024
WARM_UP = 5


async def _sandboxed(mode: str, count: int) -> list[float]:
    runner = default_runner(allow_unsandboxed=False, warm=mode)
    root = Path(tempfile.mkdtemp(prefix="pm-bench-sandbox-"))
    root.chmod(0o711)
    job = root / "job"
    job.mkdir(mode=0o711)
    samples = []
    try:
        for i in range(count + WARM_UP):
            workdir = job / f"{i}-1"
            workdir.mkdir(mode=0o700)
            launch = TaskLaunch(
                argv=("/bin/true",), env={}, workdir=workdir, timeout=30,
                limits=Limits(memory=256 * MIB, cpus=1.0), share="bench", share_size=count,
            )  # fmt: skip
            started = time.perf_counter()
            task = await runner.start(launch, lambda _data: None)
            outcome = await task.wait()
            took = time.perf_counter() - started
            if outcome.exit_code != 0:
                raise RuntimeError(f"/bin/true in a {mode} sandbox: {outcome}")
            if i >= WARM_UP:
                samples.append(took)
    finally:
        runner.close()
        shutil.rmtree(root, ignore_errors=True)
    return samples


async def _fork_exec(count: int) -> list[float]:
    samples = []
    for i in range(count + WARM_UP):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("/bin/true")
        await proc.wait()
        if i >= WARM_UP:
            samples.append(time.perf_counter() - started)
    return samples


def measure(count: int) -> dict[str, list[float]]:
    return {
        "fresh_sandbox": asyncio.run(_sandboxed("off", count)),
        "warm_sandbox": asyncio.run(_sandboxed("always", count)),
        "fork_exec": asyncio.run(_fork_exec(count)),
    }
