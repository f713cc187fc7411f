"""Plug in a device and it joins: mDNS discovery across real hosts in network namespaces.

Three hosts on a private bridge: the mesh's coordinator (c), a second mesh's coordinator with
another CA on the same LAN (r), and a machine that has only a join token (a). Both coordinators
advertise themselves; the agent must join the mesh its token names and ignore the other. With
multicast dropped on the agent's host (nft on udp/5353), it must say why it found nothing and
what to do, and the static --coordinator path must still work.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.netns import NFT, NamespacedMesh, Network, build_network
from helpers import wait_for
from pydantic import TypeAdapter

from planetary_mesh.config import CoordinatorPaths
from planetary_mesh.coordinator.bootstrap import init_mesh
from planetary_mesh.protocol import NodeInfo

pytestmark = pytest.mark.e2e

PORT = 7443
_nodes = TypeAdapter(list[NodeInfo])
PYTHON = [sys.executable, "-m", "planetary_mesh"]
# Drop mDNS (udp/5353) in and out of a host; everything else passes.
NO_MDNS_TABLE = "pm_no_mdns"
NO_MDNS_RULES = f"""
table inet {NO_MDNS_TABLE} {{
  chain input {{ type filter hook input priority 0; udp dport 5353 drop; udp sport 5353 drop; }}
  chain output {{ type filter hook output priority 0; udp dport 5353 drop; udp sport 5353 drop; }}
}}
"""


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    yield from build_network(["c", "r", "a"], tmp_path / "logs")


def start_coordinator(
    network: Network,
    host: str,
    data_dir: Path,
    name: str,
    *,
    hosts: list[str] | None = None,
    listen: str | None = None,
    args: tuple[str, ...] = (),
) -> NamespacedMesh:
    """A mesh made for ``hosts`` (default: the host's address) served on ``listen`` (default:
    that address) in ``host``'s namespace; its CLI."""
    ip = network.hosts[host].ip
    paths = CoordinatorPaths(data_dir)
    init_mesh(paths, data_dir / "client.toml", hosts or [ip], mesh_name=name)
    listen = listen or f"{ip}:{PORT}"
    argv = [*PYTHON, "coordinator", "--data-dir", str(data_dir), "--listen", listen, *args]
    network.spawn(host, f"coordinator-{name}", argv)

    def listening() -> bool:
        network.check_running()
        return paths.url_file.exists()

    wait_for(listening, 30, f"coordinator {name} to listen")
    return NamespacedMesh(network, data_dir, host)


def join_by_mdns(network: Network, mesh: NamespacedMesh, data_dir: Path, name: str) -> str:
    """Start an agent on host "a" with only a token of ``mesh``; wait until it is ready there.
    The token."""
    token = mesh.cli("token", "create", "--config", mesh.config).strip()
    agent = [*PYTHON, "agent", "--token", token, "--data-dir", str(data_dir), "--cpus", "1"]
    network.spawn("a", "agent", [*agent, "--name", name])
    wait_for(
        lambda: mesh.nodes().get(name) is not None and mesh.nodes()[name].state == "ready",
        60,
        f"agent {name} to find its coordinator by mDNS and join",
    )
    return token


def test_an_agent_with_only_a_token_joins_its_own_mesh_and_ignores_another(
    network: Network, tmp_path: Path
) -> None:
    ours = start_coordinator(network, "c", tmp_path / "ours", "home")
    theirs = start_coordinator(network, "r", tmp_path / "theirs", "neighbours")
    token = join_by_mdns(network, ours, tmp_path / "agent", "laptop")
    assert theirs.nodes() == {}  # the other mesh never heard from it
    log = (tmp_path / "logs" / "agent.log").read_text()
    assert "neighbours" in log and "another CA" in log, log  # it says what it ignored
    # Work reaches it: the mesh is usable through the discovered address.
    output = ours.cli("run", "--config", ours.config, "--", "echo", "found on the LAN")
    assert "found on the LAN" in output
    # The CLI on another machine of the LAN, told no address, finds the mesh its CA belongs
    # to (not the neighbours').
    nodes = [*PYTHON, "nodes", "--config", ours.config, "-o", "json"]
    found = network.run_for_result("a", ["env", "MESH_COORDINATOR=mdns", *nodes], timeout=60)
    assert found.returncode == 0, found.stderr
    assert [n.name for n in _nodes.validate_json(found.stdout)] == ["laptop"]

    # `mesh doctor` with the token: both meshes seen, ours reached and proven; then the cause
    # in words for a wrong address (the other mesh) and for one where nothing answers.
    doctor = [*PYTHON, "doctor", "--token", token]
    seen = network.run_for_result("a", doctor, timeout=60)
    assert seen.returncode == 0, seen.stderr
    assert "(this mesh)" in seen.stderr and "neighbours" in seen.stderr, seen.stderr
    assert "another CA: ignored" in seen.stderr and "ok tls" in seen.stderr, seen.stderr
    rogue = f"https://{network.hosts['r'].ip}:{PORT}"
    wrong = network.run_for_result("a", [*doctor, "--coordinator", rogue], timeout=60)
    assert wrong.returncode == 1 and "belongs to another mesh" in wrong.stderr, wrong.stderr
    assert "token was made on another coordinator" in wrong.stderr
    nobody = network.hosts["r"].ip.rsplit(".", 1)[0] + ".99"
    gone = network.run_for_result("a", [*doctor, "--coordinator", f"https://{nobody}:{PORT}"], 60)
    assert gone.returncode == 1 and "PROBLEM port" in gone.stderr, gone.stderr
    assert "what to do:" in gone.stderr


