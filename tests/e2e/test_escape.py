"""Escape attempts: real tasks, sent through the real coordinator to real agents (root, so tasks
run as the mesh-task user inside bwrap, with a cgroup and rlimits each), try to do harm.

Every test has the task report what happened (a JSON line of "BLOCKED: ..." / "ESCAPED: ..."
results, or plain output), checks the host where the harm would land, and checks that the agents
stayed healthy: both nodes ready and a trivial job still succeeds. Where the agent kills a task,
the recorded reason must say why.
"""

from __future__ import annotations

import base64
import contextlib
import json
import platform
import socket
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from helpers import kill_leftovers, output_of, processes_with, wait_for, wait_job

from planetary_mesh.client import Client
from planetary_mesh.config import AgentPaths
from planetary_mesh.protocol import JobSubmit, TaskInfo
from planetary_mesh.sandbox.launchers import LAUNCHER_INSIDE
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e

MiB = 2**20
TASK_DISK = 64 * MiB  # the agents' --task-disk: what one task's work directory may take
TMP_BYTES = 256 * MiB  # the sandbox's private /tmp (DESIGN.md §5)
FILE_SIZE_LIMIT = 4 * 1024**3  # RLIMIT_FSIZE for one file a task writes
PIDS_LIMIT = 1024  # pids.max of a task's cgroup

# The probes print one JSON object as their last line: what each attempt did.
_PRELUDE = textwrap.dedent(
    """
    import json, os, sys
    results = {}
    def attempt(name, action):
        try:
            detail = action()
        except BaseException as error:
            results[name] = f"BLOCKED: {type(error).__name__}: {error}"
        else:
            results[name] = f"ESCAPED: {detail!r}"[:200]
    def report():
        print(json.dumps(results), flush=True)
    """
)


def _probe(body: str, *args: str) -> list[str]:
    return ["python3", "-c", _PRELUDE + textwrap.dedent(body), *args]


# Every attack runs twice: in a fresh sandbox of its own, and in its job's warm sandbox (the
# agents' --warm-sandboxes always), where a launcher forked it; both must hold alike.
SANDBOX_MODES = ["fresh", "warm"]
_WARM_FLAG = {"fresh": "off", "warm": "always"}


@pytest.fixture(scope="module", params=SANDBOX_MODES)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMesh]:
    local = LocalMesh(
        tmp_path_factory.mktemp("escape"),
        agents=2,
        agent_cpus=2,
        agent_args=(
            "--task-disk",
            f"{TASK_DISK // MiB}M",
            "--warm-sandboxes",
            _WARM_FLAG[request.param],
        ),
    )
    with local:
        yield local


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique word for the processes a test starts; whatever still carries it is killed."""
    word = f"mesh-escape-{uuid.uuid4().hex}"
    try:
        yield word
    finally:
        kill_leftovers(word)


def sandbox_mode(mesh: LocalMesh) -> str:
    """ "fresh" or "warm": how the mesh's agents run tasks."""
    return "warm" if "always" in mesh.agent_args else "fresh"


def _submit(client: Client, argv: list[str], **options: Any) -> str:
    spec: dict[str, Any] = {"cpus": 0.5, "memory": 128 * MiB, "timeout": 60.0, **options}
    return client.submit(JobSubmit(argv=argv, **spec)).id


def _task(client: Client, job_id: str) -> TaskInfo:
    tasks = client.job(job_id).task_list or []
    assert len(tasks) == 1
    return tasks[0]


def _ended(client: Client, job_id: str, state: str, timeout: float = 60) -> TaskInfo:
    final = wait_job(client, job_id, timeout=timeout)
    task = _task(client, job_id)
    assert final.state == state, (task, output_of(client, job_id, 0))
    return task


def _results(client: Client, job_id: str) -> dict[str, Any]:
    _ended(client, job_id, "succeeded")
    out = output_of(client, job_id, 0)
    lines = out.strip().splitlines()
    assert lines, "the probe printed nothing"
    results: dict[str, Any] = json.loads(lines[-1])
    return results


