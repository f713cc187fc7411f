"""An agent's folders in the temporary directory: those of an agent that died are found by the
pid in their name and removed; a live process's never are."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from planetary_mesh.sandbox.scratch import gone, sweep_scratch


def test_only_the_folders_of_dead_agents_are_swept(tmp_path: Path) -> None:
    # A process that ran and was reaped: its pid names no live process now.
    shell = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    dead_pid = int(shell.stdout)
    assert gone(dead_pid)
    mine = tmp_path / f"planetary-mesh-work-{os.getpid()}-abc"
    theirs = tmp_path / f"planetary-mesh-python-{dead_pid}-xyz"
    unrelated = tmp_path / "planetary-mesh-something-else"
    for folder in (mine, theirs, unrelated):
        folder.mkdir()
        (folder / "file").write_text("x")
    assert sweep_scratch(root=tmp_path) == 1
    assert mine.exists() and unrelated.exists() and not theirs.exists()
    assert not gone(os.getpid())
    # The watchdog of an agent names it: its folders go, whoever else's stay.
    assert sweep_scratch(agent_pid=os.getpid(), root=tmp_path) == 1
    assert not mine.exists() and unrelated.exists()
