"""The coordinator's writer for an agent session: a failed send closes the session, so that
the agent reconnects instead of heartbeating on a session that no longer carries its work."""

from __future__ import annotations

import asyncio
from typing import Any

from planetary_mesh.coordinator.app import _pump


class RecordingSocket:
    """Stands in for the websocket: records what is sent and how it is closed."""

    def __init__(self, fail_sends: bool = False) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str] | None = None
        self.fail_sends = fail_sends

    async def send_text(self, text: str) -> None:
        if self.fail_sends:
            raise ConnectionResetError("the peer is gone")
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


def pump(socket: RecordingSocket, *messages: dict[str, Any] | None) -> None:
    async def run() -> None:
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for message in messages:
            outbox.put_nowait(message)
        async with asyncio.timeout(5):  # it must end by itself on a close or a failure
            await _pump(outbox, socket)  # type: ignore[arg-type]

    asyncio.run(run())


def test_messages_go_out_in_order_until_the_service_closes_the_session() -> None:
    socket = RecordingSocket()
    pump(socket, {"type": "lease"}, {"type": "cancel", "tasks": []}, None)
    assert socket.sent == ['{"type":"lease"}', '{"type":"cancel","tasks":[]}']
    assert socket.closed is not None and socket.closed[0] == 4408


def test_a_message_that_cannot_be_sent_closes_the_session_for_a_reconnect() -> None:
    socket = RecordingSocket()
    pump(socket, {"type": "lease"}, {"type": "assign", "tasks": {1, 2}}, {"type": "lease"})
    assert socket.sent == ['{"type":"lease"}']  # nothing after the failure goes out
    assert socket.closed is not None
    code, reason = socket.closed
    assert code == 1011 and "reconnect" in reason


def test_a_send_on_a_broken_connection_closes_the_session() -> None:
    socket = RecordingSocket(fail_sends=True)
    pump(socket, {"type": "lease"})
    assert socket.closed is not None and socket.closed[0] == 1011
