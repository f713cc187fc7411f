"""What a dead agent leaves in its task cgroups is swept up: by the next agent at start, or by
the harness that killed it. Real cgroups (this suite runs as root), real processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import wait_for

from planetary_mesh.sandbox.limits import (
    CGROUP_ROOT,
    CgroupV1,
    Limits,
    detect_cgroups,
    own_cgroups,
    reap_stale_task_cgroups,
)


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_a_dead_agents_leftover_task_is_killed_and_its_cgroups_freed() -> None:
    backend = detect_cgroups()
    if not isinstance(backend, CgroupV1):
        pytest.fail(f"this test expects cgroup v1 here, found {backend.name}", pytrace=False)
    backend.close()
    v1, _ = own_cgroups(Path("/proc/self/cgroup").read_text())
    dead = _dead_pid()
    # Lay out what an agent with that pid would have made, with a live "task" inside.
    stale = CgroupV1(CGROUP_ROOT, v1, f"planetary-mesh-{dead}")
    group = stale.create(Limits(memory=64 * 2**20, cpus=1))
    assert group is not None
    leftover = subprocess.Popen(["sleep", "300"])
    try:
        for procs in group.procs_files():
            procs.write_text(str(leftover.pid))
        bases = [path.parent.parent for path in group.procs_files()]
        assert all(base.name == f"planetary-mesh-{dead}" for base in bases)

        assert reap_stale_task_cgroups(dead) >= 1
        wait_for(lambda: leftover.poll() is not None, 5, "the leftover to die")
        assert leftover.returncode == -9
        assert not any(base.exists() for base in bases)
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        group.remove()
        stale.close()


def test_a_live_agents_cgroups_are_left_alone() -> None:
    backend = detect_cgroups()  # ours: this process is alive
    try:
        group = backend.create(Limits(memory=64 * 2**20))
        assert group is not None
        reap_stale_task_cgroups()
        assert all(p.parent.exists() for p in group.procs_files())
        group.remove()
    finally:
        backend.close()
