"""What a Python worker in a sandbox runs on: an interpreter the sandbox shows, and its code.

The sandbox shows the host's /usr and nothing else (DESIGN.md §5). So a worker runs a Python
under /usr of the agent's own major.minor (the agent's interpreter if it lives there, else
``/usr/bin/pythonX.Y``), with ``-I``. Its code comes from a folder the agent stages at start:
the worker script and copies of cloudpickle and tblib, root-owned and world-readable, bound read
only (the agent's own package may sit in a folder the task user cannot enter). The agent's
site directories (a virtual environment, an editable checkout) are bound too, read only, where
the task user may read them; packages found nowhere else are then importable by calls.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import tblib

from planetary_mesh.sandbox.scratch import make_scratch
from planetary_mesh.sandbox.user import TaskUser

WORKER_SCRIPT = Path(__file__).parent.parent / "sandbox" / "py_worker.py"
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class PythonEnv:
    """How this agent starts Python workers, or why it cannot (``problem``)."""

    python: str | None
    support: Path  # the staged folder: py_worker.py, cloudpickle/, tblib/
    site_dirs: tuple[str, ...]  # the agent's site directories a worker may import from
    problem: str | None = None

    @property
    def script(self) -> str:
        return str(self.support / WORKER_SCRIPT.name)

    @property
    def ro_binds(self) -> tuple[str, ...]:
        return (str(self.support), *self.site_dirs)

    def close(self) -> None:
        shutil.rmtree(self.support, ignore_errors=True)


def prepare(sandboxed: bool, user: TaskUser | None) -> PythonEnv:
    """Stage the worker's code and choose its interpreter."""
    support = make_scratch("python")
    support.chmod(0o755)
    shutil.copyfile(WORKER_SCRIPT, support / WORKER_SCRIPT.name)
    for module in (cloudpickle, tblib):
        assert module.__file__ is not None
        shutil.copytree(
            Path(module.__file__).parent,
            support / module.__name__,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    for path in (support, *support.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if not sandboxed:  # no sandbox: the worker sees what the agent sees
        return PythonEnv(sys.executable, support, ())
    python = sandbox_python()
    problem = None
    if python is None:
        problem = (
            f"this agent runs Python {VERSION} from {sys.executable}, which the sandbox does not"
            f" show, and there is no /usr/bin/python{VERSION}: install it (apt-get install"
            f" python{VERSION}) or run the agent with a Python under /usr"
        )
    return PythonEnv(python, support, site_dirs(user), problem)


def sandbox_python() -> str | None:
    """A Python of the agent's major.minor that a sandbox shows (it shows only /usr)."""
    own = os.path.realpath(sys.executable)
    if own.startswith("/usr/"):
        return own
    versioned = f"/usr/bin/python{VERSION}"
    return versioned if os.access(versioned, os.X_OK) else None


def site_dirs(user: TaskUser | None) -> tuple[str, ...]:
    """The agent's import folders outside /usr and outside its own standard library, that the
    task user can read (a worker runs as that user)."""
    stdlib = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    found: list[str] = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        path = os.path.realpath(entry)
        if path.startswith("/usr/") or any(path.startswith(p + os.sep) for p in stdlib):
            continue
        if path not in found and (user is None or readable_by(Path(path), user)):
            found.append(path)
    return tuple(found)


def readable_by(folder: Path, user: TaskUser) -> bool:
    """Whether ``user`` (with only its own group) may enter every folder above ``folder`` and
    list and enter ``folder`` itself, by the permission bits."""

    def allows(info: os.stat_result, user_bit: int, group_bit: int, other_bit: int) -> bool:
        if info.st_uid == user.uid:
            return bool(info.st_mode & user_bit)
        if info.st_gid == user.gid:
            return bool(info.st_mode & group_bit)
        return bool(info.st_mode & other_bit)

    try:
        for parent in folder.parents:
            if not allows(os.stat(parent), stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                return False
        info = os.stat(folder)
    except OSError:
        return False
    return allows(info, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH) and allows(
        info, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH
    )
