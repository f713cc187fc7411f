"""A watchdog beside a root agent: when the agent dies, however it dies, kill what is left in its
task cgroups, and remove its folders in the temporary directory (scratch.py).

bwrap's own "die with parent" signal lives in a process the task can reach (the sandbox's first
process, same user): a task could switch it off and outlive a kill -9 of its agent. This process
is root's, outside every sandbox, and waits for the end of a pipe whose other end only the agent
holds: at EOF the agent is gone, and its cgroups are swept.

Run as ``python -m planetary_mesh.sandbox.reaper AGENT_PID TAG FD``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from planetary_mesh.sandbox.limits import reap_stale_task_cgroups
from planetary_mesh.sandbox.scratch import gone, sweep_scratch


def start_reaper(tag: str) -> int:
    """Start the watchdog for this process's cgroups named ``tag``; the write end of its pipe,
    to keep open for life."""
    read_end, write_end = os.pipe()
    module = "planetary_mesh.sandbox.reaper"
    subprocess.Popen(
        [sys.executable, "-m", module, str(os.getpid()), tag, str(read_end)],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C meant for the agent must not stop its watchdog first
    )
    os.close(read_end)
    return write_end


def main() -> None:
    agent_pid, tag, fd = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    while os.read(fd, 4096):
        pass  # nothing is ever written: EOF means the agent is gone (or closed its runner)
    reap_stale_task_cgroups(agent_pid, tag=tag)
    if gone(agent_pid):  # dead, not just closing its runner (then it removes its own)
        sweep_scratch(agent_pid)


if __name__ == "__main__":
    main()
