"""How the API shows a node: its machine's live figures only while it is heard from."""

from __future__ import annotations

from dataclasses import replace

from planetary_mesh.coordinator.views import node_info
from planetary_mesh.core.model import Node
from planetary_mesh.core.states import NodeState
from planetary_mesh.protocol import Usage

NODE = Node(
    id="n-1", name="desk", state=NodeState.READY, cpus=4.0, memory=8 << 30, used_cpus=1.0,
    used_memory=1 << 30, running=1, sandbox="bwrap", version="0", joined_at=0.0,
    last_seen=1.0, labels={"room": "lab"}, gpus=1,
)  # fmt: skip
USAGE = Usage(cpu_percent=37.5, memory_in_use=3 << 30)


def test_a_ready_node_shows_its_machine_s_use_labels_and_gpus() -> None:
    shown = node_info(NODE, USAGE)
    assert (shown.cpu_percent, shown.memory_in_use) == (37.5, 3 << 30)
    assert shown.labels == {"room": "lab"} and shown.gpus == 1
    draining = node_info(replace(NODE, draining=True), USAGE)
    assert draining.state == "draining" and draining.cpu_percent == 37.5


def test_a_silent_node_s_last_figures_are_not_shown_as_live() -> None:
    for state in (NodeState.SUSPECT, NodeState.LOST):
        shown = node_info(replace(NODE, state=state), USAGE)
        assert shown.cpu_percent is None and shown.memory_in_use is None, state
    assert node_info(NODE).cpu_percent is None  # nothing heard yet
