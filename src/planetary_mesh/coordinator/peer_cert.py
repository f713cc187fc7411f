"""Hand the verified client certificate of each TLS connection to the ASGI app.

uvicorn does not put the peer certificate into the ASGI scope, and identity must come from the
verified certificate, never from a header. These protocol subclasses read it from the TLS
transport once per connection and add it to every request's scope as
``scope["extensions"]["tls"]["client_cert_der"]`` (``None`` when the client sent none).
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

ASGIApp = Any


def _peer_der(transport: asyncio.BaseTransport) -> bytes | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def _with_peer(app: ASGIApp, der: bytes | None) -> ASGIApp:
    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions["tls"] = {"client_cert_der": der}
        await app({**scope, "extensions": extensions}, receive, send)

    return wrapped


class PeerCertHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.app = _with_peer(self.app, _peer_der(transport))
        super().connection_made(transport)


class PeerCertWebSocketProtocol(WebSocketsSansIOProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.app = _with_peer(self.app, _peer_der(transport))
        super().connection_made(transport)

    def shutdown(self) -> None:
        # At server shutdown uvicorn sends a close frame on every session; when the agent has
        # already started closing (it is stopping too), that raises InvalidState and breaks off
        # the rest of the shutdown. Such a connection only needs dropping.
        if self.handshake_complete and not self.close_sent and self.conn.state is not State.OPEN:
            self.stop_keepalive()
            self.transport.close()
            return
        super().shutdown()


def peer_cert_der(scope: MutableMapping[str, Any]) -> bytes | None:
    tls = (scope.get("extensions") or {}).get("tls") or {}
    der = tls.get("client_cert_der")
    return der if isinstance(der, bytes) else None
