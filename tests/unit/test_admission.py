"""The agent's admission queue: order, room, cancel while queued, and the lease."""

from __future__ import annotations

import asyncio

from planetary_mesh.agent.admission import Admission

MIB = 1024**2


Entered = asyncio.Task[tuple[int, ...] | None]


async def _started(tasks: dict[str, Entered]) -> set[str]:
    await asyncio.sleep(0)  # let every waiter look once (no time passes)
    await asyncio.sleep(0)
    return {name for name, task in tasks.items() if task.done() and task.result() is not None}


def test_tasks_start_in_order_within_the_room() -> None:
    async def scenario() -> None:
        gate: Admission[str] = Admission(cpus=2.0, memory=100 * MIB)
        tasks = {
            name: asyncio.create_task(
                gate.enter(name, 1.0, 10 * MIB, skip=lambda: False, may_start=lambda: True)
            )
            for name in ("a", "b", "c", "d")
        }
        assert await _started(tasks) == {"a", "b"}  # two CPUs: two run, two wait
        assert gate.waiting == 2
        gate.leave(1.0, 10 * MIB)
        assert await _started(tasks) == {"a", "b", "c"}  # the next in line, not "d"
        gate.leave(1.0, 10 * MIB)
        assert await _started(tasks) == {"a", "b", "c", "d"}
        assert gate.used_cpus == 2.0

    asyncio.run(scenario())


def test_memory_holds_a_task_back_and_an_idle_node_runs_anything() -> None:
    async def scenario() -> None:
        gate: Admission[str] = Admission(cpus=4.0, memory=100 * MIB)
        first = asyncio.create_task(
            gate.enter("big", 1.0, 80 * MIB, skip=lambda: False, may_start=lambda: True)
        )
        second = asyncio.create_task(
            gate.enter("also", 1.0, 80 * MIB, skip=lambda: False, may_start=lambda: True)
        )
        assert await _started({"big": first, "also": second}) == {"big"}
        gate.leave(1.0, 80 * MIB)
        assert await _started({"also": second}) == {"also"}
        gate.leave(1.0, 80 * MIB)
        # Bigger than the node: coordinators never send one, but it must not wait forever.
        huge = asyncio.create_task(
            gate.enter("huge", 8.0, 1000 * MIB, skip=lambda: False, may_start=lambda: True)
        )
        assert await _started({"huge": huge}) == {"huge"}

    asyncio.run(scenario())


def test_a_cancelled_queued_task_leaves_without_running_and_frees_its_turn() -> None:
    async def scenario() -> None:
        gate: Admission[str] = Admission(cpus=1.0, memory=100 * MIB)
        cancelled: set[str] = set()
        tasks = {
            name: asyncio.create_task(
                gate.enter(
                    name,
                    1.0,
                    MIB,
                    skip=lambda name=name: name in cancelled,  # type: ignore[misc]
                    may_start=lambda: True,
                )
            )
            for name in ("a", "b", "c")
        }
        assert await _started(tasks) == {"a"}
        cancelled.add("b")
        gate.wake()
        await asyncio.sleep(0)
        assert tasks["b"].done() and tasks["b"].result() is None
        gate.leave(1.0, MIB)
        assert await _started(tasks) == {"a", "c"}  # c went after b left the line
        assert gate.waiting == 0

    asyncio.run(scenario())


def test_nothing_starts_while_the_lease_has_lapsed() -> None:
    async def scenario() -> None:
        gate: Admission[str] = Admission(cpus=1.0, memory=100 * MIB)
        lease = {"holds": False}
        task = asyncio.create_task(
            gate.enter("a", 1.0, MIB, skip=lambda: False, may_start=lambda: lease["holds"])
        )
        assert await _started({"a": task}) == set()
        lease["holds"] = True
        gate.wake()
        assert await _started({"a": task}) == {"a"}

    asyncio.run(scenario())


def test_gpus_are_whole_devices_and_two_tasks_never_share_one() -> None:
    async def scenario() -> None:
        gate: Admission[str] = Admission(cpus=8.0, memory=100 * MIB, gpus=2)

        def enter(name: str, gpus: int) -> Entered:
            return asyncio.create_task(
                gate.enter(name, 1.0, MIB, skip=lambda: False, may_start=lambda: True, gpus=gpus)
            )

        tasks = {"a": enter("a", 1), "b": enter("b", 1), "c": enter("c", 1), "cpu": enter("d", 0)}
        assert await _started(tasks) == {"a", "b"}  # c waits for a device; d waits behind c
        assert {tasks["a"].result(), tasks["b"].result()} == {(0,), (1,)}
        held = tasks["b"].result()
        assert held is not None
        gate.leave(1.0, MIB, held)
        assert await _started(tasks) == {"a", "b", "c", "cpu"}
        assert tasks["c"].result() == held and tasks["cpu"].result() == ()

    asyncio.run(scenario())
