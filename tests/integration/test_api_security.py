"""The coordinator's API against strangers, the wrong people and hostile input, over real mTLS.

Every test talks to a real `mesh coordinator` process on 127.0.0.1 (see conftest.py). Refusals
over TLS are checked by reading from the socket: under TLS 1.3 a refused client's handshake
"succeeds" and the refusal only arrives on the first read.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import websockets.sync.client
from cryptography import x509
from cryptography.x509.oid import NameOID
from websockets.exceptions import ConnectionClosed

from planetary_mesh.agent.join import join
from planetary_mesh.client import Client
from planetary_mesh.config import (
    AgentPaths,
    ClientConfig,
    CoordinatorPaths,
    load_client_config,
    write_client_config,
)
from planetary_mesh.errors import (
    CAMismatchError,
    CoordinatorUnreachable,
    NotFound,
    RequestRejected,
    TokenError,
)
from planetary_mesh.pki import certs, tls, tokens
from planetary_mesh.protocol import MAX_ARRAY, MAX_REQUEST_BYTES, JobSubmit

JSON = {"content-type": "application/json"}


class Coordinator(Protocol):
    """What the ``coordinator`` and ``fresh_coordinator`` fixtures (conftest.py) give."""

    @property
    def url(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def paths(self) -> CoordinatorPaths: ...
    @property
    def client_config(self) -> Path: ...


class ForeignCA(Protocol):
    """What the ``foreign_ca`` fixture (conftest.py) gives: another mesh's CA and a user of it."""

    @property
    def ca_pem(self) -> Path: ...
    @property
    def ca_hash(self) -> str: ...
    @property
    def user_cert(self) -> Path: ...
    @property
    def user_key(self) -> Path: ...


MeshCli = Callable[..., subprocess.CompletedProcess[str]]


# -- helpers --------------------------------------------------------------------------------------


def mesh_ca_hash(coordinator: Coordinator) -> str:
    return certs.ca_fingerprint(certs.load_cert_pem(coordinator.paths.ca_cert.read_bytes()))