def _assert_blocked(results: dict[str, Any], *names: str) -> None:
    for name in names:
        assert str(results[name]).startswith("BLOCKED"), f"{name}: {results[name]}"


def _assert_healthy(mesh: LocalMesh, client: Client) -> None:
    """The agents survived what the tasks did: alive, ready, and running work."""
    assert all(proc.poll() is None for proc in mesh.agents), "an agent process exited"
    nodes = client.nodes()
    assert len(nodes) == 2 and all(n.state == "ready" for n in nodes), nodes
    job_id = _submit(client, ["echo", "still-ok"], cpus=0.5, memory=16 * MiB)
    _ended(client, job_id, "succeeded", timeout=30)
    assert output_of(client, job_id, 0) == "still-ok\n"


# -- who a task is ------------------------------------------------------------------------------


def test_a_task_is_an_unprivileged_user_without_capabilities_or_foreign_environment(
    mesh: LocalMesh, client: Client
) -> None:
    job_id = _submit(
        client,
        _probe(
            """
            import resource
            status = dict(
                line.split(":", 1) for line in open("/proc/self/status").read().splitlines()
            )
            # The environment the task was started with (Python may add LC_CTYPE to its own).
            environ = open("/proc/self/environ", "rb").read().split(b"\\0")
            results["uid"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid()]
            results["groups"] = os.getgroups()
            results["caps"] = {k: status[k].strip() for k in status if k.startswith("Cap")}
            results["no_new_privs"] = status["NoNewPrivs"].strip()
            results["env"] = dict(e.decode().split("=", 1) for e in environ if e)
            results["fsize"] = list(resource.getrlimit(resource.RLIMIT_FSIZE))
            results["core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
            results["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
            results["nproc"] = list(resource.getrlimit(resource.RLIMIT_NPROC))
            unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            attempt("raise fsize", lambda: resource.setrlimit(resource.RLIMIT_FSIZE, unlimited))
            report()
            """
        ),
        env={"DECLARED_ONE": "1", "DECLARED_TWO": "two words"},
    )
    results = _results(client, job_id)
    uid, euid, gid, egid = results["uid"]
    assert 0 not in (uid, euid), results["uid"]
    assert 0 not in (gid, egid) and 0 not in results["groups"], results
    assert set(results["caps"]) >= {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}
    assert all(int(value, 16) == 0 for value in results["caps"].values()), results["caps"]
    assert results["no_new_privs"] == "1"
    env: dict[str, str] = results["env"]
    assert env["DECLARED_ONE"] == "1" and env["DECLARED_TWO"] == "two words"
    assert env["MESH_JOB_ID"] == job_id and env["MESH_TASK_INDEX"] == "0"
    foreign = {
        name
        for name in env
        if not name.startswith("MESH_") and name not in {"DECLARED_ONE", "DECLARED_TWO"}
    } - {"PATH", "HOME", "PWD"}
    assert not foreign, f"variables the job did not declare leaked in: {sorted(foreign)}"
    # rlimits: one file is bounded, no core dumps, and the task cannot lift the bound.
    assert results["fsize"] == [FILE_SIZE_LIMIT, FILE_SIZE_LIMIT]
    assert results["core"] == [0, 0]
    assert results["nofile"][1] > 0 and results["nproc"][1] > 0
    _assert_blocked(results, "raise fsize")
    _assert_healthy(mesh, client)


# -- secrets ------------------------------------------------------------------------------------


def _host_workdir_of(job_id: str, filename: str) -> Path | None:
    root = Path(tempfile.gettempdir())
    found = sorted(root.glob(f"planetary-mesh-work-*/{job_id}/*/{filename}"))
    return found[0] if found else None


