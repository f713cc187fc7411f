"""The client library: the one way the CLI (and Python users) talk to a coordinator.

It speaks the public REST API over mutual TLS and turns every failure into a
:class:`~planetary_mesh.errors.MeshError` with a message a person can act on.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import secrets
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from planetary_mesh.config import FIND_BY_MDNS, ClientConfig, load_client_config
from planetary_mesh.discovery import describe_others, find_coordinator
from planetary_mesh.errors import (
    ClientError,
    CoordinatorUnreachable,
    NotFound,
    RequestRejected,
    TrustError,
)
from planetary_mesh.pki import certs, tls
from planetary_mesh.protocol import (
    AttemptInfo,
    CallsAdded,
    CallUpdates,
    EventInfo,
    FunctionSubmit,
    JobInfo,
    JobSubmit,
    LogChunk,
    LoginLink,
    NewToken,
    NodeInfo,
    NodeRemoved,
    OutputFile,
    TokenInfo,
    UserCreated,
    UserInfo,
    WhyInfo,
)

_ENDED = ("succeeded", "failed", "cancelled")
_NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
M = TypeVar("M", bound=BaseModel)


class Client:
    def __init__(self, config: ClientConfig, timeout: float = 30.0) -> None:
        self.config = config
        try:
            context = tls.client_ssl_context(config.ca.read_bytes(), config.cert, config.key)
        except OSError as exc:
            raise TrustError(
                f"cannot read the credentials named in {config.source}: {exc}"
            ) from exc
        # TCP_NODELAY: a request's headers and body leave at once, not 40 ms apart (Nagle's
        # algorithm waiting on the server's delayed ACK), which would put 40 ms on every call.
        transport = httpx.HTTPTransport(verify=context, socket_options=_NO_DELAY)
        base, self._extensions = config.coordinator, {}
        if base == FIND_BY_MDNS:
            base = self._find(config)
            # Found, not configured: the certificate is checked for the coordinator's fixed
            # name, not this address (ADR 13); the CA pin is the proof, as always.
            self._extensions = {"sni_hostname": certs.COORDINATOR_NAME}
        self.base_url = base
        self._urls: dict[tuple[str, str], httpx.URL] = {}  # see _url
        self._http = httpx.Client(
            base_url=base, verify=context, timeout=timeout, transport=transport
        )

    @staticmethod
    def _find(config: ClientConfig) -> str:
        """The URL of the coordinator of ``config``'s mesh (its CA), found over mDNS."""
        try:
            ca_hash = certs.ca_fingerprint(certs.load_cert_pem(config.ca.read_bytes()))
        except OSError as exc:
            raise TrustError(f"cannot read the CA named in {config.source}: {exc}") from exc
        # In a thread: a caller may already run an event loop (a notebook, an async app).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            urls, others = pool.submit(asyncio.run, find_coordinator(ca_hash, 3.0)).result()
        if not urls:
            raise CoordinatorUnreachable(
                f"{config.source} says to find the coordinator by mDNS, and none of its mesh"
                f" answered within 3 s ({describe_others(others)}): check that you are on the"
                " coordinator's LAN and multicast (UDP 5353) passes, or put its https://HOST:PORT"
                " in the config (or MESH_COORDINATOR)"
            )
        return urls[0]

    def _check_own_certificate(self) -> None:
        """The TLS layer refuses an expired certificate without a word: say it here."""
        if self.config.cert is None:
            return
        try:
            cert = certs.load_cert_pem(self.config.cert.read_bytes())
        except (OSError, TrustError):
            return
        expired = cert.not_valid_after_utc
        if expired <= datetime.now(UTC):
            raise TrustError(
                f"your certificate ({self.config.cert}) expired at {expired:%Y-%m-%d %H:%M} UTC:"
                " ask an admin for a new one (`mesh users add`)"
            )

    @classmethod
    def from_config(cls, path: Path | None = None) -> Client:
        return cls(load_client_config(path))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------

    def _url(self, path: str, params: dict[str, Any] | None) -> httpx.URL:
        """``absolute_url`` of ``path`` with ``params``, made once for each."""
        query = "" if not params else str(httpx.QueryParams(params))
        key = (path, query)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _URLS_KEPT:
                self._urls.clear()  # job paths differ: a bound, not an eviction policy
            url = self._urls[key] = absolute_url(self._http.base_url, path, query)
        return url

    def _request(
        self, method: str, path: str, params: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        url = self._url(path, params)
        try:
            response = self._http.request(method, url, extensions=self._extensions, **kwargs)
        except httpx.ConnectError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise TrustError(
                    f"the server at {self.base_url} is not this mesh's coordinator "
                    f"(its certificate does not verify against {self.config.ca}: "
                    f"{cause.verify_message})"
                ) from exc
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {self.base_url} ({exc}); is it "
                f"running? the address comes from {self.config.source}"
            ) from exc
        except httpx.TransportError as exc:
            self._check_own_certificate()
            raise CoordinatorUnreachable(
                f"the connection to {self.base_url} failed: {exc}; check that the "
                "coordinator is running and trusts this client's certificate"
            ) from exc
        if response.status_code < 400:
            return response.json()
        try:
            message = str(response.json().get("error") or response.text)
        except ValueError:
            message = response.text
        if response.status_code == 404:
            raise NotFound(message)
        if response.status_code in (401, 403):
            raise RequestRejected(f"refused: {message}", response.status_code)
        if response.status_code < 500:
            raise RequestRejected(message, response.status_code)
        raise ClientError(f"the coordinator failed ({response.status_code}): {message}")

    def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self._request(method, path, **kwargs))

    def _models(self, model: type[M], method: str, path: str, **kwargs: Any) -> list[M]:
        return TypeAdapter(list[model]).validate_python(  # type: ignore[valid-type]
            self._request(method, path, **kwargs)
        )

    # -- the API ----------------------------------------------------------------------------

    def health(self) -> dict[str, str]:
        return dict(self._request("GET", "/healthz"))

    def create_token(self, ttl: float = 3600.0, uses: int | None = 1) -> str:
        """A new join token (``uses`` None: unlimited)."""
        return self.new_token(ttl, uses).token

    def new_token(self, ttl: float = 3600.0, uses: int | None = 1) -> NewToken:
        """A new join token with its id, for `mesh token revoke`."""
        return self._model(NewToken, "POST", "/v1/tokens", json={"ttl": ttl, "uses": uses})

    def remove_node(self, node_id: str) -> NodeRemoved:
        return self._model(NodeRemoved, "DELETE", f"/v1/nodes/{_segment(node_id)}")

    def add_user(self, name: str, admin: bool, csr: str) -> UserCreated:
        body = {"name": name, "admin": admin, "csr": csr}
        return self._model(UserCreated, "POST", "/v1/users", json=body)

    def users(self) -> list[UserInfo]:
        return self._models(UserInfo, "GET", "/v1/users")

    def remove_user(self, name: str) -> None:
        self._request("DELETE", f"/v1/users/{_segment(name)}")

    def events(self, after: int = 0, job: str | None = None, limit: int = 200) -> list[EventInfo]:
        params: dict[str, Any] = {"after": after, "limit": limit}
        if job is not None:
            params["job"] = job
        return self._models(EventInfo, "GET", "/v1/events", params=params)

    def why(self, job_id: str, index: int = 0) -> WhyInfo:
        """Why a task is pending (each node's reason) or how it ended."""
        path = f"/v1/jobs/{_segment(job_id)}/tasks/{index}/why"
        return self._model(WhyInfo, "GET", path)

    def login_link(self) -> LoginLink:
        """A one-time link that signs a browser in as this client's user."""
        return self._model(LoginLink, "POST", "/v1/dashboard/login")

    def tokens(self) -> list[TokenInfo]:
        return self._models(TokenInfo, "GET", "/v1/tokens")

    def revoke_token(self, token_id: str) -> TokenInfo:
        return self._model(TokenInfo, "POST", f"/v1/tokens/{_segment(token_id)}/revoke")

    def submit(self, job: JobSubmit) -> JobInfo:
        return self._model(JobInfo, "POST", "/v1/jobs", json=_body(job))

    def run(self, job: JobSubmit, timeout: float | None = None) -> JobInfo:
        """Submit ``job`` and wait for its end, in one request: the job (counts only) once every
        task has ended; with ``timeout``, as it is then. Its id is picked here unless ``job.id``
        is set, so a connection that drops on the way still names the job: the
        CoordinatorUnreachable raised carries it as ``job_id`` (``wait(job_id)`` goes on)."""
        if job.id is None:
            job = job.model_copy(update={"id": secrets.token_hex(8)})
        assert job.id is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        left = 60.0 if timeout is None else min(timeout, 60.0)
        try:
            found = self._model(
                JobInfo, "POST", "/v1/jobs/run", json=_body(job),
                params={"timeout": left}, timeout=left + 30,
            )  # fmt: skip
        except CoordinatorUnreachable as exc:
            raise CoordinatorUnreachable(
                f"{exc}. Job {job.id} may have been submitted all the same: once the coordinator"
                f" is back, `mesh status {job.id}` says (or Client.wait)",
                job_id=job.id,
            ) from exc
        ended = sum(found.tasks.get(state, 0) for state in _ENDED)
        if ended == found.tasks["total"]:
            return found
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if remaining == 0.0:
            return found
        return self.wait(job.id, remaining)

    def jobs(self, limit: int = 200) -> list[JobInfo]:
        return self._models(JobInfo, "GET", "/v1/jobs", params={"limit": limit})

    def job(self, job_id: str, tasks: bool = True) -> JobInfo:
        """A job, with every task and attempt unless ``tasks`` is false (counts only)."""
        params = {} if tasks else {"tasks": "false"}
        return self._model(JobInfo, "GET", f"/v1/jobs/{_segment(job_id)}", params=params)

    def wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """The job once every task has ended (counts only); with ``timeout``, as it is then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
            job = self._model(
                JobInfo, "GET", f"/v1/jobs/{_segment(job_id)}/wait",
                params={"timeout": min(left, 60.0)}, timeout=min(left, 60.0) + 30,
            )  # fmt: skip
            ended = sum(job.tasks.get(state, 0) for state in _ENDED)
            if ended == job.tasks["total"] or (deadline is not None and left <= 0):
                return job

    def cancel(self, job_id: str) -> JobInfo:
        return self._model(JobInfo, "POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def logs(
        self, job_id: str, index: int, offset: int = 0, attempt: int | None = None
    ) -> LogChunk:
        params: dict[str, int] = {"offset": offset}
        if attempt is not None:
            params["attempt"] = attempt
        return self._model(
            LogChunk, "GET", f"/v1/jobs/{_segment(job_id)}/tasks/{index}/logs", params=params
        )

    def outputs(self, job_id: str, index: int) -> dict[str, bytes]:
        files = self._models(
            OutputFile, "GET", f"/v1/jobs/{_segment(job_id)}/tasks/{index}/outputs"
        )
        return {f.name: base64.b64decode(f.data) for f in files}

    def attempts(self, job_id: str, index: int) -> list[AttemptInfo]:
        return self._models(
            AttemptInfo, "GET", f"/v1/jobs/{_segment(job_id)}/tasks/{index}/attempts"
        )

    def nodes(self) -> list[NodeInfo]:
        return self._models(NodeInfo, "GET", "/v1/nodes")

    def cancel_tasks(self, job_id: str, indices: list[int]) -> JobInfo:
        """Cancel some tasks of a job: queued ones never run, running ones are killed."""
        path = f"/v1/jobs/{_segment(job_id)}/tasks/cancel"
        return self._model(JobInfo, "POST", path, json={"indices": indices})

    # -- Python function calls (MeshExecutor builds on these) --------------------------------

    def submit_functions(self, job: FunctionSubmit) -> JobInfo:
        return self._model(JobInfo, "POST", "/v1/functions", json=job.model_dump())

    def add_calls(self, job_id: str, calls: list[str]) -> CallsAdded:
        """More calls (base64 pickles) for a function job; their indices follow ``first``."""
        path = f"/v1/jobs/{_segment(job_id)}/calls"
        return self._model(CallsAdded, "POST", path, json={"calls": calls})

    def call_updates(
        self, job_id: str, after: int = 0, wait: float = 0.0, limit: int = 1000
    ) -> CallUpdates:
        """Calls of the job that started or ended since cursor ``after``; waits up to ``wait``
        seconds for one if there is none yet."""
        return self._model(
            CallUpdates, "GET", f"/v1/jobs/{_segment(job_id)}/calls",
            params={"after": after, "wait": wait, "limit": limit}, timeout=wait + 30,
        )  # fmt: skip

    def drain(self, node_id: str, deadline: float | None = None) -> NodeInfo:
        return self._model(
            NodeInfo, "POST", f"/v1/nodes/{_segment(node_id)}/drain", json={"deadline": deadline}
        )

    def undrain(self, node_id: str) -> NodeInfo:
        return self._model(NodeInfo, "POST", f"/v1/nodes/{_segment(node_id)}/undrain")


_URLS_KEPT = 256


def absolute_url(base: httpx.URL, path: str, query: str) -> httpx.URL:
    """The URL httpx would request for ``path`` (ASCII, as all of ours are) and the encoded
    ``query`` on a client with ``base``: the path goes after the base URL's. Made once per
    path by the Client: httpx parses a relative path against its base on every request, ~0.1
    ms of pure Python, of ~0.6 ms a submit took in the client before it reached the socket."""
    raw = base.raw_path + path.lstrip("/").encode("ascii")
    return base.copy_with(raw_path=raw + (b"?" + query.encode("ascii") if query else b""))


def _body(job: JobSubmit) -> dict[str, Any]:
    # Without an id, none is sent: a coordinator from before ids could be chosen still takes it.
    return job.model_dump(exclude={"id"} if job.id is None else None)


def _segment(value: str) -> str:
    """A job id as one URL path segment: anything else is simply not a job."""
    if not value or not all(c.isalnum() or c in "-_" for c in value):
        raise NotFound(f"no such id {value!r}: ids are letters, digits and dashes")
    return value