def test_without_multicast_the_agent_says_why_and_the_static_address_still_works(
    network: Network, tmp_path: Path
) -> None:
    ours = start_coordinator(network, "c", tmp_path / "ours", "home")
    token = ours.cli("token", "create", "--uses", "2", "--config", ours.config).strip()
    network.run("a", [NFT, "-f", "-"], stdin=NO_MDNS_RULES)
    agent = [*PYTHON, "agent", "--token", token, "--data-dir", str(tmp_path / "lost")]
    failed = network.run_for_result("a", agent, timeout=60)
    assert failed.returncode != 0
    assert "no mesh answered" in failed.stderr and "--coordinator" in failed.stderr, failed.stderr
    # The CLI told to find it says the same kind of thing.
    nodes = [*PYTHON, "nodes", "--config", ours.config]
    lost = network.run_for_result("a", ["env", "MESH_COORDINATOR=mdns", *nodes], timeout=60)
    assert lost.returncode != 0 and "no mesh answered" in lost.stderr, lost.stderr
    # `mesh doctor` names the cause, and that the coordinator itself is fine at its address.
    url = f"https://{network.hosts['c'].ip}:{PORT}"
    doctor = [*PYTHON, "doctor", "--token", token]
    told = network.run_for_result("a", [*doctor, "--coordinator", url], timeout=60)
    assert told.returncode == 1, told.stderr
    assert "PROBLEM mdns: no mesh answered" in told.stderr and "5353" in told.stderr, told.stderr
    assert "ok port" in told.stderr and "ok tls" in told.stderr and "ok clock" in told.stderr

    static = [*PYTHON, "agent", "--coordinator", url, "--token", token]
    network.spawn("a", "agent", [*static, "--data-dir", str(tmp_path / "static"), "--name", "pc"])
    wait_for(
        lambda: ours.nodes().get("pc") is not None and ours.nodes()["pc"].state == "ready",
        30,
        "the agent to join at the static address",
    )


def test_after_the_coordinator_changes_address_the_agent_finds_it_again(
    network: Network, tmp_path: Path
) -> None:
    # Listening on every address (as on a real LAN), certified for loopback (the CLI here) and
    # its first address only: after the move, the agent can check only the fixed name.
    ip = network.hosts["c"].ip
    everywhere = f"0.0.0.0:{PORT}"
    ours = start_coordinator(
        network, "c", tmp_path / "ours", "home", hosts=["127.0.0.1", ip], listen=everywhere
    )
    join_by_mdns(network, ours, tmp_path / "agent", "laptop")

    def ready() -> bool:
        node = ours.nodes().get("laptop")
        return node is not None and node.state == "ready"

    # DHCP gives the coordinator's machine another address; the old one is gone.
    moved = ip.rsplit(".", 1)[0] + ".200"
    network.run("c", ["ip", "addr", "del", f"{ip}/24", "dev", "eth0"])
    network.run("c", ["ip", "addr", "add", f"{moved}/24", "dev", "eth0"])
    wait_for(lambda: ours.nodes()["laptop"].state != "ready", 30, "the coordinator to lose it")
    wait_for(ready, 90, "the agent to find the coordinator at its new address")
    log = (tmp_path / "logs" / "agent.log").read_text()
    assert f"https://{moved}:{PORT}" in log and "moved" in log, log
    # It remembers the new address for its next start, and work reaches it there.
    assert moved in (tmp_path / "agent" / "agent.toml").read_text()
    output = ours.cli("run", "--config", ours.config, "--", "echo", "still here")
    assert "still here" in output


def test_over_ipv6_the_agent_finds_and_joins_a_coordinator_listening_on_ipv6_only(
    network: Network, tmp_path: Path
) -> None:
    prefix = f"fd00:5eed:{int(network.hosts['c'].ip.split('.')[2]):x}"
    for i, host in enumerate(("c", "a"), start=1):
        network.run(host, ["ip", "addr", "add", f"{prefix}::{i}/64", "dev", "eth0", "nodad"])
    address = f"{prefix}::1"
    v6 = f"[{address}]:{PORT}"
    ours = start_coordinator(network, "c", tmp_path / "ours", "home", hosts=[address], listen=v6)
    join_by_mdns(network, ours, tmp_path / "agent", "v6")
    log = (tmp_path / "logs" / "agent.log").read_text()
    assert f"https://[{address}]:{PORT}" in log, log


def test_a_coordinator_started_with_no_mdns_is_not_found(network: Network, tmp_path: Path) -> None:
    quiet = start_coordinator(network, "c", tmp_path / "quiet", "quiet", args=("--no-mdns",))
    token = quiet.cli("token", "create", "--config", quiet.config).strip()
    agent = [*PYTHON, "agent", "--token", token, "--data-dir", str(tmp_path / "agent")]
    failed = network.run_for_result("a", agent, timeout=60)
    assert failed.returncode != 0 and "no mesh answered" in failed.stderr, failed.stderr
    assert "--no-mdns" in failed.stderr  # the message names it as a likely cause
    assert quiet.nodes() == {}
