"""POST /v1/jobs/run on its commonest form, served without FastAPI's machinery (ADR 16).

A program that runs one command after another waits on this route for each: FastAPI's layers
(its middleware, the request's dependencies, the body's parsing and the answer's validation)
cost ~0.6 ms of the coordinator's CPU on every call, a sixth of what the coordinator spends
on a one-task job, and on its critical path. A request with a user's client certificate, a
JSON body within the limit and at most a plain ``timeout`` is served here: the same checks,
the same service calls, the same answer. Anything else (no certificate, a browser session,
another query, a body that does not parse) goes to the app as it came, its body replayed, and
gets the app's own answer, errors included.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from planetary_mesh.coordinator import views
from planetary_mesh.coordinator.peer_cert import peer_cert_der
from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.core.model import Job
from planetary_mesh.errors import MeshError, NotFound, RequestRejected, TrustError
from planetary_mesh.pki import certs
from planetary_mesh.protocol import JobInfo, JobSubmit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/v1/jobs/run"
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
_TIMEOUT = re.compile(rb"timeout=(\d{1,3}(?:\.\d{1,6})?)")


def error_response(exc: MeshError) -> JSONResponse:
    """What the API answers for a MeshError: its words, under the status its kind means."""
    if isinstance(exc, NotFound):
        return error(404, str(exc))
    if isinstance(exc, RequestRejected):
        return error(exc.status, str(exc))
    if isinstance(exc, TrustError):
        return error(403, str(exc))
    return error(400, str(exc))


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def until_ended(
    service: CoordinatorService, job_id: str, timeout: float, fresh: Job | None = None
) -> JobInfo:
    """The job (counts only) once every task has ended, or as it is after ``timeout`` seconds.
    ``fresh``: the job as read just now, with nothing awaited since (so no change missed): its
    first look needs no read of its own."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        seen = service.changes.version
        found, fresh = fresh or service.job(job_id), None
        left = deadline - asyncio.get_running_loop().time()
        ended = sum(n for state, n in found.counts.items() if state.ended)
        if ended == found.spec.count or left <= 0:
            return views.job_info(found)
        await service.changes.wait(seen, left)


class QuickRun:
    """ASGI middleware in front of the app: serves POST /v1/jobs/run when it can (see above)."""

    def __init__(self, app: ASGIApp, service: CoordinatorService, limit: int) -> None:
        self.app = app
        self.service = service
        self.limit = limit
        self.served = 0  # requests answered here, not by the app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        who, timeout = self._admitted(scope)
        if who is None or timeout is None:
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive, self.limit)
        try:
            job = JobSubmit.model_validate(json.loads(body)) if complete else None
        except (ValueError, ValidationError):  # (a JSONDecodeError is a ValueError)
            job = None
        if job is None:
            await self.app(scope, _replay(body, complete, receive), send)
            return
        self.served += 1
        try:
            found = self.service.submit(who.name, job)
            answer = await until_ended(self.service, found.id, timeout, found)
        except MeshError as exc:
            await error_response(exc)(scope, receive, send)
            return
        payload = answer.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _admitted(self, scope: Scope) -> tuple[certs.Identity | None, float | None]:
        """The user a request comes from and its timeout, when this middleware may serve it
        (else the app does, with its own answer): a user's client certificate, not revoked; a
        JSON body the size of which is declared and within the limit; no query but a plain
        ``timeout`` of 0 to 300 seconds."""
        der = peer_cert_der(scope)
        if der is None:
            return None, None
        try:
            who = certs.identity_of_der(der)
            self.service.check_not_denied(who)
        except TrustError:
            return None, None
        if who.kind is not certs.PeerKind.USER:
            return None, None
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if headers.get(b"content-type") != b"application/json" or not length.isdigit():
            return None, None
        if int(length) > self.limit:
            return None, None
        query: bytes = scope.get("query_string", b"")
        if not query:
            return who, DEFAULT_TIMEOUT_S
        plain = _TIMEOUT.fullmatch(query)
        if plain is None or float(plain[1]) > MAX_TIMEOUT_S:
            return None, None
        return who, float(plain[1])


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request's body, and whether it is whole (not cut at ``limit``, no disconnect)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, complete: bool, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then what comes after it."""
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": not complete}

    return again
