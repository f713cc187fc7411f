"""Resource limits in layers: cgroups where the host allows (v1 or v2), rlimits always.

A cgroup per task caps its memory (no swap: a task over its memory is OOM-killed and the end says
so), its CPU (a CFS quota of its declared CPUs) and its number of processes (a fork bomb stops
there). rlimits are the second layer, set in the spawned process before it execs: no core dumps,
a bound on file size and open files, and a bound on processes per task user.

Each backend works on a root path, so the tests can run it on a fake cgroup tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000
DEFAULT_PIDS = 1024  # processes and threads of one task
FILE_SIZE_LIMIT = 4 * 1024**3  # one file a task writes
OPEN_FILES_LIMIT = 4096
USER_PROCESSES_LIMIT = 16384  # all tasks of the task user together
# A cgroup is reused for the next task only if its last task left at most this much memory
# charged to it (tmpfs files stay charged to the cgroup that wrote them).
REUSE_CHARGE_LEFT = 4 * 1024**2


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = DEFAULT_PIDS
    disk: int | None = None  # bytes the work directory may take on the host's disk


class TaskCgroup(Protocol):
    def procs_files(self) -> list[Path]:
        """Where the spawned process writes its pid to join the cgroup (before it execs)."""
        ...

    def oom_killed(self) -> bool: ...

    def limit(self, limits: Limits) -> None:
        """Set ``limits`` on an empty cgroup (one made ahead): each limit given replaces the one
        it had, if any. Raises OSError."""
        ...

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, whatever namespace or session it is in. On v1,
        one that forked just then may leave a child: callers kill again until empty()."""
        ...

    def empty(self) -> bool: ...

    def reusable(self, oom_killed: bool | None = None) -> bool:
        """Whether another task may have it: nothing was OOM-killed in it (``oom_killed``, when
        the caller has read it already) and what its last task left charged to it (files in a
        shared /tmp) is a trifle."""
        ...

    def remove(self) -> bool: ...


class CgroupBackend(Protocol):
    name: str  # "cgroup v1", "cgroup v2" or "none"
    controllers: tuple[str, ...]
    tag: str  # the name of its folder in each hierarchy: planetary-mesh-<agent pid>.<n>

    def create(self, limits: Limits) -> TaskCgroup | None: ...

    def close(self) -> None: ...


# The rlimit layer, by resource name (a warm sandbox's launcher is told them by these names).
RLIMITS = {
    "RLIMIT_CORE": 0,
    "RLIMIT_FSIZE": FILE_SIZE_LIMIT,
    "RLIMIT_NOFILE": OPEN_FILES_LIMIT,
    "RLIMIT_NPROC": USER_PROCESSES_LIMIT,
}


def set_rlimits() -> None:
    """The rlimit layer; runs in the spawned child just before exec (async-signal-safe enough:
    no locks, no allocation-heavy work)."""
    for name, value in RLIMITS.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _write(path: Path, value: str) -> None:
    # os-level: pathlib's write_text costs seven system calls, and a task start makes several.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def join_cgroup(procs: list[Path], pid: int) -> None:
    """Move ``pid`` into a cgroup through its ``cgroup.procs`` files; one gone already (the
    cgroup removed meanwhile) is skipped."""
    for path in procs:
        with contextlib.suppress(OSError):
            _write(path, str(pid))


