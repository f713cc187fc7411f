"""The agent keeps cgroup moves quick while tasks start by moving itself to where it already
is (see MoveWarmer): it must stay where it is, and stop once tasks stop starting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from planetary_mesh.sandbox.limits import detect_cgroups, move_warmer


def test_the_move_warmer_leaves_the_agent_where_it_is_and_stops_when_tasks_stop() -> None:
    before = Path("/proc/self/cgroup").read_text()
    backend = detect_cgroups()

    async def scenario() -> None:
        warmer = move_warmer(backend, period_s=0.002, active_s=0.05)
        assert warmer is not None, "no cgroups here: run as root on a cgroup host"
        try:
            assert not warmer.active  # idle until a task starts
            warmer.touch()
            assert warmer.active
            deadline = time.monotonic() + 5
            while warmer.active:
                assert time.monotonic() < deadline, "it never stopped"
                await asyncio.sleep(0.01)
            warmer.touch()  # a later start wakes it again
            assert warmer.active
        finally:
            warmer.close()
        assert not warmer.active

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    assert Path("/proc/self/cgroup").read_text() == before
