"""GPUs on a real local mesh: two agents that each offer one GPU (`mesh agent --gpus 1`; this
machine has none, so the devices are indices without device files). A GPU task holds its GPU
whole: no two run on one node at once, each is told its device, a task that asks for more GPUs
than any node has waits and `mesh why` says so, and CPU-only work is never held up."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from helpers import output_of, wait_for, wait_job

from planetary_mesh import MeshExecutor
from planetary_mesh.client import Client
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.xdist_group("gpus")
MIB = 2**20

# Start and end (ns, the host's clock) and the devices it was given.
STAMPED = [
    "sh",
    "-c",
    's=$(date +%s%N); sleep 0.3; echo "$s $(date +%s%N) ${CUDA_VISIBLE_DEVICES:-none}"',
]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    root = tmp_path_factory.mktemp("mesh")
    with LocalMesh(root, agents=2, agent_cpus=4, agent_args=("--gpus", "1")) as local:
        yield local


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[Client]:
    with mesh.client() as c:
        yield c


def test_gpu_tasks_hold_their_gpu_whole_and_know_which_it_is(client: Client) -> None:
    assert sorted(n.gpus for n in client.nodes()) == [1, 1]
    gpu_job = client.submit(JobSubmit(argv=STAMPED, count=6, gpus=1, memory=16 * MIB))
    cpu_job = client.submit(JobSubmit(argv=STAMPED, count=4, memory=16 * MIB))
    done = wait_job(client, gpu_job.id, timeout=120)
    assert done.state == "succeeded" and done.gpus == 1
    spans: dict[str | None, list[tuple[int, int]]] = {}
    for task in done.task_list or []:
        began, ended, devices = output_of(client, gpu_job.id, task.index).split()
        assert devices == "0"  # the node's one GPU, by its index
        spans.setdefault(task.node, []).append((int(began), int(ended)))
    for node_spans in spans.values():  # one GPU per node: its tasks ran one after another
        for (_, end), (start, _) in itertools.pairwise(sorted(node_spans)):
            assert end <= start, "two GPU tasks shared a node's one GPU"
    cpu_done = wait_job(client, cpu_job.id, timeout=60)
    assert cpu_done.state == "succeeded"
    for task in cpu_done.task_list or []:
        assert output_of(client, cpu_job.id, task.index).split()[2] == "none"


def test_a_task_asking_more_gpus_than_any_node_has_waits_and_says_why(client: Client) -> None:
    job = client.submit(JobSubmit(argv=["true"], gpus=2, memory=16 * MIB))
    why = client.why(job.id, 0)
    assert why.state == "pending"
    assert "no node can ever run it" in why.summary and "--gpus" in why.summary
    assert all("the job asks 2 GPUs a task, the node has 1" in n.reason for n in why.nodes)
    client.cancel(job.id)
    # Meanwhile CPU work is not held up behind it.
    after = client.submit(JobSubmit(argv=["true"], count=2, memory=16 * MIB))
    assert wait_job(client, after.id, timeout=60).state == "succeeded"


def visible_devices(_: int = 0) -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "none")


def test_python_calls_ask_for_gpus_too(client: Client) -> None:
    with MeshExecutor(client, name="gpu-calls") as executor:
        on_gpu = executor.options(gpus=1, memory="64M")
        assert set(on_gpu.map(visible_devices, range(4))) == {"0"}
        assert executor.submit(visible_devices).result(timeout=60) == "none"
    wait_for(lambda: all(n.used_gpus == 0 for n in client.nodes()), 30, "the GPUs freed")
