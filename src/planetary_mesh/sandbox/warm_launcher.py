"""The launcher inside a warm sandbox: PID 1 of the sandbox, it spawns each task it is sent.

warm_launcher.c is the same in C, and runs wherever the agent can compile it (it starts ~10 ms
sooner); this one runs where it cannot. Both speak the protocol below.

Not imported by the agent: it runs as ``python3 -I -S launcher CONTROL RLIMITS HOME...``
under the host's own Python from /usr, inside bubblewrap, as the task user, without
capabilities. So it uses only the standard library and runs on any Python from 3.9 on; it
imports only built-in modules, as each job's first start waits on it (json, socket and signal
cost ~20 ms of imports here). CONTROL is a SOCK_SEQPACKET socket to the agent; RLIMITS the
tasks' rlimits ("RLIMIT_CORE=0,RLIMIT_FSIZE=..."); each HOME is the launcher's own
``cgroup.procs`` in one hierarchy, opened for writing by the agent. The launcher joins its
cgroup and takes the rlimits itself as it starts (all its tasks inherit them), so the agent
spawns the sandbox without running code between fork and exec.

One spawn, as the agent drives it (see warm.py):

1. The agent sends the task's id, work directory, argument count, arguments and environment
   (``NAME=value``), each ended by a NUL byte (no module is needed to read that), with
   descriptors: the write end of the task's output pipe, then the task's own ``cgroup.procs``
   in each hierarchy, opened for writing by the agent (the kernel checks a cgroup move against
   who *opened* the file).
2. The launcher moves itself into the task's cgroups, spawns the command there (posix_spawn:
   vfork and exec, a new session, signals as a fresh process has them, stdin /dev/null, the
   pipe as stdout and stderr) and moves itself home. So all the task ever runs is counted in
   its own cgroup from its first instruction, and no Python process is forked per task: a fork
   of the launcher, with its copy-on-write faults, cost several times the task's own start.
3. It answers ``<id> started <pid>``, or ``<id> failed <reason>`` when the command cannot run
   (not found, not executable: the task's own fault), or ``<id> error <reason>`` when it could
   not try (the agent then starts the task in a fresh sandbox). Plain text: the agent parses
   nothing richer from inside a sandbox.
4. When the child ends, the launcher sends ``<id> status <wait status>``.

As PID 1 of its namespace the launcher cannot be sent a signal it has no handler for by anything
inside, so no task can kill it; it is made non-dumpable so no task can ptrace it or open its
descriptors either. Orphans are handed to it and it reaps them. When the agent closes the
socket, it exits and with it the namespace: the kernel kills all that is left inside.
"""

from __future__ import annotations

# Each import here is paid by every new job's sandbox. Not `signal` (it imports enum: ~6 ms),
# not `ctypes` (its package: ~6 ms; its C module alone: ~0.8), not `array` (it imports
# collections: ~3.5 ms).
import _ctypes
import _signal  # type: ignore[import-not-found]
import _socket
import os
import resource
import select
import sys

TYPE_CHECKING = False  # typing itself costs ~13 ms to import; mypy reads this as True
if TYPE_CHECKING:
    from typing import Any

_PR_SET_DUMPABLE = 4
# What a task starts with: every signal at its default, and none blocked. Not only those
# Python ignores or handles: an agent started under `nohup` (SIGHUP) or from a shell's
# background (SIGINT, SIGQUIT) passes SIG_IGN down through every exec.
_DEFAULT_SIGNALS = tuple(
    s for s in _signal.valid_signals() if s not in (_signal.SIGKILL, _signal.SIGSTOP)
)
_MAX_FDS = 16  # the output pipe and a cgroup.procs per hierarchy
_FD_BYTES = 4  # a C int, as SCM_RIGHTS carries descriptors


class _CannotTry(Exception):
    """The launcher could not spawn the task (not the command's fault)."""


def _join(procs_fds: list[int]) -> None:
    for fd in procs_fds:
        os.write(fd, b"0")  # "0": the writer itself


def _command_path(argv: list[str], env: dict[str, str]) -> str:
    """argv[0] as execvpe would find it: on the task's PATH unless it names a path."""
    name = argv[0]
    if "/" in name:
        return name
    for folder in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, "No such file or directory")


