"""The launcher inside a warm sandbox: PID 1 of the sandbox, it forks each task it is sent.

Not imported by the agent: it runs as ``python3 -I -S launcher.py FD`` under the host's own
Python from /usr, inside bubblewrap, as the task user, without capabilities. So it uses only
the standard library and runs on any Python from 3.9 on. FD is a SOCK_SEQPACKET socket to the
agent.

One spawn, as the agent drives it (see warm.py):

1. The agent sends ``{"id", "argv", "env", "cwd"}`` with two descriptors: the write end of the
   task's output pipe and the launcher's end of a per-task "sync" socket pair.
2. The launcher forks. The child starts a session, takes the pipe as stdout and stderr and sends
   one byte on the sync socket. The agent's end has SO_PASSCRED, so the kernel attaches the
   child's pid *as the agent sees it*; the agent moves that pid into the task's cgroup and
   answers ``g``. Only then does the child exec the command: all it ever runs is counted in its
   own cgroup.
3. The sync socket is close-on-exec: EOF tells the agent the command runs; a ``e<reason>``
   message tells it the exec failed.
4. When the child ends, the launcher sends ``{"id", "status"}`` (a wait status).

As PID 1 of its namespace the launcher cannot be sent a signal it has no handler for by anything
inside, so no task can kill it; it is made non-dumpable so no task can ptrace it either. Orphans
are handed to it and it reaps them. When the agent closes the socket, it exits and with it the
namespace: the kernel kills all that is left inside.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sys
from typing import Any, NoReturn

_PR_SET_DUMPABLE = 4
_RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGCHLD)


def _child(request: dict[str, Any], out_fd: int, sync: socket.socket) -> NoReturn:
    """In the forked child: become the task, once the agent has it in its cgroup."""
    try:
        os.setsid()
        for signum in _RESTORED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # Descriptors received over a socket are inheritable: the sync socket must close on
        # exec (that EOF is the agent's "it runs"), and the task gets only 0, 1 and 2.
        os.set_inheritable(sync.fileno(), False)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        for spare in {null, out_fd} - {0, 1, 2}:
            os.close(spare)
        sync.send(b"r")
        if sync.recv(1) != b"g":
            os._exit(127)  # the agent gave up on this task
        os.chdir(request["cwd"])
        argv = request["argv"]
        os.execvpe(argv[0], argv, request["env"])
    except BaseException as error:  # whatever happens, the agent must hear why
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        try:
            sync.send(("e" + argv_name(request) + ": " + reason).encode(errors="replace"))
        finally:
            os._exit(127)


def argv_name(request: dict[str, Any]) -> str:
    try:
        return str(request["argv"][0])
    except (KeyError, IndexError, TypeError):
        return "the command"


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # PID 1: no handler means no signal gets in
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children: dict[int, int] = {}
    control.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        ready, _, _ = select.select([control.fileno(), wake_read], [], [], 1.0)
        if wake_read in ready:
            os.read(wake_read, 4096)
        if control.fileno() in ready:
            message, fds, _, _ = socket.recv_fds(control, 1 << 20, 2)
            if not message:
                os._exit(0)  # the agent is done with this sandbox
            request = json.loads(message)
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                control.send(json.dumps({"id": request["id"], "error": "no pipes"}).encode())
                continue
            out_fd, sync_fd = fds
            try:
                pid = os.fork()
            except OSError as error:
                os.close(out_fd)
                os.close(sync_fd)
                reply = {"id": request["id"], "error": "fork failed: " + str(error.strerror)}
                control.send(json.dumps(reply).encode())
                continue
            if pid == 0:
                control.close()
                os.close(wake_read)
                os.close(wake_write)
                _child(request, out_fd, socket.socket(fileno=sync_fd))
            os.close(out_fd)
            os.close(sync_fd)
            children[pid] = request["id"]
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            task = children.pop(pid, None)
            if task is not None:
                control.send(json.dumps({"id": task, "status": status}).encode())
        else:
            # No tasks of ours: still reap the orphans handed to us.
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass


if __name__ == "__main__":
    main()