def open_procs(group: TaskCgroup) -> list[int]:
    """``group``'s cgroup.procs files, open for writing: whoever holds them may move itself
    there (the kernel checks the rights of who opened them), which is how the launcher joins a
    task's cgroup without any rights of its own."""
    fds: list[int] = []
    try:
        for path in group.procs_files():
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _read(path: Path) -> str:
    """A small control file (the cgroup files read after each task)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


class _NoCgroups:
    name = "none"
    controllers: tuple[str, ...] = ()
    tag = ""

    def create(self, limits: Limits) -> TaskCgroup | None:
        return None

    def close(self) -> None:
        pass


@dataclass
class _Group:
    dirs: list[Path]
    controllers: tuple[str, ...]  # v1: the controller of each of dirs; v2: those of dirs[0]
    v2: bool
    memory_dir: Path | None = None  # where a memory limit was set
    usage_file: Path | None = None  # the memory it is charged for, when memory is counted
    memory_limited: bool = False  # set once already: setting another may raise it

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def limit(self, limits: Limits) -> None:
        if self.v2:
            self._limit_v2(limits)
            return
        for controller, d in zip(self.controllers, self.dirs, strict=True):
            if controller == "memory" and limits.memory is not None:
                self.memory_dir = d
                swap = d / "memory.memsw.limit_in_bytes"
                with_swap = swap.exists()
                if with_swap and self.memory_limited:  # memory may not exceed memory+swap
                    _write(swap, "-1")
                _write(d / "memory.limit_in_bytes", str(limits.memory))
                if with_swap:  # no swap: over its memory a task is killed, not slowed
                    _write(swap, str(limits.memory))
                self.memory_limited = True
            elif controller == "cpu" and limits.cpus is not None:
                _write(d / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(max(1000, int(limits.cpus * CFS_PERIOD_US))))
            elif controller == "pids" and limits.pids is not None:
                _write(d / "pids.max", str(limits.pids))

    def _limit_v2(self, limits: Limits) -> None:
        d = self.dirs[0]
        if "memory" in self.controllers and limits.memory is not None:
            self.memory_dir = d
            _write(d / "memory.max", str(limits.memory))
            with contextlib.suppress(OSError):  # absent without swap accounting
                _write(d / "memory.swap.max", "0")
        if "cpu" in self.controllers and limits.cpus is not None:
            quota = max(1000, int(limits.cpus * CFS_PERIOD_US))
            _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        if "pids" in self.controllers and limits.pids is not None:
            _write(d / "pids.max", str(limits.pids))

    def oom_killed(self) -> bool:
        if self.memory_dir is None:
            return False
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            text = _read(self.memory_dir / name)
        except OSError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def _pids(self, dirs: list[Path] | None = None) -> set[int]:
        pids: set[int] = set()
        for d in self.dirs if dirs is None else dirs:
            with contextlib.suppress(OSError):
                pids |= {int(p) for p in _read(d / "cgroup.procs").split()}
        return pids

    def kill(self) -> None:
        if self.v2:
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
                return
        # v1 has no cgroup.kill: kill what is listed, once. A process forked meanwhile shows
        # up in the next look, and every caller looks again until the cgroup is empty (and
        # kills again): spinning here until the killed had exited read cgroup.procs up to
        # 100 times a kill, on the event loop. Most often the task is over and nothing is left:
        # one hierarchy tells (see empty()), where listing all three costs three reads.
        if self.empty():
            return
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def empty(self) -> bool:
        # A process joins all of a task's hierarchies before it runs anything of the task's,
        # and its children are born in them: one hierarchy tells.
        return not self._pids(self.dirs[:1])

    def reusable(self, oom_killed: bool | None = None) -> bool:
        if self.oom_killed() if oom_killed is None else oom_killed:
            return False
        if self.usage_file is None:
            return True
        try:
            return int(_read(self.usage_file)) <= REUSE_CHARGE_LEFT
        except (OSError, ValueError):
            return False

    def remove(self) -> bool:
        """Remove it from every hierarchy; False while some hierarchy still holds it (a process
        that is exiting is no longer listed in ``cgroup.procs`` but keeps its cgroup busy)."""
        removed = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


class CgroupV1:
    """One hierarchy per controller (memory, cpu, pids), each mounted under the root."""

    name = "cgroup v1"

    def __init__(self, root: Path, own: dict[str, str], tag: str) -> None:
        self.tag = tag
        self._bases: dict[str, Path] = {}
        for controller in ("memory", "cpu", "pids"):
            mount = root / controller
            if controller not in own or not (mount / "cgroup.procs").exists():
                continue
            base = mount / own[controller].lstrip("/") / tag
            try:
                base.mkdir(exist_ok=True)
            except OSError as error:
                log.warning("no %s cgroup for tasks (%s); that limit is off", controller, error)
                continue
            self._bases[controller] = base
        self.controllers = tuple(self._bases)
        self._ids = itertools.count(1)

    def create(self, limits: Limits) -> TaskCgroup | None:
        if not self._bases:
            return None
        name = f"t{next(self._ids)}"
        dirs: list[Path] = []
        usage_file = None
        for controller, base in self._bases.items():
            d = base / name
            d.mkdir()
            dirs.append(d)
            if controller == "memory":
                usage_file = d / "memory.usage_in_bytes"
        group = _Group(dirs, tuple(self._bases), v2=False, usage_file=usage_file)
        group.limit(limits)
        return group

    def close(self) -> None:
        for base in self._bases.values():
            with contextlib.suppress(OSError):
                base.rmdir()


class CgroupV2:
    """The unified hierarchy. Controllers can only be handed to children of a cgroup that holds
    no processes, so the tasks get a subtree of their own beside the agent's cgroup; this needs
    the agent's cgroup to be delegated to it (root, or systemd's Delegate=yes)."""

    name = "cgroup v2"

    def __init__(self, root: Path, own: str, tag: str) -> None:
        self.tag = tag
        self._base: Path | None = None
        self.controllers: tuple[str, ...] = ()
        parent = root / own.lstrip("/")
        try:
            wanted = {"memory", "cpu", "pids"} & set(
                (parent / "cgroup.controllers").read_text().split()
            )
            if not wanted:
                return  # nothing to delegate: leave the agent's cgroup as it is
            enable = " ".join(f"+{c}" for c in sorted(wanted))
            if parent != root:
                # "No internal processes": the agent moves to a leaf of its own first.
                leaf = parent / "agent"
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
            (parent / "cgroup.subtree_control").write_text(enable)
            base = parent / tag
            base.mkdir(exist_ok=True)
            (base / "cgroup.subtree_control").write_text(enable)
        except OSError as error:
            log.warning("no cgroup v2 subtree for tasks (%s); cgroup limits are off", error)
            return
        self._base = base
        self.controllers = tuple(sorted(wanted))
        self._ids = itertools.count(1)

    def create(self, limits: Limits) -> TaskCgroup | None:
        if self._base is None:
            return None
        d = self._base / f"t{next(self._ids)}"
        d.mkdir()
        usage_file = d / "memory.current" if "memory" in self.controllers else None
        group = _Group([d], self.controllers, v2=True, usage_file=usage_file)
        group.limit(limits)
        return group

    def close(self) -> None:
        if self._base is not None:
            with contextlib.suppress(OSError):
                self._base.rmdir()


def own_cgroups(proc_self_cgroup: str) -> tuple[dict[str, str], str | None]:
    """This process's v1 paths by controller, and its v2 path, from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2 = None
    for line in proc_self_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def own_cgroup_dirs(root: Path) -> dict[str, Path]:
    """This process's own cgroup folders under ``root``: by controller (memory, cpu, pids) for
    v1, and "" for the v2 hierarchy. Raises OSError if /proc/self/cgroup cannot be read."""
    v1, v2 = own_cgroups(Path("/proc/self/cgroup").read_text())
    dirs: dict[str, Path] = {
        c: root / c / v1[c].lstrip("/") for c in ("memory", "cpu", "pids") if c in v1
    }
    if v2 is not None:
        dirs[""] = root / v2.lstrip("/")
    return dirs


