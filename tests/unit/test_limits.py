"""The cgroup backends on fake cgroup trees: what they write where, what they read back, what
they leave behind.

A fake tree is a plain directory under tmp_path. The :class:`FakeKernel` fixture plays the one
part of cgroupfs the backends lean on: a new directory comes with its interface files (so
``memory.memsw.limit_in_bytes`` is there when the kernel accounts swap), and ``rmdir`` of a cgroup
with no child cgroups and no processes succeeds although it holds those files.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from planetary_mesh.sandbox import limits
from planetary_mesh.sandbox.limits import (
    CFS_PERIOD_US,
    CgroupV1,
    CgroupV2,
    Limits,
    detect_cgroups,
    own_cgroups,
)

MIB = 2**20
TAG = "planetary-mesh-test"
HOST_V1 = (  # /proc/self/cgroup of a hybrid host: v1 controllers, an empty unified hierarchy
    "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"
)
ALL_LIMITS = Limits(memory=64 * MIB, cpus=0.5, pids=100)

V1_FILES = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "pids": {"pids.max": "max\n"},
}
V2_FILES = {
    "memory.max": "max\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "cpu.max": "max 100000\n",
    "pids.max": "max\n",
}


class FakeKernel:
    """cgroupfs, as far as the backends can tell, on a tree under ``root``."""

    def __init__(self, root: Path, v2: bool, swap: bool) -> None:
        self.root = root
        self.v2 = v2
        self.swap = swap  # swap accounting on: the memsw / swap.max files exist

    def governs(self, path: Path) -> bool:
        return path != self.root and path.is_relative_to(self.root)

    def populate(self, cgroup: Path) -> None:
        files = {"cgroup.procs": ""}
        if self.v2:
            files |= V2_FILES | {"cgroup.controllers": "", "cgroup.subtree_control": ""}
            if self.swap:
                files["memory.swap.max"] = "max\n"
        else:
            controller = cgroup.relative_to(self.root).parts[0]
            files.update(V1_FILES.get(controller, {}))
            if controller == "memory" and self.swap:
                files["memory.memsw.limit_in_bytes"] = "9223372036854771712\n"
        for name, text in files.items():
            (cgroup / name).write_text(text)

    def rmdir(self, cgroup: Path) -> None:
        """Like the kernel: busy while it has child cgroups or processes; its files go with it."""
        entries = list(cgroup.iterdir())
        procs = cgroup / "cgroup.procs"
        if any(e.is_dir() for e in entries) or (procs.exists() and procs.read_text().strip()):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(cgroup))
        for entry in entries:
            entry.unlink()


@pytest.fixture
def kernel_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[bool, bool], FakeKernel]:
    """Makes the fake kernel for a tree at tmp_path/cgroup; only one per test."""
    real_mkdir = Path.mkdir
    real_rmdir = Path.rmdir

    def make(v2: bool, swap: bool) -> FakeKernel:
        kernel = FakeKernel(tmp_path / "cgroup", v2, swap)
        kernel.root.mkdir()

        def mkdir(
            self: Path, mode: int = 0o777, parents: bool = False, exist_ok: bool = False
        ) -> None:
            existed = self.is_dir()
            real_mkdir(self, mode, parents, exist_ok)
            if not existed and kernel.governs(self):
                kernel.populate(self)

        def rmdir(self: Path) -> None:
            if kernel.governs(self):
                kernel.rmdir(self)
            real_rmdir(self)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        monkeypatch.setattr(Path, "rmdir", rmdir)
        return kernel

    return make


def v1_tree(
    make: Callable[[bool, bool], FakeKernel],
    own: dict[str, str],
    mounted: tuple[str, ...] = ("memory", "cpu", "pids"),
    swap: bool = True,
) -> FakeKernel:
    """A v1 root: one mount per controller in ``mounted``, with this process's cgroup in each."""
    kernel = make(False, swap)
    for controller in mounted:
        (kernel.root / controller / own.get(controller, "/").lstrip("/")).mkdir(parents=True)
    return kernel


