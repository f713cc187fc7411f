"""The agent's admission queue: assigned tasks start in the order they came, each once the
CPUs, memory and GPUs it declared are free on this node; the GPUs it is given are named
devices (their indices), so two tasks never share one.

The coordinator may hand a node more tasks of a short job than it has room for (prefetch,
core/prefetch.py) so that the next one is already here when one ends; this queue is what keeps
the node within its size. A queued task starts only while the agent's lease holds: a node the
coordinator may have declared lost starts nothing new (its running tasks are fenced by the
watchdog; queued ones simply wait for the session to come back, which then adopts or stops
them).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

Key = TypeVar("Key")
_EPSILON = 1e-9


class Admission(Generic[Key]):
    def __init__(self, cpus: float, memory: int, gpus: int = 0) -> None:
        self.cpus = cpus
        self.memory = memory
        self.used_cpus = 0.0
        self.used_memory = 0
        self.free_gpus = list(range(gpus))  # device indices no task holds
        self._waiting: deque[Key] = deque()
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def wake(self) -> None:
        """Something a waiter depends on changed (room, a cancel, the lease): look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _fits(self, cpus: float, memory: int, gpus: int) -> bool:
        if gpus > len(self.free_gpus):
            return False  # devices are whole: the caller refuses more than the node has
        if self.used_cpus <= _EPSILON and self.used_memory <= 0:
            return True  # an idle node runs anything it was given: no task waits forever
        return (
            self.used_cpus + cpus <= self.cpus + _EPSILON
            and self.used_memory + memory <= self.memory
        )

    async def enter(
        self,
        key: Key,
        cpus: float,
        memory: int,
        *,
        skip: Callable[[], bool],
        may_start: Callable[[], bool],
        gpus: int = 0,
    ) -> tuple[int, ...] | None:
        """Wait for ``key``'s turn and room, then hold its CPUs, memory and GPUs: the indices
        of the GPUs it holds now; or None as soon as ``skip()`` says it is not to run
        (cancelled while queued)."""
        self._waiting.append(key)
        try:
            while True:
                if skip():
                    return None
                if self._waiting[0] == key and may_start() and self._fits(cpus, memory, gpus):
                    self.used_cpus += cpus
                    self.used_memory += memory
                    devices = tuple(self.free_gpus[:gpus])
                    del self.free_gpus[:gpus]
                    return devices
                await self._changed.wait()
        finally:
            self._waiting.remove(key)
            self.wake()  # the next in line may go now

    def leave(self, cpus: float, memory: int, devices: tuple[int, ...] = ()) -> None:
        """A task that entered has ended: its room and its GPUs are free."""
        self.used_cpus = max(0.0, self.used_cpus - cpus)
        self.used_memory = max(0, self.used_memory - memory)
        self.free_gpus = sorted({*self.free_gpus, *devices})
        self.wake()