_backend_ids = itertools.count(1)


def detect_cgroups(root: Path = CGROUP_ROOT) -> CgroupBackend:
    """The cgroup backend this host allows: v2 if unified with controllers, else v1, else none."""
    if os.geteuid() != 0 and root == CGROUP_ROOT:
        return _NoCgroups()  # creating cgroups needs root (or a delegated subtree)
    try:
        v1, v2 = own_cgroups(Path("/proc/self/cgroup").read_text())
    except OSError:
        return _NoCgroups()
    # Unique per backend: a process may make several (tests do), each sweeping only its own.
    tag = f"planetary-mesh-{os.getpid()}.{next(_backend_ids)}"
    if v2 is not None and (root / "cgroup.controllers").exists():
        backend: CgroupBackend = CgroupV2(root, v2, tag)
        if backend.controllers:
            return backend
        backend.close()
    if any(c in v1 for c in ("memory", "cpu", "pids")):
        v1_backend = CgroupV1(root, v1, tag)
        if v1_backend.controllers:
            return v1_backend
    return _NoCgroups()


def reap_stale_task_cgroups(
    agent_pid: int | None = None, root: Path = CGROUP_ROOT, tag: str | None = None
) -> int:
    """Kill what is left in the task cgroups of agents that are gone, and free those cgroups.

    An agent killed outright cannot clean up after itself, and bwrap killed during its set-up can
    leave the sandbox's init waiting for ever: both stay in the dead agent's task cgroups. A new
    agent sweeps them at start (``agent_pid`` None: every dead agent's), a test harness that
    killed an agent sweeps that one's, and an agent's watchdog sweeps exactly its ``tag``.
    Returns how many processes were killed.
    """
    if os.geteuid() != 0:
        return 0
    try:
        parents = [(d, name == "") for name, d in own_cgroup_dirs(root).items()]
    except OSError:
        return 0
    killed = 0
    for parent, is_v2 in parents:
        for base in parent.glob("planetary-mesh-*"):
            owner = base.name.removeprefix("planetary-mesh-").split(".")[0]
            if not owner.isdigit() or not base.is_dir():
                continue
            if tag is not None and base.name != tag:
                continue
            if agent_pid is not None and int(owner) != agent_pid:
                continue
            if agent_pid is None and Path(f"/proc/{owner}").exists():
                continue  # that agent still runs: its tasks are its own business
            try:
                task_dirs = [d for d in base.iterdir() if d.is_dir()]
            except OSError:  # swept meanwhile by the dead agent's own watchdog
                continue
            for task_dir in task_dirs:
                group = _Group([task_dir], (), v2=is_v2)
                killed += len(group._pids())
                for _ in range(200):  # the killed leave within milliseconds
                    group.kill()
                    if group.empty():
                        break
                    time.sleep(0.005)
                group.remove()
            with contextlib.suppress(OSError):
                base.rmdir()
    return killed


