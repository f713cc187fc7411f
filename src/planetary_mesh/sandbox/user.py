"""The unprivileged account tasks run as when the agent runs as root.

A root agent drops to it before ``bwrap`` (the C launcher's helper does, or else ``setpriv``), so
a task is an ordinary user even where a sandbox escape would leave it: it cannot read the agent's
keys (mode 0600, root's) or anything else root keeps to itself.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from planetary_mesh.errors import SandboxError

TASK_USER = "mesh-task"
LOCK_FILE = (
    "/run/lock/planetary-mesh-task-user.lock"
    if os.path.isdir("/run/lock")
    else ("/tmp/planetary-mesh-task-user.lock")
)


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int

    def setpriv(self) -> list[str]:
        """The command prefix that becomes this user with no capabilities and no way back."""
        return [
            _setpriv(),
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
        ]


@functools.cache
def _setpriv() -> str:
    return shutil.which("setpriv") or "/usr/bin/setpriv"  # a search of PATH: once


def _lookup(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def task_user(name: str = TASK_USER) -> TaskUser | None:
    """The account tasks run as: ``name`` (made if missing) for a root agent; None when the agent
    is itself unprivileged, and its tasks run as its own user."""
    if os.geteuid() != 0:
        return None
    # Several agents may start at once on a new machine, and useradd checks for the name
    # before it locks /etc/passwd: two at once can both add it. One at a time, then.
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entry = _lookup(name)
        if entry is None:
            done = subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            entry = _lookup(name)
            if entry is None:
                raise SandboxError(
                    f"cannot create the task user {name!r} ({done.stderr.strip()}): create it "
                    f"yourself (useradd --system {name})"
                )
    if entry.pw_uid == 0:
        raise SandboxError(f"the task user {name!r} is root: give tasks an unprivileged account")
    return TaskUser(name, entry.pw_uid, entry.pw_gid)
