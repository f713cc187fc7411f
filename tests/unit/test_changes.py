"""Changes: long-polling waiters wake on the next change, promptly, or at their timeout."""

from __future__ import annotations

import asyncio

from planetary_mesh.coordinator.changes import Changes


def test_a_change_already_made_returns_at_once() -> None:
    async def scenario() -> None:
        changes = Changes()
        changes.notify()
        assert await asyncio.wait_for(changes.wait(0, 60), 1) == 1

    asyncio.run(scenario())


def test_a_waiter_is_woken_in_the_event_loops_next_turn() -> None:
    # What a client waiting on /v1/jobs/run relies on: its answer is not queued behind whatever
    # else the change set off.
    async def scenario() -> None:
        changes = Changes()
        waiter = asyncio.create_task(changes.wait(changes.version, 60))
        await asyncio.sleep(0)  # the waiter is waiting now
        assert not waiter.done()
        changes.notify()
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # its wake-up, then its return
        assert waiter.done() and waiter.result() == 1

    asyncio.run(scenario())


def test_without_a_change_the_wait_ends_at_its_timeout_with_the_version_unchanged() -> None:
    async def scenario() -> None:
        changes = Changes()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await changes.wait(0, 0.05) == 0
        assert loop.time() - started >= 0.05
        changes.notify()  # a later change still wakes a later waiter
        waiter = asyncio.create_task(changes.wait(1, 60))
        await asyncio.sleep(0)
        changes.notify()
        assert await asyncio.wait_for(waiter, 1) == 2

    asyncio.run(scenario())