def v2_tree(
    make: Callable[[bool, bool], FakeKernel], own: str, controllers: str, swap: bool = True
) -> FakeKernel:
    """A v2 root whose cgroup at ``own`` may hand ``controllers`` to its children."""
    kernel = make(True, swap)
    (kernel.root / "cgroup.controllers").write_text(f"{controllers}\n")
    (kernel.root / "cgroup.subtree_control").write_text("")
    (kernel.root / "cgroup.procs").write_text("")
    parent = kernel.root / own.lstrip("/")
    if parent != kernel.root:
        parent.mkdir(parents=True)
        (parent / "cgroup.controllers").write_text(f"{controllers}\n")
        (parent / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return kernel


def subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


# own_cgroups


def test_own_cgroups_of_a_hybrid_host() -> None:
    v1, v2 = own_cgroups("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/x")
    assert v1 == {"memory": "/a/b", "cpu": "/", "cpuacct": "/"}
    assert v2 == "/x"


def test_own_cgroups_of_a_pure_v2_host() -> None:
    assert own_cgroups("0::/user.slice/x\n") == ({}, "/user.slice/x")


def test_own_cgroups_of_a_pure_v1_host_has_no_v2_path() -> None:
    v1, v2 = own_cgroups("8:pids:/p\n4:memory:/m\n")
    assert (v1, v2) == ({"pids": "/p", "memory": "/m"}, None)


def test_own_cgroups_keeps_colons_in_paths() -> None:
    assert own_cgroups("4:memory:/a:b\n0::/c:d") == ({"memory": "/a:b"}, "/c:d")


def test_own_cgroups_of_this_hosts_shape() -> None:
    v1, v2 = own_cgroups(HOST_V1)
    assert v1["memory"] == "/process_api/abc"
    assert (v1["cpu"], v1["pids"], v2) == ("/", "/", "/")


# cgroup v1


def test_v1_makes_a_base_per_controller_under_its_own_cgroup(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/a/b", "cpu": "/", "pids": "/p"}
    kernel = v1_tree(kernel_factory, own)
    backend = CgroupV1(kernel.root, own, TAG)
    assert (backend.name, backend.controllers) == ("cgroup v1", ("memory", "cpu", "pids"))
    for base in ("memory/a/b", "cpu", "pids/p"):
        assert (kernel.root / base / TAG).is_dir()


def test_v1_writes_every_limit(kernel_factory: Callable[[bool, bool], FakeKernel]) -> None:
    own = {"memory": "/a/b", "cpu": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own, swap=True)
    group = CgroupV1(kernel.root, own, TAG).create(ALL_LIMITS)
    assert group is not None
    memory = kernel.root / "memory/a/b" / TAG / "t1"
    cpu = kernel.root / "cpu" / TAG / "t1"
    pids = kernel.root / "pids" / TAG / "t1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    # No swap: over its memory a task is killed, not slowed.
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(64 * MIB)
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (pids / "pids.max").read_text() == "100"
    assert group.procs_files() == [d / "cgroup.procs" for d in (memory, cpu, pids)]


def test_v1_without_swap_accounting_sets_only_the_memory_limit(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/", "cpu": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own, swap=False)
    group = CgroupV1(kernel.root, own, TAG).create(ALL_LIMITS)
    assert group is not None
    memory = kernel.root / "memory" / TAG / "t1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    # Not made up where the kernel has none (writing it would fail on a real cgroupfs).
    assert not (memory / "memory.memsw.limit_in_bytes").exists()


def test_v1_on_a_bare_tree_writes_no_swap_limit(tmp_path: Path) -> None:
    # No fake kernel at all: a new directory is empty, so memsw is not there to be written.
    root = tmp_path / "cgroup"
    for controller in ("memory", "cpu", "pids"):
        (root / controller).mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    own = {"memory": "/", "cpu": "/", "pids": "/"}
    group = CgroupV1(root, own, TAG).create(ALL_LIMITS)
    assert group is not None
    memory = root / "memory" / TAG / "t1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    assert not (memory / "memory.memsw.limit_in_bytes").exists()
    assert (root / "cpu" / TAG / "t1" / "cpu.cfs_quota_us").read_text() == "50000"


@pytest.mark.parametrize(("cpus", "quota"), [(2.0, "200000"), (0.25, "25000"), (0.001, "1000")])
def test_v1_cpu_quota_is_the_declared_cpus_with_a_floor(
    kernel_factory: Callable[[bool, bool], FakeKernel], cpus: float, quota: str
) -> None:
    own = {"cpu": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("cpu",))
    CgroupV1(kernel.root, own, TAG).create(Limits(cpus=cpus))
    cpu = kernel.root / "cpu" / TAG / "t1"
    assert (cpu / "cpu.cfs_quota_us").read_text() == quota
    assert (cpu / "cpu.cfs_period_us").read_text() == str(CFS_PERIOD_US)


def test_v1_leaves_the_kernel_defaults_for_limits_not_given(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/", "cpu": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own)
    group = CgroupV1(kernel.root, own, TAG).create(Limits(memory=None, cpus=None, pids=None))
    assert group is not None
    t1 = {c: kernel.root / c / TAG / "t1" for c in ("memory", "cpu", "pids")}
    assert (t1["memory"] / "memory.limit_in_bytes").read_text().strip() == "9223372036854771712"
    assert (t1["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "-1"
    assert (t1["pids"] / "pids.max").read_text().strip() == "max"
    # Every task is still in a cgroup of each controller, so it is counted and can be removed.
    assert len(group.procs_files()) == 3
    # No memory limit, so no OOM can be blamed on one.
    (t1["memory"] / "memory.oom_control").write_text("oom_kill 1\n")
    assert group.oom_killed() is False


def test_v1_default_limits_cap_the_processes(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"pids": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("pids",))
    CgroupV1(kernel.root, own, TAG).create(Limits())
    assert (kernel.root / "pids" / TAG / "t1" / "pids.max").read_text() == str(limits.DEFAULT_PIDS)


def test_v1_gives_each_task_a_cgroup_of_its_own(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("memory", "pids"))
    backend = CgroupV1(kernel.root, own, TAG)
    first = backend.create(Limits(memory=MIB))
    second = backend.create(Limits(memory=2 * MIB))
    assert first is not None and second is not None
    assert set(first.procs_files()).isdisjoint(second.procs_files())
    assert subdirs(kernel.root / "memory" / TAG) == ["t1", "t2"]
    assert (kernel.root / "memory" / TAG / "t2" / "memory.limit_in_bytes").read_text() == str(
        2 * MIB
    )


def test_v1_oom_killed_reads_the_kill_count(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("memory",))
    group = CgroupV1(kernel.root, own, TAG).create(Limits(memory=64 * MIB))
    assert group is not None
    oom_control = kernel.root / "memory" / TAG / "t1" / "memory.oom_control"
    assert group.oom_killed() is False  # the kernel's "oom_kill 0"
    oom_control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert group.oom_killed() is True
    oom_control.write_text("oom_kill_disable 0\nunder_oom 1\n")  # an old kernel: no count
    assert group.oom_killed() is False
    oom_control.unlink()
    assert group.oom_killed() is False


def test_v1_remove_deletes_the_task_cgroups_and_close_the_bases(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/a", "cpu": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own)
    backend = CgroupV1(kernel.root, own, TAG)
    group = backend.create(ALL_LIMITS)
    assert group is not None
    task_dirs = [f.parent for f in group.procs_files()]
    bases = [d.parent for d in task_dirs]
    group.remove()
    assert [d for d in task_dirs if d.exists()] == []
    assert all(b.is_dir() for b in bases)  # kept for the next task
    backend.close()
    assert [b for b in bases if b.exists()] == []
    assert (kernel.root / "memory" / "a").is_dir()  # the agent's own cgroup is not ours


def test_v1_remove_of_a_busy_cgroup_does_not_raise(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"pids": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("pids",))
    backend = CgroupV1(kernel.root, own, TAG)
    group = backend.create(Limits())
    assert group is not None
    (procs,) = group.procs_files()
    procs.write_text("12345\n")
    group.remove()
    assert procs.parent.is_dir()
    backend.close()  # the base is not empty: kept, and no error either
    assert procs.parent.parent.is_dir()


def test_v1_skips_a_controller_missing_from_the_tree(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    own = {"memory": "/", "cpu": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("memory", "pids"))
    backend = CgroupV1(kernel.root, own, TAG)
    assert backend.controllers == ("memory", "pids")
    group = backend.create(ALL_LIMITS)  # the CPU limit cannot be had: no error for it
    assert group is not None
    assert group.procs_files() == [
        kernel.root / c / TAG / "t1" / "cgroup.procs" for c in ("memory", "pids")
    ]
    assert not (kernel.root / "cpu").exists()


def test_v1_skips_a_controller_this_process_is_not_in(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    kernel = v1_tree(kernel_factory, {}, mounted=("memory", "cpu", "pids"))
    backend = CgroupV1(kernel.root, {"cpu": "/", "cpuacct": "/"}, TAG)
    assert backend.controllers == ("cpu",)
    assert subdirs(kernel.root / "memory") == []


def test_v1_skips_a_controller_whose_base_cannot_be_made(
    kernel_factory: Callable[[bool, bool], FakeKernel], caplog: pytest.LogCaptureFixture
) -> None:
    kernel = v1_tree(kernel_factory, {}, mounted=("memory", "pids"))
    own = {"memory": "/gone/away", "pids": "/"}  # no such cgroup in the memory hierarchy
    with caplog.at_level(logging.WARNING, logger=limits.__name__):
        backend = CgroupV1(kernel.root, own, TAG)
    assert backend.controllers == ("pids",)
    assert "no memory cgroup for tasks" in caplog.text


def test_v1_with_no_controller_makes_no_cgroups(tmp_path: Path) -> None:
    backend = CgroupV1(tmp_path, {"memory": "/", "cpu": "/", "pids": "/"}, TAG)
    assert backend.controllers == ()
    assert backend.create(ALL_LIMITS) is None
    backend.close()
    assert list(tmp_path.iterdir()) == []


# cgroup v2


def test_v2_moves_the_agent_to_a_leaf_and_delegates_the_controllers(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    kernel = v2_tree(kernel_factory, "/user.slice/x", "cpu memory pids io")
    parent = kernel.root / "user.slice" / "x"
    backend = CgroupV2(kernel.root, "/user.slice/x", TAG)
    assert (backend.name, backend.controllers) == ("cgroup v2", ("cpu", "memory", "pids"))
    # "No internal processes": the agent leaves the cgroup that hands out controllers.
    assert (parent / "agent" / "cgroup.procs").read_text() == str(os.getpid())
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (parent / TAG / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert subdirs(parent) == ["agent", TAG]


def test_v2_writes_every_limit(kernel_factory: Callable[[bool, bool], FakeKernel]) -> None:
    kernel = v2_tree(kernel_factory, "/x", "cpu memory pids io")
    group = CgroupV2(kernel.root, "/x", TAG).create(ALL_LIMITS)
    assert group is not None
    task = kernel.root / "x" / TAG / "t1"
    assert (task / "memory.max").read_text() == str(64 * MIB)
    assert (task / "memory.swap.max").read_text() == "0"
    assert (task / "cpu.max").read_text() == "50000 100000"
    assert (task / "pids.max").read_text() == "100"
    assert group.procs_files() == [task / "cgroup.procs"]


def test_v2_oom_killed_reads_memory_events(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    kernel = v2_tree(kernel_factory, "/x", "cpu memory pids")
    group = CgroupV2(kernel.root, "/x", TAG).create(Limits(memory=64 * MIB))
    assert group is not None
    events = kernel.root / "x" / TAG / "t1" / "memory.events"
    assert group.oom_killed() is False
    events.write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 0\noom_group_kill 1\n")
    assert group.oom_killed() is False  # "oom_group_kill" is not "oom_kill"
    events.write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n")
    assert group.oom_killed() is True


def test_v2_uses_only_the_controllers_it_is_given(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    kernel = v2_tree(kernel_factory, "/x", "cpu io")
    backend = CgroupV2(kernel.root, "/x", TAG)
    assert backend.controllers == ("cpu",)
    assert (kernel.root / "x" / "cgroup.subtree_control").read_text() == "+cpu"
    group = backend.create(ALL_LIMITS)
    assert group is not None
    task = kernel.root / "x" / TAG / "t1"
    assert (task / "cpu.max").read_text() == "50000 100000"
    assert (task / "memory.max").read_text().strip() == "max"  # not ours to set
    assert (task / "pids.max").read_text().strip() == "max"
    (task / "memory.events").write_text("oom_kill 3\n")
    assert group.oom_killed() is False


def test_v2_at_the_root_moves_no_process(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    # In a container with its own cgroup namespace the agent sees itself at "/".
    kernel = v2_tree(kernel_factory, "/", "memory pids")
    backend = CgroupV2(kernel.root, "/", TAG)
    assert backend.controllers == ("memory", "pids")
    assert not (kernel.root / "agent").exists()
    assert (kernel.root / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (kernel.root / TAG).is_dir()


def test_v2_remove_and_close_leave_only_the_agents_leaf(
    kernel_factory: Callable[[bool, bool], FakeKernel],
) -> None:
    kernel = v2_tree(kernel_factory, "/x", "cpu memory pids")
    backend = CgroupV2(kernel.root, "/x", TAG)
    first = backend.create(ALL_LIMITS)
    second = backend.create(ALL_LIMITS)
    assert first is not None and second is not None
    assert subdirs(kernel.root / "x" / TAG) == ["t1", "t2"]
    first.remove()
    second.remove()
    assert subdirs(kernel.root / "x" / TAG) == []
    backend.close()
    assert subdirs(kernel.root / "x") == ["agent"]


def test_v2_without_a_readable_cgroup_is_off(
    kernel_factory: Callable[[bool, bool], FakeKernel], caplog: pytest.LogCaptureFixture
) -> None:
    kernel = kernel_factory(True, True)
    with caplog.at_level(logging.WARNING, logger=limits.__name__):
        backend = CgroupV2(kernel.root, "/not/there", TAG)
    assert backend.controllers == ()
    assert backend.create(ALL_LIMITS) is None
    backend.close()
    assert "cgroup limits are off" in caplog.text


# detect_cgroups


@pytest.fixture
def proc_self_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Fakes what detect_cgroups reads as /proc/self/cgroup (it opens it by name, not injectable:
    the module's ``Path`` is swapped for one that maps that name to a file of ours)."""
    real_path = Path
    fake = tmp_path / "proc-self-cgroup"

    def path(*parts: str) -> Path:
        if parts == ("/proc/self/cgroup",):
            return fake
        return real_path(*parts)

    monkeypatch.setattr(limits, "Path", path)

    def set_text(text: str) -> None:
        fake.write_text(text)

    return set_text


def test_detect_prefers_v2_where_it_has_the_controllers(
    kernel_factory: Callable[[bool, bool], FakeKernel], proc_self_cgroup: Callable[[str], None]
) -> None:
    kernel = v2_tree(kernel_factory, "/x", "cpu memory pids io")
    proc_self_cgroup("0::/x\n")
    backend = detect_cgroups(kernel.root)
    assert (backend.name, backend.controllers) == ("cgroup v2", ("cpu", "memory", "pids"))
    assert backend.tag.startswith(f"planetary-mesh-{os.getpid()}.")
    assert (kernel.root / "x" / backend.tag).is_dir()
    backend.close()
    assert not (kernel.root / "x" / backend.tag).exists()


def test_detect_takes_v1_on_a_hybrid_host(
    kernel_factory: Callable[[bool, bool], FakeKernel], proc_self_cgroup: Callable[[str], None]
) -> None:
    # This host's shape: v1 mounts, and an unified hierarchy with no controllers beside them.
    own = {"memory": "/process_api/abc", "cpu": "/", "pids": "/"}
    kernel = v1_tree(kernel_factory, own)
    (kernel.root / "unified").mkdir()
    (kernel.root / "unified" / "cgroup.controllers").write_text("")
    proc_self_cgroup(HOST_V1)
    backend = detect_cgroups(kernel.root)
    assert (backend.name, backend.controllers) == ("cgroup v1", ("memory", "cpu", "pids"))
    tag = backend.tag
    assert tag.startswith(f"planetary-mesh-{os.getpid()}.")
    assert (kernel.root / "memory" / "process_api" / "abc" / tag).is_dir()
    assert (kernel.root / "cpu" / tag).is_dir() and (kernel.root / "pids" / tag).is_dir()
    backend.close()
    assert not (kernel.root / "cpu" / tag).exists()


def test_detect_without_v2_controllers_or_v1_is_none(
    kernel_factory: Callable[[bool, bool], FakeKernel], proc_self_cgroup: Callable[[str], None]
) -> None:
    kernel = v2_tree(kernel_factory, "/", "io")
    proc_self_cgroup("0::/\n")
    backend = detect_cgroups(kernel.root)
    assert (backend.name, backend.controllers) == ("none", ())
    assert backend.create(ALL_LIMITS) is None


def test_detect_leaves_nothing_behind_when_v2_has_none_of_the_controllers(
    kernel_factory: Callable[[bool, bool], FakeKernel], proc_self_cgroup: Callable[[str], None]
) -> None:
    # A v2 cgroup that hands out none of memory, cpu, pids is of no use; trying it should not
    # leave an empty task subtree (never closed: detect_cgroups drops the backend) or move the
    # agent into a leaf for nothing.
    kernel = v2_tree(kernel_factory, "/x", "io")
    proc_self_cgroup("0::/x\n")
    backend = detect_cgroups(kernel.root)
    assert backend.name == "none"
    assert subdirs(kernel.root / "x") == []


def test_detect_takes_v1_without_a_v2_line(
    kernel_factory: Callable[[bool, bool], FakeKernel], proc_self_cgroup: Callable[[str], None]
) -> None:
    own = {"pids": "/"}
    kernel = v1_tree(kernel_factory, own, mounted=("pids",))
    (kernel.root / "cgroup.controllers").write_text("cpu memory pids\n")  # but we are not in v2
    proc_self_cgroup("8:pids:/\n")
    backend = detect_cgroups(kernel.root)
    assert (backend.name, backend.controllers) == ("cgroup v1", ("pids",))
    backend.close()


def test_detect_without_cgroups_is_none(
    tmp_path: Path, proc_self_cgroup: Callable[[str], None]
) -> None:
    proc_self_cgroup("4:memory:/\n1:cpu:/\n0::/\n")
    empty = tmp_path / "empty-root"
    empty.mkdir()
    backend = detect_cgroups(empty)
    assert (backend.name, backend.controllers) == ("none", ())
    assert backend.create(ALL_LIMITS) is None
    backend.close()
    assert list(empty.iterdir()) == []


def test_detect_when_only_other_v1_controllers_are_there_is_none(
    kernel_factory: Callable[[bool, bool], FakeKernel], proc_self_cgroup: Callable[[str], None]
) -> None:
    kernel = v1_tree(kernel_factory, {"freezer": "/"}, mounted=("freezer",))
    proc_self_cgroup("6:freezer:/\n")
    assert detect_cgroups(kernel.root).name == "none"


def test_detect_without_proc_self_cgroup_is_none(
    tmp_path: Path, proc_self_cgroup: Callable[[str], None]
) -> None:
    # The fixture's file is never written: reading it fails as it would without /proc.
    assert detect_cgroups(tmp_path).name == "none"
