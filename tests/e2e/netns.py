"""Hosts in network namespaces for multi-host end-to-end tests.

One namespace per host, each with ``lo`` and an ``eth0`` on a private /24; the bridge that joins
them lives in a namespace of its own, so nothing is added to the host's own network. Addresses
are only ever used inside these namespaces. ``destroy`` ends every process started here (by pid),
then deletes every namespace made here, whatever happened in between.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from planetary_mesh.protocol import JobInfo, NodeInfo

IP = shutil.which("ip") or "/usr/sbin/ip"
NFT = shutil.which("nft") or "/usr/sbin/nft"
STOP_TIMEOUT = 10.0

# Drop everything in and out of a host except loopback: a partition that neither side sees
# as a closed connection (no RST, no FIN), only as silence.
PARTITION_TABLE = "pm_partition"
PARTITION_RULES = f"""
table inet {PARTITION_TABLE} {{
  chain input {{ type filter hook input priority 0; policy drop; iif "lo" accept; }}
  chain output {{ type filter hook output priority 0; policy drop; oif "lo" accept; }}
}}
"""


class NetnsError(Exception):
    """A namespace or network command failed."""


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} is not installed: {exc}") from exc
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: same pid)."""
        return [IP, "netns", "exec", self.netns, *argv]


class Network:
    """Hosts named ``names`` on one bridge, at 10.251.<random>.1, .2, ... in that order."""

    def __init__(self, names: Sequence[str], log_dir: Path) -> None:
        prefix = f"pm-{secrets.token_hex(3)}"
        subnet = f"10.251.{secrets.randbelow(256)}"
        self.bridge_netns = f"{prefix}-br"
        self.hosts = {
            name: Host(name, f"{prefix}-{name}", f"{subnet}.{i + 1}")
            for i, name in enumerate(names)
        }
        self.log_dir = log_dir
        self.created: list[str] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # -- set-up and tear-down ---------------------------------------------------------------

    def create(self) -> None:
        for tool in (IP, NFT):
            if not Path(tool).exists():
                raise NetnsError(f"{tool} is missing: install iproute2 and nftables")
        for netns in [self.bridge_netns, *(h.netns for h in self.hosts.values())]:
            _run([IP, "netns", "add", netns])
            self.created.append(netns)
        br = [IP, "-n", self.bridge_netns]
        _run([*br, "link", "add", "br0", "type", "bridge"])
        _run([*br, "link", "set", "br0", "up"])
        for host in self.hosts.values():
            port = f"v-{host.name}"
            # The veth is made in the bridge's namespace with its peer straight in the host's:
            # neither end ever exists in the root namespace.
            _run(
                [
                    *br,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.netns,
                ]
            )
            _run([*br, "link", "set", port, "master", "br0", "up"])
            at = [IP, "-n", host.netns]
            _run([*at, "link", "set", "lo", "up"])
            _run([*at, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            _run([*at, "link", "set", "eth0", "up"])

    def destroy(self) -> None:
        """End what was started here, by pid; then delete every namespace made here."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes = {}
        for netns in self.created:
            # Anything still in one of these namespaces was started, directly or not, by us.
            with contextlib.suppress(NetnsError):
                for pid in _run([IP, "netns", "pids", netns]).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        problems = []
        for netns in reversed(self.created):
            try:
                _run([IP, "netns", "del", netns])
            except NetnsError as exc:
                problems.append(str(exc))
        self.created = []
        if problems:
            raise NetnsError("; ".join(problems))

    # -- processes --------------------------------------------------------------------------

    def spawn(self, host: str, label: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace, output to ``<log_dir>/<label>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("MESH_CONFIG", "MESH_TOKEN"):
            env.pop(name, None)
        with (self.log_dir / f"{label}.log").open("ab") as log:
            proc = subprocess.Popen(
                self.hosts[host].command(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.processes[label] = proc
        return proc

    def run(self, host: str, argv: Sequence[str], stdin: str | None = None) -> str:
        """Run a short command in ``host``'s namespace; its output (raises NetnsError)."""
        return _run(self.hosts[host].command(argv), stdin)

    def run_for_result(
        self, host: str, argv: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace to its end, whatever its exit status."""
        env = {k: v for k, v in os.environ.items() if k not in ("MESH_CONFIG", "MESH_TOKEN")}
        return subprocess.run(
            self.hosts[host].command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )

    def check_running(self) -> None:
        for label, proc in self.processes.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{label} exited with {proc.returncode}; see {self.log_dir / label}.log"
                )

    # -- partitions -------------------------------------------------------------------------

    def partition_command(self, host: str) -> list[str]:
        """The command that cuts ``host`` off, given ``PARTITION_RULES`` on its stdin. It can run
        in any of these namespaces: a test may have to partition from inside one, on cue."""
        return self.hosts[host].command([NFT, "-f", "-"])

    def partition(self, host: str) -> None:
        """Cut ``host`` off: every packet in or out, except on loopback, is dropped."""
        _run(self.partition_command(host), stdin=PARTITION_RULES)

    def heal(self, host: str) -> None:
        _run(self.hosts[host].command([NFT, "delete", "table", "inet", PARTITION_TABLE]))


def build_network(names: Sequence[str], log_dir: Path) -> Iterator[Network]:
    """A fixture's body: the network made, yielded, and always destroyed. Fails (never skips)
    where it cannot be built."""
    net = Network(names, log_dir)
    try:
        problem = None
        try:
            net.create()
        except NetnsError as exc:
            problem = str(exc)
        if problem is not None:
            pytest.fail(
                "cannot build the test network: this test needs root (CAP_NET_ADMIN and "
                f"CAP_SYS_ADMIN), iproute2 and nftables: {problem}",
                pytrace=False,
            )
        yield net
    finally:
        net.destroy()


CLI_TIMEOUT = 30.0
_nodes = TypeAdapter(list[NodeInfo])


class NamespacedMesh:
    """A coordinator's data dir, and the `mesh` CLI run in that coordinator's namespace."""

    def __init__(self, net: Network, data_dir: Path, host: str = "c") -> None:
        self.net = net
        self.host = host
        self.data_dir = data_dir
        self.config = str(data_dir / "client.toml")

    def _command(self, args: Sequence[str]) -> list[str]:
        return self.net.hosts[self.host].command([sys.executable, "-m", "planetary_mesh", *args])

    def cli(self, *args: str) -> str:
        proc = subprocess.run(
            self._command(args), capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"mesh {' '.join(args)} exited with {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc.stdout

    def cli_many(self, commands: list[list[str]]) -> list[str]:
        """Run several `mesh` commands at once; their outputs, in order."""
        procs = [
            subprocess.Popen(
                self._command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for args in commands
        ]
        outputs = []
        for args, proc in zip(commands, procs, strict=True):
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
            if proc.returncode != 0:
                raise AssertionError(
                    f"mesh {' '.join(args)} exited with {proc.returncode}: {err.strip()}"
                )
            outputs.append(out)
        return outputs

    def nodes(self) -> dict[str, NodeInfo]:
        """By name."""
        self.net.check_running()
        found = _nodes.validate_json(self.cli("nodes", "--config", self.config, "-o", "json"))
        return {n.name: n for n in found}

    def job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate_json(
            self.cli("status", job_id, "--config", self.config, "-o", "json")
        )