def test_a_task_cannot_read_the_keys_another_jobs_files_or_shadow(
    mesh: LocalMesh, client: Client, marker: str
) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    holder = _submit(
        client,
        ["sh", "-c", f"echo {secret} > secret.txt; echo written; sleep 60 # {marker}"],
    )
    wait_for(lambda: _host_workdir_of(holder, "secret.txt") is not None, 30, "job A's secret")
    secret_path = _host_workdir_of(holder, "secret.txt")
    assert secret_path is not None
    wait_for(lambda: secret_path.read_text().strip() == secret, 10, "the secret written")
    targets = {
        "ca key": mesh.paths.ca_key,
        "agent-1 key": AgentPaths(mesh.agent_dir(0)).key,
        "agent-2 key": AgentPaths(mesh.agent_dir(1)).key,
        "other job's file": secret_path,
        "other job's dir": secret_path.parent,
        "shadow": Path("/etc/shadow"),
    }
    assert all(path.exists() for path in targets.values()), targets  # real files on the host
    reader = _submit(
        client,
        _probe(
            """
            def read(path):
                if os.path.isdir(path):
                    return os.listdir(path)
                with open(path, "rb") as handle:
                    return handle.read(64).decode(errors="replace")
            for arg in sys.argv[1:]:
                name, _, path = arg.partition("=")
                attempt(name, lambda path=path: read(path))
            report()
            """,
            *(f"{name}={path}" for name, path in targets.items()),
        ),
    )
    try:
        results = _results(client, reader)
        _assert_blocked(results, *targets)
        out = output_of(client, reader, 0)
        assert secret not in out and "PRIVATE KEY" not in out and "root:" not in out
    finally:
        client.cancel(holder)
    assert _ended(client, holder, "cancelled").reason == "cancelled by admin"
    _assert_healthy(mesh, client)


# -- writes -------------------------------------------------------------------------------------


def test_a_task_cannot_write_to_usr_etc_the_agents_data_or_the_hosts_tmp(
    mesh: LocalMesh, client: Client, marker: str
) -> None:
    name = f"{marker}.txt"
    # Where the write would land on the host if it got out, and where the task aims it.
    blocked = {
        "usr": Path("/usr") / name,
        "usr/bin": Path("/usr/bin") / name,
        "etc": Path("/etc") / name,
        "agent data dir": mesh.agent_dir(0) / name,
        "mesh data dir": mesh.data_dir / name,
    }
    # These exist in the sandbox too, but as its own private tmpfs: the write may succeed there
    # and must not reach the host's world-writable folders.
    private = {"tmp": Path(tempfile.gettempdir()) / name, "dev/shm": Path("/dev/shm") / name}
    job_id = _submit(
        client,
        _probe(
            """
            def write(path):
                with open(path, "x") as handle:
                    handle.write("escaped")
                return "written"
            for arg in sys.argv[1:]:
                name, _, path = arg.partition("=")
                attempt(name, lambda path=path: write(path))
            report()
            """,
            *(f"{key}={path}" for key, path in {**blocked, **private}.items()),
        ),
    )
    try:
        results = _results(client, job_id)
        _assert_blocked(results, *blocked)
        for key, path in {**blocked, **private}.items():
            assert not path.exists(), f"{key}: the task's write reached the host at {path}"
    finally:
        for path in {**blocked, **private}.values():
            path.unlink(missing_ok=True)
    _assert_healthy(mesh, client)


# -- network ------------------------------------------------------------------------------------


