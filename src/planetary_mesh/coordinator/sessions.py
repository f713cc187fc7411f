"""Live agent sessions: one per connected node, each with an outgoing message queue."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AgentSession:
    node_id: str
    cpus: float
    memory: int
    gpus: int = 0
    outbox: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    # Jobs whose spec and input files this session has already been sent: an array's tasks
    # share them, so they travel once per session instead of once per task.
    known_jobs: set[str] = field(default_factory=set)
    function_jobs: set[str] = field(default_factory=set)  # of those, jobs of Python calls
    closed: bool = False

    def send(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def close(self) -> None:
        """Stop sending and have the connection closed (a lost or replaced session)."""
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)
