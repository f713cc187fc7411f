"""Wake whoever waits for the mesh to change: a long-polling client, an event stream.

The store calls ``notify`` after each committed transaction (on the event-loop thread, as
everything that touches the store). Waiters compare versions, so a change that lands between
their look and their wait is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib


class Changes:
    def __init__(self) -> None:
        self.version = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()  # later waiters wait for the next change

    async def wait(self, seen: int, timeout: float) -> int:
        """Return the version once it differs from ``seen``, or after ``timeout`` seconds."""
        if self.version != seen or timeout <= 0:
            return self.version
        # Not wait_for: it runs the wait as a task of its own, and its end reached this one
        # two turns of the event loop after the change (behind, say, the agent's ack going out);
        # a waiter woken in the first turn answers its client ~0.1 ms sooner.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        return self.version