class _Listener:
    """A TCP listener in the test process that records what each connection sent."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            data = b""
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                while chunk := conn.recv(4096):
                    data += chunk
            self.received.append(data)

    def __enter__(self) -> _Listener:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _loopback6_or_4() -> str:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            return "127.0.0.1"
    return "::1"


_CONNECT = """
import socket
def connect(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(3)
        sock.connect((host, port))
        sock.sendall(os.environ["PROBE_MARK"].encode())
        return "connected"
for arg in sys.argv[1:]:
    name, _, target = arg.partition("=")
    host, _, port = target.rpartition(":")
    attempt(name, lambda host=host, port=int(port): connect(host, port))
report()
"""


def test_no_network_unless_asked_and_then_loopback_reaches_the_host(
    mesh: LocalMesh, client: Client, marker: str
) -> None:
    coordinator = mesh.url.removeprefix("https://")
    with _Listener("127.0.0.1") as own, _Listener(_loopback6_or_4()) as other:
        targets = {"coordinator": coordinator, "listener": own.address, "other": other.address}
        closed = _submit(
            client,
            _probe(_CONNECT, *(f"{k}={v}" for k, v in targets.items())),
            env={"PROBE_MARK": f"{marker}-closed"},
        )
        opened = _submit(
            client,
            _probe(_CONNECT, f"listener={own.address}"),
            env={"PROBE_MARK": f"{marker}-open"},
            network=True,
        )
        without = _results(client, closed)
        _assert_blocked(without, *targets)
        with_network = _results(client, opened)
        assert with_network["listener"] == "ESCAPED: 'connected'", with_network
        wait_for(lambda: len(own.received) >= 1, 5, "the connection with network=True")
        # Only the task that asked for the network got through, to its listener alone.
        assert own.received == [f"{marker}-open".encode()]
        assert other.received == []
    _assert_healthy(mesh, client)


# -- privileges ---------------------------------------------------------------------------------


_PTRACE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000
def ptrace(pid):
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    # Attached: let it go at once, so that the test does not freeze what it reached.
    os.waitpid(pid, WALL)
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    return "attached"
"""


def test_a_task_cannot_mount_unshare_ptrace_outside_or_gain_root_from_setuid(
    mesh: LocalMesh, client: Client
) -> None:
    agent_pids = [str(proc.pid) for proc in mesh.agents]
    job_id = _submit(
        client,
        _probe(
            _PTRACE
            + textwrap.dedent(
                """
            import subprocess
            def run(*argv):
                done = subprocess.run(
                    argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=10
                )
                out = (done.stdout + done.stderr).strip()[-160:]
                if done.returncode != 0:
                    raise OSError(f"exit {done.returncode}: {out}")
                return out
            os.makedirs("/tmp/m", exist_ok=True)
            attempt("mount tmpfs", lambda: run("mount", "-t", "tmpfs", "none", "/tmp/m"))
            attempt("unshare -r", lambda: run("unshare", "-r", "true"))
            attempt("unshare -U", lambda: run("unshare", "-U", "true"))
            attempt("unshare -m", lambda: run("unshare", "-m", "true"))
            attempt("su", lambda: run("/usr/bin/su", "-c", "id -u", "root"))
            attempt("passwd", lambda: run("/usr/bin/passwd", "-d", "root"))
            results["mounted"] = os.path.ismount("/tmp/m")
            for pid in map(int, sys.argv[1:]):
                attempt(f"ptrace {pid}", lambda pid=pid: ptrace(pid))
                attempt(f"signal {pid}", lambda pid=pid: os.kill(pid, 0))
                attempt(f"mem {pid}", lambda pid=pid: open(f"/proc/{pid}/mem", "rb").read(1))
            results["procs"] = {
                p: open(f"/proc/{p}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
                for p in os.listdir("/proc")
                if p.isdigit() and os.path.exists(f"/proc/{p}/cmdline")
            }
            results["usr"] = next(
                line.split()[5] for line in open("/proc/self/mountinfo")
                if line.split()[4] == "/usr"
            )
            results["no_new_privs"] = open("/proc/self/status").read().count("NoNewPrivs:\\t1")
            results["uid"] = [os.getuid(), os.geteuid()]
            report()
            """
            ),
            *agent_pids,
        ),
    )
    results = _results(client, job_id)
    _assert_blocked(results, "mount tmpfs", "unshare -r", "unshare -U", "unshare -m")
    assert results["mounted"] is False
    # The setuid binaries run without their setuid: no_new_privs and a nosuid /usr.
    _assert_blocked(results, "su", "passwd")
    assert results["no_new_privs"] == 1
    assert "nosuid" in results["usr"].split(",") and "ro" in results["usr"].split(",")
    assert 0 not in results["uid"]
    # The agent's processes are not in the task's PID namespace: nothing to attach to or signal.
    for pid in agent_pids:
        _assert_blocked(results, f"ptrace {pid}", f"signal {pid}", f"mem {pid}")
        assert "No such process" in results[f"ptrace {pid}"]
    # /proc shows the sandbox's own init (bwrap's, or a warm sandbox's launcher) and the task's
    # processes, nothing of the host.
    procs = {pid: cmdline.split()[0] for pid, cmdline in results["procs"].items()}
    init = results["procs"]["1"]
    if sandbox_mode(mesh) == "fresh":
        assert procs.pop("1").endswith("bwrap"), procs
    else:
        assert LAUNCHER_INSIDE in init, init
        procs.pop("1")
    assert set(procs.values()) <= {"python3"}, procs
    assert all(int(pid) < 100 for pid in procs), procs
    _assert_healthy(mesh, client)


# Attach to the sandbox's init (bwrap, PID 1 in the task's namespace) and make it run
# prctl(PR_SET_PDEATHSIG, 0): then the death of the outer bwrap (and so of the agent) no longer
# kills the init, and with it the task. x86-64 registers.
_INJECT = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PEEKTEXT, SINGLESTEP, GETREGS, SETREGS, ATTACH, DETACH, WALL = 1, 9, 12, 13, 16, 17, 0x40000000
class Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulong) for name in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags"
        " rsp ss fs_base gs_base ds es fs gs").split()]
