"""QuickRun serves POST /v1/jobs/run as the app would, and hands the app every request it does
not serve, body and all. Real service, real SQLite, real certificates; ASGI calls in process
(the e2e tests in test_jobs.py run it behind the real server over mutual TLS)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from service_helpers import make_service

from planetary_mesh.coordinator.app import create_app
from planetary_mesh.coordinator.quick_run import PATH, QuickRun
from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.pki import certs
from planetary_mesh.protocol import MAX_REQUEST_BYTES

DAY = timedelta(days=1)
JOB = json.dumps({"argv": ["/bin/true"], "name": "quick"}).encode()


@dataclass
class Seen:
    """What reached the app behind QuickRun."""

    requests: list[tuple[str, bytes]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append((scope["query_string"].decode(), body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


@dataclass
class Setup:
    service: CoordinatorService
    alice: bytes  # DER of a user's certificate
    seen: Seen
    quick: QuickRun


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    service = make_service(tmp_path)
    cert, _ = certs.issue_user_cert(service.ca_cert, service.ca_key, "alice", DAY, admin=False)
    seen = Seen()
    return Setup(
        service,
        cert.public_bytes(serialization.Encoding.DER),
        seen,
        QuickRun(seen, service, MAX_REQUEST_BYTES),
    )


def call(
    app: Any,
    der: bytes | None,
    body: bytes = JOB,
    query: bytes = b"timeout=0",
    content_type: bytes = b"application/json",
    length: bytes | None = None,
    method: str = "POST",
    path: str = PATH,
) -> tuple[int, bytes]:
    """One request through ``app`` (ASGI, in process): its status and body."""
    headers = [
        (b"content-type", content_type),
        (b"content-length", length or str(len(body)).encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 443),
        "extensions": {"tls": {"client_cert_der": der}},
    }
    chunks = [body]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        await asyncio.sleep(3600)  # as a server: nothing more until the client goes
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:])


def test_a_users_run_is_served_as_the_app_serves_it(setup: Setup) -> None:
    status, body = call(setup.quick, setup.alice)
    assert status == 201 and setup.seen.requests == [] and setup.quick.served == 1
    answer = json.loads(body)
    job = setup.service.job(answer["id"])  # submitted, by the certificate's user
    assert (job.owner, job.spec.name, job.spec.argv) == ("alice", "quick", ("/bin/true",))
    assert answer["state"] == "pending" and answer["tasks"]["pending"] == 1  # no node to run it
    # Word for word what the app answers for that job on /wait.
    app = create_app(setup.service)
    path = f"/v1/jobs/{answer['id']}/wait"
    status, from_app = call(app, setup.alice, b"", method="GET", path=path, content_type=b"")
    assert status == 200 and json.loads(from_app) == answer


def test_the_service_refusing_a_run_is_answered_as_the_app_answers_it(setup: Setup) -> None:
    picked = json.dumps({"argv": ["true"], "id": "0123456789abcdef"}).encode()
    assert call(setup.quick, setup.alice, picked)[0] == 201
    status, body = call(setup.quick, setup.alice, picked)
    app_status, app_body = call(create_app(setup.service), setup.alice, picked)
    assert (status, json.loads(body)) == (app_status, json.loads(app_body))
    assert status == 409 and "exists already" in json.loads(body)["error"]
    assert setup.seen.requests == []


@pytest.mark.parametrize(
    ("why", "change"),
    [
        ("no certificate", {"der": None}),
        ("a body that is not JSON", {"body": b"{not json"}),
        ("a body the API refuses", {"body": b'{"argv": ["x"], "cpus": NaN}'}),
        ("an unknown field", {"body": b'{"argv": ["x"], "bogus": 1}'}),
        ("a timeout over 300 s", {"query": b"timeout=301"}),
        ("a timeout that is not a number", {"query": b"timeout=soon"}),
        ("another query", {"query": b"timeout=1&x=2"}),
        ("another content type", {"content_type": b"text/plain"}),
        ("a body over the limit", {"length": str(MAX_REQUEST_BYTES + 1).encode()}),
        ("another route", {"path": "/v1/jobs"}),
        ("another method", {"method": "GET"}),
    ],
)
def test_what_it_does_not_serve_reaches_the_app_whole(
    setup: Setup, why: str, change: dict[str, Any]
) -> None:
    args: dict[str, Any] = {"der": setup.alice, "body": JOB, "query": b"timeout=0", **change}
    der = args.pop("der")
    assert call(setup.quick, der, **args) == (299, b"app"), why
    assert setup.seen.requests == [(args["query"].decode(), args["body"])]
    assert setup.quick.served == 0 and setup.service.store.job_page(0, 10)[1] == 0


def test_an_agent_or_a_removed_user_is_left_to_the_app(setup: Setup, tmp_path: Path) -> None:
    key = certs.generate_key()
    csr = certs.make_csr(key, "node")
    node = certs.sign_node_csr(setup.service.ca_cert, setup.service.ca_key, csr, "n-1", DAY)
    assert call(setup.quick, node.public_bytes(serialization.Encoding.DER))[0] == 299
    bob, _ = certs.issue_user_cert(setup.service.ca_cert, setup.service.ca_key, "bob", DAY, False)
    setup.service.register_user(bob, "test")
    setup.service.remove_user("bob", "alice")
    assert call(setup.quick, bob.public_bytes(serialization.Encoding.DER))[0] == 299
    assert len(setup.seen.requests) == 2 and setup.quick.served == 0
