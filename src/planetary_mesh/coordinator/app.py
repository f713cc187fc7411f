"""HTTP routes: REST for people and tools, one WebSocket per agent. All on one HTTPS port.

Identity comes only from the verified client certificate (see peer_cert.py). ``/healthz`` and
the token-authenticated ``/v1/join`` are the only routes that answer without one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
)
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from planetary_mesh import __version__
from planetary_mesh.coordinator import dashboard, views
from planetary_mesh.coordinator.browser import (
    COOKIE,
    CSRF_HEADER,
    SAFE_METHODS,
)
from planetary_mesh.coordinator.deps import Admin, Identity, TaskIndex, User
from planetary_mesh.coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from planetary_mesh.coordinator.peer_cert import peer_cert_der
from planetary_mesh.coordinator.quick_run import QuickRun, error, error_response, until_ended
from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.errors import (
    MeshError,
    TrustError,
)
from planetary_mesh.pki import certs
from planetary_mesh.protocol import (
    MAX_REQUEST_BYTES,
    AgentMessage,
    AttemptInfo,
    CallsAdd,
    CallsAdded,
    CallUpdate,
    CallUpdates,
    DrainRequest,
    EventInfo,
    FunctionSubmit,
    Heartbeat,
    Hello,
    JobInfo,
    JobSubmit,
    JoinRequest,
    JoinResponse,
    LogChunk,
    NewToken,
    NodeInfo,
    NodeRemoved,
    NodeVerdict,
    OutputFile,
    RenewRequest,
    RenewResponse,
    Report,
    TasksCancel,
    TokenCreate,
    TokenInfo,
    UserCreate,
    UserCreated,
    UserInfo,
    WhyInfo,
)

log = logging.getLogger(__name__)
_agent_messages: TypeAdapter[Hello | Report | Heartbeat] = TypeAdapter(AgentMessage)
_OPEN_PATHS = ("/healthz", "/v1/join", "/login")
CALL_UPDATE_BYTES = 24 * 1024 * 1024  # of results in one answer (at least one goes)


def create_app(service: CoordinatorService) -> FastAPI:
    app = FastAPI(
        title="Planetary Mesh",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        responses=_ERROR_RESPONSES,
    )
    app.state.service = service

    app.add_middleware(RequireIdentity, service=service)
    app.add_middleware(BodyLimit, limit=MAX_REQUEST_BYTES)
    # Outermost: a run it serves meets none of the layers within (it does their checks).
    app.add_middleware(QuickRun, service=service, limit=MAX_REQUEST_BYTES)

    @app.exception_handler(MeshError)
    async def mesh_error(_: Request, exc: MeshError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405's Allow, for one
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        return _error(422, f"invalid request: {problems}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/join")
    async def join_ca() -> dict[str, str]:
        """The CA certificate, for an agent to check against its token's pin before joining."""
        return {"ca": certs.cert_to_pem(service.ca_cert).decode()}

    @app.post("/v1/join")
    async def join(body: JoinRequest) -> JoinResponse:
        return service.join(body)

    @app.post("/v1/tokens")
    async def create_token(body: TokenCreate, _: Admin) -> NewToken:
        token, token_id = service.create_token(body.ttl, body.uses)
        return NewToken(token=token, id=token_id)

    @app.get("/v1/tokens")
    async def list_tokens(_: Admin) -> list[TokenInfo]:
        return service.tokens()

    @app.post("/v1/tokens/{token_id}/revoke")
    async def revoke_token(token_id: str, who: Admin) -> TokenInfo:
        return service.revoke_token(token_id)

    @app.post("/v1/jobs", status_code=201)
    async def submit(body: JobSubmit, who: User) -> JobInfo:
        job = service.submit(who.name, body)
        await _let_assignments_out()
        return views.job_info(job)

    @app.post("/v1/jobs/run", status_code=201)
    async def run(
        body: JobSubmit,
        who: User,
        timeout: Annotated[float, Query(ge=0, le=300)] = 30.0,
    ) -> JobInfo:
        """Submit a job and answer with it (counts only) once every task has ended, or as it is
        after ``timeout`` seconds: a submit and a wait in one request. With its own ``id`` in the
        body, the caller knows the job should the connection drop, and waits on with /wait.
        (Most calls are served by QuickRun, in front of the app, the same way.)"""
        job = service.submit(who.name, body)
        return await until_ended(service, job.id, timeout, job)

    @app.get("/v1/jobs")
    async def jobs(
        response: Response,
        _: User,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> list[JobInfo]:
        """Jobs, newest first; ``offset`` pages on, and X-Total-Count says how many there are."""
        page, total = service.store.job_page(offset, limit)
        response.headers["X-Total-Count"] = str(total)
        return [views.job_info(job) for job in page]

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str, _: User, tasks: bool = True) -> JobInfo:
        """One job; with ``tasks=false`` only its counts, cheap enough to poll."""
        found = service.job(job_id)
        if not tasks:
            return views.job_info(found)
        history = service.store.attempts_of_job(job_id)
        return views.job_info(found, service.store.tasks(job_id), history)

    @app.get("/v1/jobs/{job_id}/wait")
    async def wait(
        job_id: str,
        _: User,
        timeout: Annotated[float, Query(ge=0, le=300)] = 30.0,
    ) -> JobInfo:
        """The job (counts only) as soon as every task has ended, or as it is after
        ``timeout`` seconds: a long poll, so a client hears of the end at once."""
        return await until_ended(service, job_id, timeout)

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str, who: User) -> JobInfo:
        return views.job_info(service.cancel(job_id, who.name, who.admin))

    @app.post("/v1/jobs/{job_id}/tasks/cancel")
    async def cancel_tasks(job_id: str, body: TasksCancel, who: User) -> JobInfo:
        """Cancel some of a job's tasks: queued ones never run, running ones are killed."""
        service.cancel_tasks(job_id, body.indices, who.name, who.admin)
        return views.job_info(service.job(job_id))

    @app.post("/v1/functions", status_code=201)
    async def submit_function(body: FunctionSubmit, who: User) -> JobInfo:
        """A job of Python function calls (what MeshExecutor submits)."""
        job = service.submit_function(who.name, body)
        await _let_assignments_out()
        return views.job_info(job)

    @app.post("/v1/jobs/{job_id}/calls", status_code=201)
    async def add_calls(job_id: str, body: CallsAdd, who: User) -> CallsAdded:
        first, count = service.add_calls(job_id, body, who.name)
        await _let_assignments_out()
        return CallsAdded(first=first, count=count)

    @app.get("/v1/jobs/{job_id}/calls")
    async def call_updates(
        job_id: str,
        _: User,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        wait: Annotated[float, Query(ge=0, le=300)] = 0.0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> CallUpdates:
        """The job's tasks that started or ended since cursor ``after``, with the results of
        those that ended; a long poll of up to ``wait`` seconds while there are none."""
        seq = service.job_seq(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            seen = service.changes.version
            records = service.store.call_updates(seq, after, limit, CALL_UPDATE_BYTES)
            left = deadline - loop.time()
            if records or left <= 0:
                return CallUpdates(
                    cursor=records[-1].changed if records else after,
                    updates=[
                        CallUpdate(
                            index=r.index,
                            state=r.state.value,
                            end=r.end_kind,
                            exit_code=r.exit_code,
                            reason=r.reason,
                            result=None
                            if r.result is None
                            else base64.b64encode(r.result).decode(),
                        )
                        for r in records
                    ],
                )
            await service.changes.wait(seen, left)

    @app.get("/v1/jobs/{job_id}/tasks/{index}/logs")
    async def logs(
        job_id: str,
        index: TaskIndex,
        _: User,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
        attempt: Annotated[int | None, Query(ge=1, le=2**31)] = None,
        tail: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    ) -> LogChunk:
        """Output from byte ``offset`` on; with ``tail``, only about its last ``tail`` bytes."""
        return service.logs(job_id, index, offset, attempt, tail)

    @app.get("/v1/jobs/{job_id}/tasks/{index}/outputs")
    async def outputs(job_id: str, index: TaskIndex, _: User) -> list[OutputFile]:
        task_id, _attempt = service.task_id(job_id, index)
        return [
            OutputFile(name=name, data=base64.b64encode(data).decode())
            for name, data in service.store.outputs(task_id).items()
        ]

    @app.get("/v1/jobs/{job_id}/tasks/{index}/attempts")
    async def attempts(job_id: str, index: TaskIndex, _: User) -> list[AttemptInfo]:
        task_id, _attempt = service.task_id(job_id, index)
        return [views.attempt_info(a) for a in service.store.attempts(task_id)]

    @app.get("/v1/nodes")
    async def nodes(_: User) -> list[NodeInfo]:
        return views.nodes(service)

    @app.post("/v1/nodes/{node_id}/drain")
    async def drain(node_id: str, body: DrainRequest, who: Admin) -> NodeInfo:
        service.drain(node_id, body.deadline, who.name)
        return views.node(service, node_id)

    @app.post("/v1/nodes/{node_id}/undrain")
    async def undrain(node_id: str, who: Admin) -> NodeInfo:
        service.undrain(node_id, who.name)
        return views.node(service, node_id)

    @app.delete("/v1/nodes/{node_id}")
    async def remove_node(node_id: str, who: Admin) -> NodeRemoved:
        return NodeRemoved(id=node_id, requeued=service.remove_node(node_id, who.name))

    @app.post("/v1/users", status_code=201)
    async def add_user(body: UserCreate, who: Admin) -> UserCreated:
        pem = service.add_user(body.name, body.admin, body.csr, who.name)
        ca = certs.cert_to_pem(service.ca_cert).decode()
        return UserCreated(name=body.name, certificate=pem, ca=ca)

    @app.get("/v1/users")
    async def list_users(_: Admin) -> list[UserInfo]:
        return service.users()

    @app.delete("/v1/users/{name}")
    async def remove_user(name: str, who: Admin) -> dict[str, str]:
        service.remove_user(name, who.name)
        return {"removed": name}

    @app.get("/v1/jobs/{job_id}/tasks/{index}/why")
    async def why(job_id: str, index: TaskIndex, _: User) -> WhyInfo:
        task, explained, tail = service.why(job_id, index)
        attempts = service.store.attempts(task.id)
        return WhyInfo(
            job_id=job_id,
            index=index,
            state=task.state.value,
            summary=explained.summary,
            nodes=[
                NodeVerdict(node_id=n.node_id, name=n.name, fits_now=n.fits_now, reason=n.reason)
                for n in explained.nodes
            ],
            attempts=[views.attempt_info(a) for a in attempts],
            output_tail="\n".join(tail.decode(errors="replace").splitlines()[-10:]),
        )

    @app.get("/v1/events")
    async def events(
        _: User,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        job: Annotated[str | None, Query(max_length=64)] = None,
    ) -> list[EventInfo]:
        """Events after ``after`` (a seq), oldest first; only one job's with ``job``."""
        return [EventInfo(**asdict(e)) for e in service.store.events(after, limit, job_id=job)]

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(_: User) -> PlainTextResponse:
        """Prometheus text format; authenticated like everything else."""
        return PlainTextResponse(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    dashboard.add_routes(app, service)

    @app.post("/v1/agent/renew")
    async def renew(body: RenewRequest, who: Identity) -> RenewResponse:
        return RenewResponse(certificate=service.renew_node_cert(who, body.csr))

    @app.websocket("/v1/agent/session")
    async def agent_session(websocket: WebSocket) -> None:
        await _serve_agent(service, websocket)

    return app


async def _serve_agent(service: CoordinatorService, websocket: WebSocket) -> None:
    der = peer_cert_der(websocket.scope)
    try:
        if der is None:
            raise TrustError("an agent session needs the agent's client certificate")
        node_id = service.check_peer_is_node(certs.identity_of_der(der))
    except TrustError as exc:
        # Accepted first so that the agent reads the close code and reason: a close before the
        # accept reaches it only as a bare HTTP 403, which it would keep retrying.
        await websocket.accept()
        await websocket.close(code=4403, reason=str(exc)[:120])
        return
    await websocket.accept()
    try:
        hello = _agent_messages.validate_json(await websocket.receive_text())
    except (ValidationError, WebSocketDisconnect):
        await websocket.close(code=4400, reason="the first message must be a valid hello")
        return
    if not isinstance(hello, Hello):
        await websocket.close(code=4400, reason="the first message must be a hello")
        return
    session = service.agent_connected(node_id, hello)
    writer = asyncio.create_task(_pump(session.outbox, websocket))
    try:
        while True:
            message = _agent_messages.validate_json(await websocket.receive_text())
            if session.closed:
                break  # a newer session replaced this one, or the node was declared lost
            service.agent_heard(session, message.usage)
            if isinstance(message, Report):
                service.agent_report_soon(session, message)
            elif isinstance(message, Heartbeat):
                service.agent_heartbeat(session)
    except WebSocketDisconnect:
        pass
    except ValidationError as exc:
        log.warning("node %s sent an invalid message: %s", node_id, exc)
    finally:
        writer.cancel()
        service.agent_disconnected(session)
        with contextlib.suppress(RuntimeError):  # already closed
            await websocket.close()


async def _let_assignments_out() -> None:
    """Yield to the event loop once: the agents' sessions then send what this request has just
    placed before its own answer is built and sent (traced: the assignment waited ~0.5 ms for
    the submit's response)."""
    await asyncio.sleep(0)


async def _pump(outbox: asyncio.Queue[dict[str, Any] | None], websocket: WebSocket) -> None:
    """Send the session's outbox to the agent. Should a send fail, the session is closed: the
    agent's heartbeats would otherwise keep its node ready while nothing reaches it, its new
    work waiting for ever; closed, it reconnects and the two sides agree again."""
    try:
        while True:
            message = await outbox.get()
            if message is None:  # the service closed this session
                await websocket.close(code=4408, reason="session closed by the coordinator")
                return
            await websocket.send_text(json.dumps(message, separators=(",", ":")))
    except Exception as exc:  # the agent gone mid-send (common), or a message that cannot go
        log.warning("sending to an agent failed (%r); closing its session to reconnect", exc)
        with contextlib.suppress(Exception):  # the connection may be gone already
            await websocket.close(code=1011, reason="the coordinator could not send; reconnect")


class RequireIdentity:
    """Lets a request in with a client certificate, or on a browser session (its cookie, and
    for a request that changes something its CSRF header and origin); answers 401 or 403
    otherwise. A plain ASGI middleware: Starlette's BaseHTTPMiddleware cost every request a
    task group and a streamed copy of its response."""

    def __init__(self, app: Any, service: CoordinatorService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS or peer_cert_der(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> Response | None:
        """Why a request without a certificate is refused, or None (its session is set)."""
        session = self.service.browser.session(request.cookies.get(COOKIE))
        if session is None and request.url.path == "/":
            return dashboard.message_page(
                "Sign in to Planetary Mesh",
                "Run `mesh dashboard` on a machine with your mesh credentials and open the"
                " one-time link it prints.",
                401,
            )
        if session is None:
            return _error(
                401,
                "a client certificate is required: pass --config with a client.toml (in a"
                " browser, open the login link `mesh dashboard` prints)",
            )
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            if origin is not None and origin != dashboard.origin_of(request):
                return _error(403, f"refused: this request comes from another site ({origin})")
            if not session.csrf_matches(request.headers.get(CSRF_HEADER)):
                return _error(
                    403,
                    f"refused: a browser request that changes something needs the {CSRF_HEADER}"
                    " header of its session (the page's csrf-token)",
                )
        request.state.browser = session
        return None


class BodyLimit:
    """Refuse a request body over ``limit`` bytes, whether declared or streamed (chunked)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _error(413, message)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, limited, send)


class ErrorBody(BaseModel):
    error: str  # one sentence for people: what happened and what to do


# Every route may answer these; documented so that clients (and schemathesis) can rely on them.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "Bad request"),
        (401, "No client certificate (or browser session)"),
        (403, "Refused: not allowed, or a revoked certificate"),
        (404, "No such job, task, node, token or user"),
        (405, "Method not allowed"),
        (409, "Conflict: the name is taken"),
        (413, "Request body too large"),
        (422, "The request does not fit the schema"),
    )
}


_error = error