def check(value):
    if value == -1:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return value
def clear_init_pdeathsig():
    check(libc.ptrace(ATTACH, 1, None, None))
    os.waitpid(1, WALL)
    saved = Regs()
    check(libc.ptrace(GETREGS, 1, None, ctypes.byref(saved)))
    # The init sleeps in a system call: a `syscall` instruction sits just before its rip.
    if libc.ptrace(PEEKTEXT, 1, ctypes.c_void_p(saved.rip - 2), None) & 0xFFFF != 0x050F:
        check(libc.ptrace(DETACH, 1, None, None))
        raise RuntimeError("attached, but found no syscall instruction to reuse")
    regs = Regs.from_buffer_copy(saved)
    regs.rip, regs.rax, regs.orig_rax, regs.rdi, regs.rsi = saved.rip - 2, 157, 2**64 - 1, 1, 0
    check(libc.ptrace(SETREGS, 1, None, ctypes.byref(regs)))
    check(libc.ptrace(SINGLESTEP, 1, None, None))
    os.waitpid(1, WALL)
    check(libc.ptrace(GETREGS, 1, None, ctypes.byref(regs)))
    check(libc.ptrace(SETREGS, 1, None, ctypes.byref(saved)))
    check(libc.ptrace(DETACH, 1, None, None))
    return f"prctl(PR_SET_PDEATHSIG, 0) in the init returned {ctypes.c_long(regs.rax).value}"
attempt("ptrace init", clear_init_pdeathsig)
report()
time.sleep(120)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the probe injects x86-64 code")
@pytest.mark.parametrize("mode", SANDBOX_MODES)
def test_a_task_cannot_ptrace_its_init_to_outlive_a_kill9_of_its_agent(
    tmp_path: Path, marker: str, mode: str
) -> None:
    """A kill -9 of the agent takes its sandboxes down (DESIGN.md §5 "Kill"), so a lost node
    leaves no copy of its work running. bwrap's init runs as the task user, dumpable, in the
    task's namespace: a task may ptrace it and switch off its die-with-parent signal (that stays
    inside the task's own sandbox). The agent's root watchdog, outside every sandbox, kills the
    task's cgroup when the agent dies, so the task goes down all the same."""
    warm = ("--warm-sandboxes", _WARM_FLAG[mode])
    with (
        LocalMesh(tmp_path, agents=1, agent_cpus=1, agent_args=warm) as own,
        own.client() as client,
    ):
        job_id = _submit(client, _probe(_INJECT, marker), timeout=120.0)
        wait_for(lambda: "ptrace init" in output_of(client, job_id, 0), 30, "the probe's report")
        results = json.loads(output_of(client, job_id, 0).strip().splitlines()[-1])
        wait_for(lambda: bool(processes_with(marker)), 10, "the task's processes")
        # kill -9 by hand: LocalMesh.kill_agent also sweeps the dead agent's cgroups, which a
        # crashed agent on a real node does not do until an agent starts there again.
        agent = own.agents[0]
        agent.kill()
        agent.wait()
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not processes_with(marker), 2, "the sandbox to die with its agent")
        survivors = [p.pid for p in processes_with(marker)]
        assert not survivors, f"the task outlived its agent: {survivors}; the probe: {results}"
        # The attack itself was really made (so the test shows the watchdog, not a dud probe).
        assert "ptrace init" in results, results


