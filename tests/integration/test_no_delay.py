"""The coordinator's connections send at once (TCP_NODELAY): with Nagle's algorithm on, a
response written in two pieces waited for the client's delayed ACK, 40 ms on every call."""

from __future__ import annotations

import asyncio
import socket

from planetary_mesh.coordinator.server import bind_socket


def test_accepted_connections_have_nagle_off() -> None:
    listener = bind_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    seen: list[int] = []

    async def go() -> None:
        def accepted(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        async with server:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _reader.read()  # the server closes it once it looked
            writer.close()

    asyncio.run(go())
    assert seen and seen[0] != 0, "TCP_NODELAY is off on an accepted connection"
