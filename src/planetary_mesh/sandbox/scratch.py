"""Folders an agent keeps in the temporary directory for its life (task work directories, the
warm launcher, the Python workers' code), named with the agent's pid: an agent removes its own
when it stops; those of an agent that died outright (kill -9) are removed by its watchdog, or by
the next agent to start on the machine.

Named ``planetary-mesh-<kind>-<pid>-<random>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "planetary-mesh-"


def make_scratch(kind: str) -> Path:
    """A new folder of ``kind`` (a word, no dash) for this process, readable only by its
    owner until the caller says otherwise."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}-"))


def sweep_scratch(agent_pid: int | None = None, root: Path | None = None) -> int:
    """Remove the folders of agent ``agent_pid`` (None: of every agent whose process is gone);
    how many were removed. Folders of a live process are left alone, whatever their pid."""
    removed = 0
    for path in (root or Path(tempfile.gettempdir())).glob(f"{PREFIX}*"):
        parts = path.name.removeprefix(PREFIX).split("-")
        if len(parts) != 3 or not parts[1].isdigit() or not path.is_dir():
            continue
        owner = int(parts[1])
        if agent_pid is not None and owner != agent_pid:
            continue
        if agent_pid is None and not gone(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for its parent has too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"