# -- resources ----------------------------------------------------------------------------------


def test_a_fork_bomb_stops_at_the_pids_limit(mesh: LocalMesh, client: Client, marker: str) -> None:
    job_id = _submit(
        client,
        [
            "python3",
            "-c",
            textwrap.dedent(
                """
                import errno, os, sys, time
                forked = 0
                try:
                    while forked < 5000:
                        if os.fork() == 0:
                            time.sleep(60)
                            os._exit(0)
                        forked += 1
                except OSError as error:
                    print(f"fork failed after {forked}: {errno.errorcode[error.errno]}")
                else:
                    print(f"ESCAPED: forked {forked}")
                """
            ),
            marker,
        ],
        cpus=1.0,
        memory=1024 * MiB,
        timeout=45.0,
    )
    _ended(client, job_id, "succeeded")
    out = output_of(client, job_id, 0)
    assert out.startswith("fork failed after ") and out.strip().endswith("EAGAIN"), out
    forked = int(out.split()[3].rstrip(":"))
    assert 0 < forked < PIDS_LIMIT, out
    # The children went down with the task's main process.
    wait_for(lambda: not processes_with(marker), 10, "the fork bomb's children to be gone")
    _assert_healthy(mesh, client)


def test_memory_past_the_limit_is_killed_and_says_out_of_memory(
    mesh: LocalMesh, client: Client
) -> None:
    job_id = _submit(
        client,
        ["python3", "-c", "data = b'x' * (300 * 2**20); print('ESCAPED', len(data))"],
        memory=64 * MiB,
    )
    task = _ended(client, job_id, "failed")
    assert task.reason is not None and "out of memory" in task.reason, task
    assert "ESCAPED" not in output_of(client, job_id, 0)
    _assert_healthy(mesh, client)


def test_cpu_use_is_held_to_the_declared_cpus(mesh: LocalMesh, client: Client) -> None:
    # Three spinning processes would take both of the host's cores: the quota holds them to
    # half a core together. Measured as CPU time the kernel accounted, not wall time.
    job_id = _submit(
        client,
        [
            "python3",
            "-c",
            textwrap.dedent(
                """
                import json, os, time
                start = time.monotonic()
                for _ in range(3):
                    if os.fork() == 0:
                        while time.monotonic() - start < 2.0:
                            pass
                        os._exit(0)
                for _ in range(3):
                    os.wait()
                wall = time.monotonic() - start
                times = os.times()
                cpu = times.children_user + times.children_system + time.process_time()
                print(json.dumps({"cpu": cpu, "wall": wall}))
                """
            ),
        ],
        cpus=0.5,
    )
    _ended(client, job_id, "succeeded")
    measured = json.loads(output_of(client, job_id, 0))
    cpu, wall = float(measured["cpu"]), float(measured["wall"])
    assert wall >= 2.0
    assert cpu / wall <= 0.6, measured
    assert cpu >= 0.3, measured  # it did spin
    _assert_healthy(mesh, client)


