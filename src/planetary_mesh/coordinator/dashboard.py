"""The web dashboard: the browser's login, one HTML page with its script and style, the live
event stream, and the read-only endpoints its views need.

No build step and nothing from the internet: the page is plain HTML, one ES module and one
style sheet shipped in the package (dashboard_assets/), served on the coordinator's one HTTPS
port under a Content-Security-Policy that allows only this origin. Every figure comes from the
store (or, for a node's live CPU and memory use, from its last message), so the history a page
shows survives a coordinator restart. See docs/dashboard.md and ADR 10.
"""

from __future__ import annotations

import html
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse

from planetary_mesh.coordinator import views
from planetary_mesh.coordinator.browser import COOKIE, BrowserSession
from planetary_mesh.coordinator.deps import User
from planetary_mesh.coordinator.peer_cert import peer_cert_der
from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.core.states import TaskState
from planetary_mesh.errors import MeshError, RequestRejected, TrustError
from planetary_mesh.pki import certs
from planetary_mesh.protocol import (
    EventInfo,
    LoginLink,
    NodeAttemptInfo,
    NodeInfo,
    OverviewInfo,
    TaskInfo,
)

PRIVATE_PAGE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
# Only this origin's script, style and connections; no inline script, no framing.
_PAGE_HEADERS = {
    **PRIVATE_PAGE,
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_ASSETS = resources.files("planetary_mesh.coordinator") / "dashboard_assets"
STREAM_RECHECK_S = 2.0  # with no change, a stream still checks its credential this often
STREAM_KEEPALIVE_S = 15.0  # a comment line, so proxies and browsers keep an idle stream open


def _content(media_type: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {media_type: {}}, "description": "Successful Response"}}


_SSE = _content("text/event-stream")


def origin_of(request: Request) -> str:
    """This coordinator's origin as the client reached it: scheme, host and port."""
    return str(request.base_url).rstrip("/")


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def message_page(title: str, message: str, status: int) -> HTMLResponse:
    """A plain page that says what happened and what to do, for a person in a browser."""
    page = _asset("message.html").format(title=html.escape(title), message=html.escape(message))
    return HTMLResponse(page, status_code=status, headers=_PAGE_HEADERS)