def ssl_context(
    coordinator: Coordinator, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Trusts the mesh's CA; presents ``cert`` as the client certificate when given."""
    return tls.client_ssl_context(coordinator.paths.ca_cert.read_bytes(), cert, key)


def http_client(
    coordinator: Coordinator, cert: Path | None = None, key: Path | None = None
) -> httpx.Client:
    """A plain HTTPS client for raw requests; no client certificate unless given."""
    context = ssl_context(coordinator, cert, key)
    return httpx.Client(base_url=coordinator.url, verify=context, timeout=10)


def admin_http(coordinator: Coordinator) -> httpx.Client:
    return http_client(coordinator, coordinator.paths.admin_cert, coordinator.paths.admin_key)


def admin_client(coordinator: Coordinator) -> Client:
    """The client library with the client.toml `mesh init` wrote: the mesh's admin."""
    return Client(load_client_config(coordinator.client_config))


def user_config(coordinator: Coordinator, name: str, *, admin: bool, directory: Path) -> Path:
    """Issue a user certificate from the mesh's CA and write a client.toml for it."""
    paths = coordinator.paths
    ca_cert = certs.load_cert_pem(paths.ca_cert.read_bytes())
    ca_key = certs.load_key_pem(paths.ca_key.read_bytes())
    cert, key = certs.issue_user_cert(ca_cert, ca_key, name, timedelta(days=1), admin=admin)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    certs.write_public_file(cert_path, certs.cert_to_pem(cert))
    certs.write_private_file(key_path, certs.key_to_pem(key))
    config = directory / f"{name}.toml"
    write_client_config(config, coordinator.url, paths.ca_cert, cert_path, key_path)
    return config


def error_message(response: httpx.Response, status: int) -> str:
    """Assert ``response`` is exactly ``{"error": "<message>"}`` with ``status``; the message."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message.strip(), body
    return message


def job_ids(coordinator: Coordinator) -> list[str]:
    with admin_client(coordinator) as admin:
        return sorted(job.id for job in admin.jobs(limit=1000))


def node_ids(coordinator: Coordinator) -> list[str]:
    with admin_client(coordinator) as admin:
        return sorted(node.id for node in admin.nodes())


def new_token(coordinator: Coordinator, ttl: float = 600.0, uses: int | None = 1) -> str:
    with admin_client(coordinator) as admin:
        return admin.create_token(ttl=ttl, uses=uses)


def foreign_token(foreign_ca: ForeignCA) -> str:
    """A well-formed token of another mesh."""
    return str(tokens.new_join_token(foreign_ca.ca_hash))


def with_ca_hash(token: str, ca_hash: str) -> str:
    parsed = tokens.parse_join_token(token)
    return str(tokens.JoinToken(ca_hash=ca_hash, secret=parsed.secret))


def client_with(coordinator: Coordinator, ca: Path, cert: Path, key: Path) -> Client:
    return Client(ClientConfig(coordinator.url, ca, cert, key, source=Path("test")))


def node_client(coordinator: Coordinator, agent: AgentPaths) -> Client:
    return client_with(coordinator, agent.ca_cert, agent.cert, agent.key)


def raw_exchange(
    coordinator: Coordinator, context: ssl.SSLContext, head: bytes, body: Iterable[bytes] = ()
) -> bytes:
    """Send one request on a fresh TLS connection and read until the server closes it.

    A connection cut without TLS's close_notify raises ``ssl.SSLEOFError`` instead of looking
    like an empty answer: that is how the coordinator refuses a certificate under TLS 1.3.
    """
    with (
        socket.create_connection((coordinator.host, coordinator.port), timeout=10) as sock,
        context.wrap_socket(
            sock, server_hostname=coordinator.host, suppress_ragged_eofs=False
        ) as conn,
    ):
        conn.sendall(head)
        for chunk in body:
            conn.sendall(chunk)
        received = []
        while data := conn.recv(65536):
            received.append(data)
        return b"".join(received)


def parse_response(raw: bytes) -> tuple[int, Any]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP response: {raw[:200]!r}"
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


def request_head(coordinator: Coordinator, method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {coordinator.host}:{coordinator.port}"]
    lines += [*headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


def wait_past(instant: float) -> None:
    """Return once the wall clock (which the coordinator shares) is past ``instant``."""
    deadline = time.monotonic() + 5
    while time.time() <= instant:
        assert time.monotonic() < deadline, "the clock did not move"
        time.sleep(0.001)


def assert_cli_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A CLI failure as people should see it: non-zero, one `error: ...` line, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert result.stderr.startswith("error: "), output
    flat = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in {flat!r}"
    assert len(result.stderr.strip().splitlines()) == 1, f"not one line: {result.stderr!r}"


@pytest.fixture(scope="module")
def existing_job(coordinator: Coordinator) -> str:
    """A job submitted by the admin; with no agents it stays pending."""
    with admin_client(coordinator) as admin:
        return admin.submit(JobSubmit(name="existing", argv=["true"])).id


@pytest.fixture
def agent_paths(tmp_path: Path) -> AgentPaths:
    """Where a test's agent would keep its files; nothing is there yet."""
    return AgentPaths(tmp_path / "agent")


@pytest.fixture(scope="module")
def joined_agent(coordinator: Coordinator, tmp_path_factory: pytest.TempPathFactory) -> AgentPaths:
    """An agent that joined the shared coordinator: its node certificate and key."""
    paths = AgentPaths(tmp_path_factory.mktemp("joined-agent"))
    join(coordinator.url, new_token(coordinator), "worker", paths)
    return paths


# -- no client certificate ------------------------------------------------------------------------


def test_healthz_answers_without_a_client_certificate(coordinator: Coordinator) -> None:
    with http_client(coordinator) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_mesh_coordinator_writes_its_real_address_into_client_toml(
    coordinator: Coordinator,
) -> None:
    assert load_client_config(coordinator.client_config).coordinator == coordinator.url


ROUTES = [
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/nodes", None),
    ("POST", "/v1/jobs", {"argv": ["true"], "name": "sneaky"}),
    ("POST", "/v1/tokens", {"ttl": 60, "uses": 1}),
    ("GET", "/v1/jobs/{job}", None),
    ("POST", "/v1/jobs/{job}/cancel", None),
    ("GET", "/v1/jobs/{job}/tasks/0/logs", None),
    ("GET", "/v1/jobs/{job}/tasks/0/outputs", None),
    ("GET", "/v1/jobs/{job}/tasks/0/attempts", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_other_route_needs_a_client_certificate(
    coordinator: Coordinator,
    existing_job: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    before = job_ids(coordinator)
    with http_client(coordinator) as http:
        response = http.request(method, path.format(job=existing_job), json=body)
    assert "client certificate" in error_message(response, 401)
    assert existing_job not in response.text
    assert tokens.TOKEN_PREFIX not in response.text
    assert job_ids(coordinator) == before
    with admin_client(coordinator) as admin:
        assert admin.job(existing_job).state == "pending"  # not cancelled


# -- another mesh's certificate -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/v1/join", "/v1/jobs"])
def test_a_certificate_from_another_ca_gets_nothing_at_all(
    coordinator: Coordinator, foreign_ca: ForeignCA, path: str
) -> None:
    with (
        http_client(coordinator, foreign_ca.user_cert, foreign_ca.user_key) as http,
        pytest.raises(httpx.TransportError),
    ):
        http.get(path)
    with http_client(coordinator) as http:  # and the coordinator is none the worse for it
        assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_foreign_certificate_is_refused_at_the_tls_layer(
    coordinator: Coordinator, foreign_ca: ForeignCA, version: ssl.TLSVersion
) -> None:
    context = ssl_context(coordinator, foreign_ca.user_cert, foreign_ca.user_key)
    context.minimum_version = context.maximum_version = version
    head = request_head(coordinator, "GET", "/healthz")
    # TLS 1.2 fails in the handshake; TLS 1.3 on the first read. Either way: no byte of HTTP.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        raw_exchange(coordinator, context, head)


def test_the_client_library_explains_a_refused_certificate(
    coordinator: Coordinator, foreign_ca: ForeignCA
) -> None:
    client = client_with(
        coordinator, coordinator.paths.ca_cert, foreign_ca.user_cert, foreign_ca.user_key
    )
    with client, pytest.raises(CoordinatorUnreachable, match="trusts this client's certificate"):
        client.jobs()


# -- roles ----------------------------------------------------------------------------------------


def test_the_admin_lists_jobs_and_nodes_and_creates_tokens(
    coordinator: Coordinator, existing_job: str
) -> None:
    with admin_client(coordinator) as admin:
        assert existing_job in {job.id for job in admin.jobs()}
        assert isinstance(admin.nodes(), list)
        token = admin.create_token(ttl=60, uses=1)
    assert tokens.parse_join_token(token).ca_hash == mesh_ca_hash(coordinator)


def test_a_user_who_is_not_admin_submits_jobs_but_makes_no_tokens(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    config = user_config(coordinator, "alice", admin=False, directory=tmp_path)
    with Client(load_client_config(config)) as alice:
        job = alice.submit(JobSubmit(name="alices", argv=["true"]))
        assert job.owner == "alice"
        assert job.id in {j.id for j in alice.jobs()}
        with pytest.raises(RequestRejected, match="only an admin") as refused:
            alice.create_token(ttl=60)
        assert refused.value.status == 403
    cfg = load_client_config(config)
    with http_client(coordinator, cfg.cert, cfg.key) as http:
        response = http.post("/v1/tokens", json={"ttl": 60})
    error_message(response, 403)
    assert tokens.TOKEN_PREFIX not in response.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/jobs", None),
        ("GET", "/v1/nodes", None),
        ("GET", "/v1/jobs/{job}", None),
        ("POST", "/v1/jobs", {"argv": ["true"]}),
        ("POST", "/v1/tokens", {"ttl": 60}),
        ("POST", "/v1/jobs/{job}/cancel", None),
    ],
)
def test_an_agent_certificate_is_refused_on_user_endpoints(
    coordinator: Coordinator,
    existing_job: str,
    joined_agent: AgentPaths,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    before = job_ids(coordinator)
    with http_client(coordinator, joined_agent.cert, joined_agent.key) as http:
        response = http.request(method, path.format(job=existing_job), json=body)
    assert "agents may not call it" in error_message(response, 403)
    assert existing_job not in response.text
    assert job_ids(coordinator) == before
    with admin_client(coordinator) as admin:
        assert admin.job(existing_job).state == "pending"


def test_the_client_library_reports_an_agent_refused_as_a_user(
    coordinator: Coordinator, joined_agent: AgentPaths
) -> None:
    with node_client(coordinator, joined_agent) as client:
        with pytest.raises(RequestRejected, match="agents may not call it") as refused:
            client.jobs()
        assert refused.value.status == 403


# -- joining --------------------------------------------------------------------------------------


def test_a_join_leaves_a_private_key_and_a_certificate_for_the_chosen_node_id(
    coordinator: Coordinator, agent_paths: AgentPaths
) -> None:
    node_id = join(coordinator.url, new_token(coordinator), "my-laptop", agent_paths)
    assert node_id.startswith("n-")
    for path in (agent_paths.cert, agent_paths.key, agent_paths.ca_cert, agent_paths.state):
        assert path.is_file(), path
    assert stat.S_IMODE(agent_paths.key.stat().st_mode) == 0o600
    assert agent_paths.ca_cert.read_bytes() == coordinator.paths.ca_cert.read_bytes()
    cert = x509.load_pem_x509_certificate(agent_paths.cert.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == node_id != "my-laptop"
    identity = certs.identity_of(cert)
    assert identity.kind is certs.PeerKind.NODE and not identity.admin
    with admin_client(coordinator) as admin:
        joined = {node.id: node.name for node in admin.nodes()}
    assert joined[node_id] == "my-laptop"


def test_a_single_use_token_works_once(
    coordinator: Coordinator, agent_paths: AgentPaths, tmp_path: Path
) -> None:
    token = new_token(coordinator, uses=1)
    first = join(coordinator.url, token, "first", agent_paths)
    before = node_ids(coordinator)
    assert first in before
    with pytest.raises(TokenError, match="used up"):
        join(coordinator.url, token, "replay", AgentPaths(tmp_path / "replay"))
    assert node_ids(coordinator) == before
    assert not (tmp_path / "replay").exists()


def test_an_expired_token_is_refused(coordinator: Coordinator, agent_paths: AgentPaths) -> None:
    token = new_token(coordinator, ttl=0.001)
    wait_past(time.time() + 0.001)  # the coordinator set the expiry before it answered
    before = node_ids(coordinator)
    with pytest.raises(TokenError, match="expired"):
        join(coordinator.url, token, "late", agent_paths)
    assert node_ids(coordinator) == before
    assert not agent_paths.root.exists()


def test_a_token_of_another_mesh_is_refused_before_any_csr_is_sent(
    fresh_coordinator: Coordinator, foreign_ca: ForeignCA, agent_paths: AgentPaths
) -> None:
    # The secret is real: had a CSR been sent, the coordinator would have refused it with a
    # TokenError (the hash does not match), and the token would not work below.
    genuine = new_token(fresh_coordinator)
    tampered = with_ca_hash(genuine, foreign_ca.ca_hash)
    with pytest.raises(CAMismatchError, match="CA"):
        join(fresh_coordinator.url, tampered, "misled", agent_paths)
    assert node_ids(fresh_coordinator) == []
    assert not agent_paths.root.exists()
    with pytest.raises(CAMismatchError, match="token pins"):
        join(fresh_coordinator.url, foreign_token(foreign_ca), "misled", agent_paths)
    assert node_ids(fresh_coordinator) == []
    # The genuine token was never spent.
    node_id = join(fresh_coordinator.url, genuine, "honest", agent_paths)
    assert node_ids(fresh_coordinator) == [node_id]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("hello", "not a Planetary Mesh join token"),
        ("PMTKN-9-abc-def", "different version"),
        ("PMTKN-1-" + "a" * 64, "cut short"),
        ("PMTKN-1-" + "a" * 10 + "-" + "b" * 32, "CA hash"),
        ("PMTKN-1-" + "a" * 64 + "-short", "secret"),
    ],
)
def test_a_malformed_token_is_explained(
    coordinator: Coordinator, agent_paths: AgentPaths, text: str, says: str
) -> None:
    with pytest.raises(TokenError, match=says) as refused:
        join(coordinator.url, text, "typo", agent_paths)
    assert "mesh token create" in str(refused.value)
    assert not agent_paths.root.exists()


def test_a_token_the_coordinator_never_made_is_refused(
    coordinator: Coordinator, agent_paths: AgentPaths
) -> None:
    made_up = str(tokens.new_join_token(mesh_ca_hash(coordinator)))
    with pytest.raises(TokenError, match="not known"):
        join(coordinator.url, made_up, "guesser", agent_paths)


def test_a_token_with_two_uses_lets_exactly_two_agents_join(
    fresh_coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    created = mesh_cli(
        "token",
        "create",
        "--uses",
        "2",
        "--ttl",
        "10m",
        "--config",
        str(fresh_coordinator.client_config),
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    first = join(fresh_coordinator.url, token, "one", AgentPaths(tmp_path / "one"))
    second = join(fresh_coordinator.url, token, "two", AgentPaths(tmp_path / "two"))
    assert first != second
    with pytest.raises(TokenError, match="used up"):
        join(fresh_coordinator.url, token, "three", AgentPaths(tmp_path / "three"))
    assert node_ids(fresh_coordinator) == sorted([first, second])


def test_tokens_are_listed_by_state_and_a_revoked_one_is_refused(
    fresh_coordinator: Coordinator, mesh_cli: MeshCli, agent_paths: AgentPaths, tmp_path: Path
) -> None:
    config = ("--config", str(fresh_coordinator.client_config))
    made = mesh_cli("token", "create", "--ttl", "10m", *config)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    token_id = made.stderr.split("token id ")[1].split()[0]
    with admin_client(fresh_coordinator) as admin:
        used = admin.new_token(ttl=600, uses=1)
        unlimited = admin.new_token(ttl=600, uses=None)
        expired = admin.new_token(ttl=0.001, uses=1)
    join(fresh_coordinator.url, used.token, "used", AgentPaths(tmp_path / "used"))
    wait_past(time.time() + 0.001)

    revoked = mesh_cli("token", "revoke", token_id, *config)
    assert revoked.returncode == 0, revoked.stderr
    assert f"token {token_id} revoked" in revoked.stdout
    before = node_ids(fresh_coordinator)
    with pytest.raises(TokenError, match="revoked"):
        join(fresh_coordinator.url, token, "too-late", agent_paths)
    assert node_ids(fresh_coordinator) == before

    listed = mesh_cli("token", "list", "-o", "json", *config)
    assert listed.returncode == 0, listed.stderr
    states = {t["id"]: (t["state"], t["uses_left"]) for t in json.loads(listed.stdout)}
    assert states == {
        token_id: ("revoked", 1),
        used.id: ("used up", 0),
        unlimited.id: ("active", None),
        expired.id: ("expired", 1),
    }
    for secret in (token, used.token, unlimited.token, expired.token):  # never shown again
        assert tokens.parse_join_token(secret).secret not in listed.stdout
    table = mesh_cli("token", "list", *config)
    assert table.returncode == 0 and "unlimited" in table.stdout and "revoked" in table.stdout


def test_only_an_admin_lists_or_revokes_tokens_and_an_unknown_one_is_explained(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    with admin_client(coordinator) as admin:
        made = admin.new_token(ttl=600)
        with pytest.raises(NotFound, match="no join token 'nope'"):
            admin.revoke_token("nope")
    config = user_config(coordinator, "mallory", admin=False, directory=tmp_path)
    with Client(load_client_config(config)) as mallory:
        for call in (mallory.tokens, lambda: mallory.revoke_token(made.id)):
            with pytest.raises(RequestRejected, match="only an admin") as refused:
                call()
            assert refused.value.status == 403
    with admin_client(coordinator) as admin:
        [listed] = [t for t in admin.tokens() if t.id == made.id]
    assert listed.state == "active"


def test_only_an_admin_removes_a_node_and_an_unknown_one_is_explained(
    coordinator: Coordinator, agent_paths: AgentPaths, tmp_path: Path
) -> None:
    node_id = join(coordinator.url, new_token(coordinator), "keeper", agent_paths)
    config = user_config(coordinator, "mallory2", admin=False, directory=tmp_path)
    with Client(load_client_config(config)) as mallory:
        with pytest.raises(RequestRejected, match="only an admin") as refused:
            mallory.remove_node(node_id)
        assert refused.value.status == 403
    assert node_id in node_ids(coordinator)
    with admin_client(coordinator) as admin, pytest.raises(NotFound, match="no node 'n-nope'"):
        admin.remove_node("n-nope")


def test_a_user_certificate_cannot_use_the_agent_endpoints(coordinator: Coordinator) -> None:
    paths = coordinator.paths
    context = ssl_context(coordinator, paths.admin_cert, paths.admin_key)
    url = coordinator.url.replace("https://", "wss://") + "/v1/agent/session"
    with (
        websockets.sync.client.connect(url, ssl=context, open_timeout=10) as session,
        pytest.raises(ConnectionClosed) as closed,
    ):
        session.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    assert "only agent certificates" in closed.value.rcvd.reason
    csr = certs.make_csr(certs.generate_key(), "sneaky").decode()
    with admin_http(coordinator) as http:
        renewal = http.post("/v1/agent/renew", json={"csr": csr})
    assert "only agent certificates" in error_message(renewal, 403)


def test_the_agent_session_is_not_compressed(coordinator: Coordinator) -> None:
    # Offered permessage-deflate (websockets offers it unless told not to), the coordinator
    # declines: on a LAN it cost more CPU than the bytes it saved.
    paths = coordinator.paths
    context = ssl_context(coordinator, paths.admin_cert, paths.admin_key)
    url = coordinator.url.replace("https://", "wss://") + "/v1/agent/session"
    with websockets.sync.client.connect(url, ssl=context, open_timeout=10) as session:
        offered = (
            session.request.headers.get("Sec-WebSocket-Extensions") if session.request else None
        )
        assert offered is not None and "permessage-deflate" in offered
        assert session.response is not None
        assert "Sec-WebSocket-Extensions" not in session.response.headers


def test_the_coordinators_server_certificate_is_refused_as_a_client(
    coordinator: Coordinator,
) -> None:
    # Server-only (EKU serverAuth): presented as a client certificate it gets no answer from the
    # API, whether the TLS layer or the app refuses it.
    paths = coordinator.paths
    try:
        with http_client(coordinator, paths.server_cert, paths.server_key) as http:
            response = http.get("/v1/jobs")
    except httpx.TransportError:
        return  # refused in the handshake
    error_message(response, 403)


def test_a_refused_csr_does_not_use_up_the_token(
    coordinator: Coordinator, agent_paths: AgentPaths
) -> None:
    token = new_token(coordinator, uses=1)
    with http_client(coordinator) as http:
        response = http.post("/v1/join", json={"token": token, "csr": "garbage", "name": "x"})
    assert "certificate request" in error_message(response, 403)
    join(coordinator.url, token, "second-try", agent_paths)


# -- hostile input --------------------------------------------------------------------------------

HOSTILE_JOBS = {
    "extra field": '{"argv": ["x"], "bogus": 1}',
    "NaN cpus": '{"argv": ["x"], "cpus": NaN}',
    "infinite cpus": '{"argv": ["x"], "cpus": Infinity}',
    "overflowing timeout": '{"argv": ["x"], "timeout": 1e999}',
    "negative infinite timeout": '{"argv": ["x"], "timeout": -Infinity}',
    "cpus as a string": '{"argv": ["x"], "cpus": "1"}',
    "count as a bool": '{"argv": ["x"], "count": true}',
    "file name with a slash": '{"argv": ["x"], "files": {"a/b": ""}}',
    "file name ..": '{"argv": ["x"], "files": {"..": ""}}',
    "file name .": '{"argv": ["x"], "files": {".": ""}}',
    "file path escaping": '{"argv": ["x"], "files": {"../etc/passwd": ""}}',
    "file not base64": '{"argv": ["x"], "files": {"a": "!!not base64!!"}}',
    "env name MESH_": '{"argv": ["x"], "env": {"MESH_TASK_INDEX": "7"}}',
    "env name bad": '{"argv": ["x"], "env": {"A-B": "1"}}',
    "count 0": '{"argv": ["x"], "count": 0}',
    "count over the limit": f'{{"argv": ["x"], "count": {MAX_ARRAY + 1}}}',
    "empty argv": '{"argv": []}',
    "absolute output": '{"argv": ["x"], "outputs": ["/etc/passwd"]}',
    "escaping output": '{"argv": ["x"], "outputs": ["../x"]}',
    "memory beyond bounds": '{"argv": ["x"], "memory": 100000000000000000000000}',
    "not an object": '["x"]',
    "not JSON": '{"argv": ["x"',
}


@pytest.mark.parametrize("body", HOSTILE_JOBS.values(), ids=HOSTILE_JOBS.keys())
def test_hostile_job_submissions_get_a_422_and_store_nothing(
    coordinator: Coordinator, body: str
) -> None:
    before = job_ids(coordinator)
    with admin_http(coordinator) as http:
        response = http.post("/v1/jobs", content=body, headers=JSON)
    assert error_message(response, 422)
    assert job_ids(coordinator) == before


def test_a_declared_body_over_the_limit_gets_a_413_before_it_is_sent(
    coordinator: Coordinator,
) -> None:
    before = job_ids(coordinator)
    head = request_head(
        coordinator,
        "POST",
        "/v1/jobs",
        "Content-Type: application/json",
        f"Content-Length: {MAX_REQUEST_BYTES + 1}",
    )
    context = ssl_context(coordinator, coordinator.paths.admin_cert, coordinator.paths.admin_key)
    status, body = parse_response(raw_exchange(coordinator, context, head))
    assert status == 413
    assert set(body) == {"error"} and str(MAX_REQUEST_BYTES) in body["error"]
    assert job_ids(coordinator) == before


def _chunked(parts: Iterable[bytes]) -> Iterable[bytes]:
    for part in parts:
        yield b"%x\r\n%s\r\n" % (len(part), part)
    yield b"0\r\n\r\n"


def test_a_streamed_body_over_the_limit_is_not_read_to_the_end(coordinator: Coordinator) -> None:
    """Without Content-Length (chunked), the limit must still hold."""
    before = job_ids(coordinator)
    head = request_head(
        coordinator,
        "POST",
        "/v1/jobs",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
    )
    mib = b"a" * (1 << 20)
    parts = [b'{"argv": ["', *[mib] * (MAX_REQUEST_BYTES // len(mib) + 1), b'"]}']
    context = ssl_context(coordinator, coordinator.paths.admin_cert, coordinator.paths.admin_key)
    try:
        raw = raw_exchange(coordinator, context, head, _chunked(parts))
    except (ConnectionError, ssl.SSLError):
        pass  # cut off while sending: the limit held
    else:
        status, body = parse_response(raw)
        assert status == 413, f"{status}: the whole over-limit body was read: {body}"
    assert job_ids(coordinator) == before


def test_an_unknown_job_is_a_404_with_a_message(coordinator: Coordinator) -> None:
    with admin_http(coordinator) as http:
        for method, path in [
            ("GET", "/v1/jobs/nope"),
            ("POST", "/v1/jobs/nope/cancel"),
            ("GET", "/v1/jobs/nope/tasks/0/logs"),
        ]:
            assert "no job 'nope'" in error_message(http.request(method, path), 404)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/{job}/tasks/99999999999999999999/logs",
        "/v1/jobs/{job}/tasks/99999999999999999999/outputs",
        "/v1/jobs/{job}/tasks/99999999999999999999/attempts",
        "/v1/jobs/{job}/tasks/0/logs?offset=99999999999999999999",
        "/v1/jobs/{job}/tasks/0/logs?attempt=99999999999999999999",
    ],
)
def test_huge_numbers_in_the_url_are_a_4xx_not_a_500(
    coordinator: Coordinator, existing_job: str, path: str
) -> None:
    with admin_http(coordinator) as http:
        response = http.get(path.format(job=existing_job))
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text}"
    error_message(response, response.status_code)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/jobs", "[" * 100_000 + "]" * 100_000),
        ("GET", "/v1/no-such-route", None),
        ("PUT", "/v1/jobs", None),
    ],
    ids=["deeply nested JSON", "unknown route", "wrong method"],
)
def test_every_refusal_is_a_json_error(
    coordinator: Coordinator, method: str, path: str, body: str | None
) -> None:
    before = job_ids(coordinator)
    with admin_http(coordinator) as http:
        response = http.request(method, path, content=body, headers=JSON)
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text}"
    error_message(response, response.status_code)
    assert job_ids(coordinator) == before


# -- the CLI's error paths ------------------------------------------------------------------------


def test_cli_status_of_an_unknown_job(coordinator: Coordinator, mesh_cli: MeshCli) -> None:
    result = mesh_cli("status", "nope", "--config", str(coordinator.client_config))
    assert_cli_error(result, "no job 'nope'")


def test_cli_coordinator_unreachable(
    coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a port on 127.0.0.1 that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = tmp_path / "client.toml"
    paths = coordinator.paths
    write_client_config(
        config, f"https://127.0.0.1:{closed_port}", paths.ca_cert, paths.admin_cert, paths.admin_key
    )
    assert_cli_error(mesh_cli("jobs", "--config", str(config)), "cannot reach the coordinator")


def test_cli_agent_with_a_token_of_another_mesh(
    coordinator: Coordinator, foreign_ca: ForeignCA, mesh_cli: MeshCli, agent_paths: AgentPaths
) -> None:
    before = node_ids(coordinator)
    result = mesh_cli(
        "agent",
        "--coordinator",
        coordinator.url,
        "--token",
        foreign_token(foreign_ca),
        "--data-dir",
        str(agent_paths.root),
        "--name",
        "misled",
        "--no-sandbox",
    )
    assert_cli_error(result, "CA", "token pins")
    assert node_ids(coordinator) == before
    assert not agent_paths.cert.exists()


def test_cli_agent_with_a_malformed_token(
    coordinator: Coordinator, mesh_cli: MeshCli, agent_paths: AgentPaths
) -> None:
    result = mesh_cli(
        "agent",
        "--coordinator",
        coordinator.url,
        "--token",
        "not-a-token",
        "--data-dir",
        str(agent_paths.root),
        "--no-sandbox",
    )
    assert_cli_error(result, "not a Planetary Mesh join token")


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--timeout", "5x"], "bad duration '5x'"), (["--memory", "12Q"], "bad size '12Q'")],
)
def test_cli_run_with_a_bad_value(
    mesh_cli: MeshCli, tmp_path: Path, flags: list[str], says: str
) -> None:
    # No usable config: had the value been accepted, it would fail on the config, not hang.
    missing = tmp_path / "missing.toml"
    result = mesh_cli("run", *flags, "--config", str(missing), "--", "true")
    assert_cli_error(result, says)