def test_filling_tmp_stops_at_its_size_and_filling_the_work_dir_is_killed(
    mesh: LocalMesh, client: Client
) -> None:
    # tmpfs pages count against the task's memory: give it room for the whole /tmp.
    fill_tmp = _submit(
        client,
        [
            "python3",
            "-c",
            textwrap.dedent(
                """
                import json
                written, error = 0, "none"
                chunk = b"x" * 2**20
                try:
                    with open("/tmp/fill", "wb", buffering=0) as handle:
                        while written < 1024 * 2**20:
                            written += handle.write(chunk)
                except OSError as exc:
                    error = str(exc)
                print(json.dumps({"written": written, "error": error}))
                """
            ),
        ],
        memory=512 * MiB,
    )
    # Many files, none big: only the work directory's quota stops it. Slow enough that the
    # once-a-second check catches it well before the host's disk notices.
    fill_work = _submit(
        client,
        [
            "python3",
            "-c",
            textwrap.dedent(
                """
                import time
                chunk = b"x" * (4 * 2**20)
                for i in range(100):
                    with open(f"part-{i}", "wb") as handle:
                        handle.write(chunk)
                    time.sleep(0.05)
                print("ESCAPED: wrote 400 MiB")
                """
            ),
        ],
    )
    _ended(client, fill_tmp, "succeeded")
    result = json.loads(output_of(client, fill_tmp, 0))
    assert "No space left" in result["error"], result
    assert TMP_BYTES - 8 * MiB <= result["written"] <= TMP_BYTES, result
    task = _ended(client, fill_work, "failed")
    assert task.reason is not None and "disk quota" in task.reason, task
    assert "ESCAPED" not in output_of(client, fill_work, 0)
    assert _host_workdir_of(fill_work, "part-0") is None  # the agent removed the directory
    _assert_healthy(mesh, client)


# -- leftovers ----------------------------------------------------------------------------------


def _daemoniser(then: str) -> list[str]:
    """A task that double-forks a daemon in a session of its own, marked ``argv[1]-daemon``."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                daemon = sys.argv[1] + "-daemon"
                os.execvp("python3", ["python3", "-c", "import time; time.sleep(120)", daemon])
            os._exit(0)
        os.wait()
        print("daemonised", flush=True)
        {then}
        """
    )
    return ["python3", "-c", code]


def test_a_daemonised_child_dies_with_its_task_cancelled_or_finished(
    mesh: LocalMesh, client: Client, marker: str
) -> None:
    cancelled, finished = f"{marker}-cancel", f"{marker}-finish"
    to_cancel = _submit(client, [*_daemoniser("time.sleep(120)"), cancelled])
    to_finish = _submit(client, [*_daemoniser("pass"), finished])
    # A task that exits leaves nothing running behind it.
    _ended(client, to_finish, "succeeded")
    assert output_of(client, to_finish, 0) == "daemonised\n"
    wait_for(lambda: not processes_with(f"{finished}-daemon"), 5, "the finished task's daemon")
    # A cancelled one neither.
    wait_for(lambda: bool(processes_with(f"{cancelled}-daemon")), 30, "the daemon to start")
    started = time.monotonic()
    client.cancel(to_cancel)
    wait_for(lambda: not processes_with(f"{cancelled}-daemon"), 10, "the daemon to be killed")
    assert time.monotonic() - started < 10
    task = _ended(client, to_cancel, "cancelled")
    assert task.reason == "cancelled by admin"
    assert not processes_with(marker)
    _assert_healthy(mesh, client)


def test_an_input_file_cannot_plant_a_setuid_binary(mesh: LocalMesh, client: Client) -> None:
    # The job's files land in the work directory, owned by the task user; a task that sets the
    # setuid bit on a copy of a root-owned binary gets its own uid, and /work is nosuid anyway.
    job_id = _submit(
        client,
        [
            "sh",
            "-c",
            "cp /usr/bin/id ./myid && chmod 4755 ./myid; ./myid -u; ls -ln myid | cut -d' ' -f1,3;"
            " findmnt -no OPTIONS -T .",
        ],
        files={"note.txt": base64.b64encode(b"inputs land here\n").decode()},
    )
    _ended(client, job_id, "succeeded")
    uid, mode_owner, work_options = output_of(client, job_id, 0).strip().splitlines()
    assert uid != "0"
    assert mode_owner.split()[1] == uid  # the copy is the task's, not root's
    assert "nosuid" in work_options.split(",")
    _assert_healthy(mesh, client)