def parse(message: bytes) -> tuple[str, str, list[str], dict[str, str]]:
    """A request's task id, work directory, argv and environment. Raises ValueError."""
    fields = [os.fsdecode(field) for field in message.split(b"\0")]
    if len(fields) < 5 or fields[-1] != "":
        raise ValueError("a malformed request")
    argc = int(fields[2])
    if argc < 1 or 3 + argc > len(fields) - 1:
        raise ValueError("a malformed request")
    env = dict(entry.partition("=")[::2] for entry in fields[3 + argc : -1])
    return fields[0], fields[1], fields[3 : 3 + argc], env


def spawn(
    cwd: str,
    argv: list[str],
    env: dict[str, str],
    out_fd: int,
    task_procs: list[int],
    home: list[int],
) -> int:
    """Spawn the command in the task's cgroups; its pid. Raises OSError when the command cannot
    run, _CannotTry when the launcher could not try."""
    try:
        _join(task_procs)
    except OSError as error:
        _join(home)  # a move that half happened is undone
        raise _CannotTry("cannot join the task's cgroup: " + str(error.strerror)) from error
    try:
        os.chdir(cwd)
        return os.posix_spawn(
            _command_path(argv, env),
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, out_fd, 2),
            ],
            setsid=True,
            setsigmask=(),
            setsigdef=_DEFAULT_SIGNALS,
        )
    finally:
        os.chdir("/")
        try:
            _join(home)
        except OSError:
            os._exit(70)  # it must not stay among the task's processes: the sandbox ends


def _receive(control: Any) -> tuple[bytes, list[int]]:
    """One message and the descriptors sent with it."""
    space = _socket.CMSG_SPACE(_MAX_FDS * _FD_BYTES)
    message, ancillary, _, _ = control.recvmsg(1 << 20, space)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            for start in range(0, len(data) - _FD_BYTES + 1, _FD_BYTES):
                fds.append(int.from_bytes(data[start : start + _FD_BYTES], sys.byteorder))
    return message, fds


def _make_undumpable() -> None:
    """prctl(PR_SET_DUMPABLE, 0) through ctypes' C module alone."""

    if TYPE_CHECKING:
        int_base = _ctypes._SimpleCData[int]
    else:  # not subscriptable at run time
        int_base = _ctypes._SimpleCData

    class CInt(int_base):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    program = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]  # NULL: the program itself
    prctl = Function(_ctypes.dlsym(program, "prctl"))
    if prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(_ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def main() -> None:
    control = _socket.socket(fileno=int(sys.argv[1]))
    home = [int(fd) for fd in sys.argv[3:]]
    # Passed down as inheritable; no task may get them.
    for fd in (control.fileno(), *home):
        os.set_inheritable(fd, False)
    _join(home)
    for limit in sys.argv[2].split(","):
        name, _, value = limit.partition("=")
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    _make_undumpable()
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # PID 1: no handler, no signal gets in
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    _signal.set_wakeup_fd(wake_write)
    _signal.signal(_signal.SIGCHLD, lambda signum, frame: None)
    children: dict[int, str] = {}
    control.send(b"ready " + str(os.getpid()).encode())
    while True:
        ready, _, _ = select.select([control.fileno(), wake_read], [], [], 1.0)
        if wake_read in ready:
            os.read(wake_read, 4096)
        if control.fileno() in ready:
            message, fds = _receive(control)
            if not message:
                os._exit(0)  # the agent is done with this sandbox
            for fd in fds:  # received descriptors are inheritable: none may reach a task
                os.set_inheritable(fd, False)
            task = message.partition(b"\0")[0].decode(errors="replace") or "0"
            try:
                task, cwd, argv, env = parse(message)
                if len(fds) != 1 + len(home):
                    raise _CannotTry(f"{len(fds)} descriptors sent, {1 + len(home)} expected")
                pid = spawn(cwd, argv, env, fds[0], fds[1:], home)
            except (_CannotTry, ValueError) as error:
                reply = f"{task} error {error}"
            except OSError as error:
                reply = f"{task} failed {argv[0]}: {error.strerror or error}"
            else:
                children[pid] = task
                reply = f"{task} started {pid}"
            finally:
                for fd in fds:
                    os.close(fd)
            control.send(reply.encode(errors="replace"))
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            task_id = children.pop(pid, None)
            if task_id is not None:
                control.send(f"{task_id} status {status}".encode())
        else:
            # No tasks of ours: still reap the orphans handed to us.
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass


if __name__ == "__main__":
    main()
