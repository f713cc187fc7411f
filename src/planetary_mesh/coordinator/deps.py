"""Who is asking: the identity behind a request, and the role checks routes depend on.

Identity comes only from the verified client certificate, or from a browser session the
middleware in app.py has already checked (cookie, CSRF header, origin).

The checks are ``async`` though they never wait: FastAPI runs a plain function dependency in
its thread pool, a hand-off to a worker thread and back for each, on every request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam

from planetary_mesh.coordinator.browser import BrowserSession
from planetary_mesh.coordinator.peer_cert import peer_cert_der
from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.errors import RequestRejected
from planetary_mesh.pki import certs
from planetary_mesh.protocol import MAX_ARRAY


async def identity(request: Request) -> certs.Identity:
    der = peer_cert_der(request.scope)
    if der is None:  # the middleware let it in on a browser session's cookie
        browser: BrowserSession = request.state.browser
        who = browser.user
    else:
        who = certs.identity_of_der(der)
    service: CoordinatorService = request.app.state.service
    service.check_not_denied(who)
    return who


async def user(who: Annotated[certs.Identity, Depends(identity)]) -> certs.Identity:
    if who.kind is not certs.PeerKind.USER:
        raise RequestRejected("this endpoint is for users; agents may not call it", 403)
    return who


async def admin(who: Annotated[certs.Identity, Depends(user)]) -> certs.Identity:
    if not who.admin:
        raise RequestRejected("only an admin may do this", 403)
    return who


Identity = Annotated[certs.Identity, Depends(identity)]
User = Annotated[certs.Identity, Depends(user)]
Admin = Annotated[certs.Identity, Depends(admin)]
TaskIndex = Annotated[int, PathParam(ge=0, lt=MAX_ARRAY)]