def add_routes(app: FastAPI, service: CoordinatorService) -> None:
    """The dashboard's routes, on the app create_app builds (which checks who is asking)."""

    @app.post("/v1/dashboard/login")
    async def login_link(request: Request, who: User) -> LoginLink:
        if peer_cert_der(request.scope) is None:
            raise RequestRejected("login links are made with a client certificate", 403)
        secret, expires = service.browser.create_link(who)
        url = f"{origin_of(request)}/login?token={secret}"
        return LoginLink(url=url, expires_at=expires)

    @app.get(
        "/login",
        response_class=RedirectResponse,
        status_code=303,
        responses={
            303: {"description": "Signed in: a session cookie, and on to /"},
            403: {"content": {"text/html": {}}, "description": "A used or expired link"},
        },
    )
    async def login(token: Annotated[str, Query(max_length=256)] = "") -> Response:
        try:
            cookie, session = service.browser.redeem(token)
        except TrustError as exc:
            return message_page("This login link does not work", str(exc), 403)
        response = RedirectResponse("/", status_code=303, headers=PRIVATE_PAGE)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=int(session.expires_at - service.clock()),
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request, _: User) -> Response:
        service.browser.end(request.cookies.get(COOKIE))
        response = JSONResponse({"logged_out": True}, headers=PRIVATE_PAGE)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request, who: User) -> HTMLResponse:
        """The dashboard page; its views are drawn by /ui/app.js from the JSON API."""
        browser: BrowserSession | None = getattr(request.state, "browser", None)
        page = _asset("index.html").format(
            csrf=html.escape(browser.csrf if browser else ""),
            name=html.escape(who.name),
            role="admin" if who.admin else "user",
        )
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/ui/app.js", response_class=Response, responses=_content("text/javascript"))
    async def script(_: User) -> Response:
        return Response(_asset("app.js"), media_type="text/javascript", headers=_PAGE_HEADERS)

    @app.get("/ui/style.css", response_class=Response, responses=_content("text/css"))
    async def style(_: User) -> Response:
        return Response(_asset("style.css"), media_type="text/css", headers=_PAGE_HEADERS)

    @app.get("/v1/overview")
    async def overview(
        _: User,
        window: Annotated[float, Query(ge=60, le=86400)] = 900.0,
        bucket: Annotated[float, Query(ge=1, le=3600)] = 30.0,
        events: Annotated[int, Query(ge=0, le=200)] = 20,
    ) -> OverviewInfo:
        """Nodes and tasks by state, tasks ended per ``bucket`` seconds over the last
        ``window`` seconds, and the latest events: the dashboard's front page."""
        return views.overview(service, min(window, bucket * 600), bucket, events)

    @app.get("/v1/nodes/{node_id}")
    async def node(node_id: str, _: User) -> NodeInfo:
        return views.node(service, node_id)

    @app.get("/v1/nodes/{node_id}/attempts")
    async def node_attempts(
        node_id: str, _: User, limit: Annotated[int, Query(ge=1, le=1000)] = 50
    ) -> list[NodeAttemptInfo]:
        """What the node ran lately, newest first."""
        views.node(service, node_id)  # a clear 404 for an unknown node
        return [views.node_attempt_info(a) for a in service.store.node_attempts(node_id, limit)]

    @app.get("/v1/jobs/{job_id}/tasks")
    async def tasks(
        job_id: str,
        response: Response,
        _: User,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        state: TaskState | None = None,
    ) -> list[TaskInfo]:
        """A page of a job's tasks by index (only those in ``state`` when given); the
        X-Total-Count header says how many match."""
        service.job(job_id)
        page, total = service.store.task_page(job_id, offset, limit, state)
        response.headers["X-Total-Count"] = str(total)
        return [views.task_info(t, []) for t in page]

    @app.get("/v1/events/stream", response_class=StreamingResponse, responses=_SSE)
    async def event_stream(
        request: Request,
        who: User,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        job: Annotated[str | None, Query(max_length=64)] = None,
        last_event_id: Annotated[str | None, Header(max_length=24)] = None,
    ) -> StreamingResponse:
        """Server-sent events: every event after ``after`` (or the Last-Event-ID a
        reconnecting browser sends), then each new one as it is stored. Ends when the
        caller's credential stops being valid."""
        given = int(last_event_id) if last_event_id and last_event_id.isdigit() else after
        cursor = min(given, 2**62)  # past any real event, and within SQLite's integers
        cookie = request.cookies.get(COOKIE) if peer_cert_der(request.scope) is None else None
        stream = _events_after(service, who, cursor, job, cookie)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={**PRIVATE_PAGE, "X-Accel-Buffering": "no"},
        )


async def _events_after(
    service: CoordinatorService,
    who: certs.Identity,
    cursor: int,
    job: str | None,
    cookie: str | None,
) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    quiet_since = time.monotonic()
    while True:
        seen = service.changes.version  # before the look, so no change slips between
        try:  # a removed user, a logged-out or expired browser: the stream ends
            service.check_not_denied(who)
        except MeshError:
            return
        if cookie is not None and service.browser.session(cookie) is None:
            return
        found = service.store.events(cursor, 200, job_id=job)
        for event in found:
            cursor = event.seq
            data = EventInfo(**asdict(event)).model_dump_json()  # one line: no newlines in JSON
            yield f"id: {event.seq}\nevent: mesh\ndata: {data}\n\n"
        if found:
            quiet_since = time.monotonic()
            continue
        if time.monotonic() - quiet_since >= STREAM_KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": still here\n\n"
        await service.changes.wait(seen, STREAM_RECHECK_S)