class MoveWarmer:
    """Keeps moves into cgroups quick while tasks are starting.

    The kernel guards every move with a lock whose writer waits for an RCU grace period unless
    another move took it moments before: here, a move after a quiet spell of 50 ms takes ~13 ms,
    one within 10 ms of another ~0.05 ms. A task's start moves a process (the launcher, or a
    fresh sandbox) into the task's cgroup, so after a quiet spell it would wait on the kernel.
    So for ``active_s`` after each start, the agent moves itself to where it already is every
    ``period_s``: a move that changes nothing and keeps the next task's move quick.
    """

    def __init__(self, procs: Path, period_s: float = 0.008, active_s: float = 2.0) -> None:
        self._fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        self._period_s = period_s
        self._active_s = active_s
        self._until = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        """Whether it is still moving the agent every period."""
        return self._timer is not None

    def touch(self) -> None:
        """A task starts: keep moves quick for a while."""
        loop = asyncio.get_running_loop()
        self._until = loop.time() + self._active_s
        if self._timer is None and self._fd >= 0:
            self._timer = loop.call_later(self._period_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        try:
            os.write(self._fd, b"0")  # "0": the writer itself, into the cgroup it is in
        except OSError as error:
            log.info("cgroup moves are not kept quick: %s", error)
            self.close()
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._until:
            self._timer = loop.call_later(self._period_s, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def move_warmer(
    backend: CgroupBackend, period_s: float = 0.008, active_s: float = 2.0
) -> MoveWarmer | None:
    """A MoveWarmer on this process's own cgroup in one of ``backend``'s hierarchies."""
    if not backend.controllers:
        return None
    try:
        hierarchy = "" if backend.name == "cgroup v2" else backend.controllers[0]
        procs = own_cgroup_dirs(CGROUP_ROOT)[hierarchy] / "cgroup.procs"
        return MoveWarmer(procs, period_s, active_s)
    except (OSError, KeyError) as error:
        log.info("cgroup moves are not kept quick: %s", error)
        return None
