"""The work Dask and Ray run, importable by their workers (pickled by reference)."""

from __future__ import annotations

import os
import subprocess
import time

from bench.common import spin


def run_true(_: int = 0) -> int:
    """The command scenario: the same /bin/true the mesh runs, from a worker."""
    return subprocess.run(["/bin/true"], check=False).returncode


def noop(_: int = 0) -> None:
    return None


def spin_task(n: int) -> int:
    return spin(n)


def marked_sleep(path: str, seconds: float) -> int:
    """Say where and when it started (one line per attempt), then sleep."""
    with open(path, "a") as out:
        out.write(f"{os.getpid()} {time.time()}\n")
    time.sleep(seconds)
    return os.getpid()
