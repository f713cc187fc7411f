"""The endpoints the dashboard draws from, over real mutual TLS against a real coordinator:
paging jobs and tasks, the overview's counts, a node's record, and the server-sent event stream
(what it sends, resuming with Last-Event-ID, ending when the browser session ends)."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser_helpers import Coordinator, MeshCli, signed_in

from planetary_mesh.client import Client
from planetary_mesh.pki import tls
from planetary_mesh.protocol import JobSubmit

UNPLACEABLE = 1024**4  # more memory than any node here has: tasks stay pending


def admin_http(coordinator: Coordinator) -> httpx.Client:
    paths = coordinator.paths
    context = tls.client_ssl_context(paths.ca_cert.read_bytes(), paths.admin_cert, paths.admin_key)
    return httpx.Client(base_url=coordinator.url, verify=context, timeout=10)


@pytest.fixture
def http(coordinator: Coordinator) -> Iterator[httpx.Client]:
    with admin_http(coordinator) as client:
        yield client


@pytest.fixture
def client(coordinator: Coordinator) -> Iterator[Client]:
    with Client.from_config(coordinator.client_config) as c:
        yield c


def submit(client: Client, name: str, count: int = 1) -> str:
    return client.submit(JobSubmit(name=name, argv=["true"], count=count, memory=UNPLACEABLE)).id


def test_jobs_page_newest_first_with_a_total(client: Client, http: httpx.Client) -> None:
    ids = [submit(client, f"page-{i}") for i in range(3)]
    first = http.get("/v1/jobs", params={"limit": 2, "offset": 0})
    second = http.get("/v1/jobs", params={"limit": 2, "offset": 2})
    total = int(first.headers["x-total-count"])
    assert total >= 3 and second.headers["x-total-count"] == str(total)
    listed = [j["id"] for j in first.json()] + [j["id"] for j in second.json()]
    assert listed[:3] == ids[::-1]  # newest first, no gap and no repeat across the pages
    assert len(listed) == len(set(listed))
    assert http.get("/v1/jobs", params={"offset": -1}).status_code == 422


def test_a_job_s_tasks_come_a_page_at_a_time_filtered_by_state(
    client: Client, http: httpx.Client
) -> None:
    job_id = submit(client, "wide", count=250)
    page = http.get(f"/v1/jobs/{job_id}/tasks", params={"offset": 100, "limit": 100})
    assert page.status_code == 200 and page.headers["x-total-count"] == "250"
    assert [t["index"] for t in page.json()] == list(range(100, 200))
    assert {t["state"] for t in page.json()} == {"pending"}
    last = http.get(f"/v1/jobs/{job_id}/tasks", params={"offset": 200, "limit": 100}).json()
    assert [t["index"] for t in last] == list(range(200, 250))
    pending = http.get(f"/v1/jobs/{job_id}/tasks", params={"state": "pending", "limit": 1})
    assert pending.headers["x-total-count"] == "250" and len(pending.json()) == 1
    running = http.get(f"/v1/jobs/{job_id}/tasks", params={"state": "running"})
    assert running.headers["x-total-count"] == "0" and running.json() == []
    bad = http.get(f"/v1/jobs/{job_id}/tasks", params={"state": "sleeping"})
    assert bad.status_code == 422 and "state" in bad.json()["error"]
    missing = http.get("/v1/jobs/nosuchjob/tasks")
    assert missing.status_code == 404 and "mesh jobs" in missing.json()["error"]
    too_many = http.get(f"/v1/jobs/{job_id}/tasks", params={"limit": 1001})
    assert too_many.status_code == 422  # never 10,000 rows in one answer


def test_the_overview_counts_what_the_store_holds(
    fresh_coordinator: Coordinator,
) -> None:
    with Client.from_config(fresh_coordinator.client_config) as c:
        job_id = submit(c, "counted", count=7)
        c.cancel(submit(c, "gone", count=2))
    with admin_http(fresh_coordinator) as http:
        o = http.get("/v1/overview", params={"window": 600, "bucket": 60, "events": 3}).json()
    assert o["nodes"] == {"ready": 0, "suspect": 0, "lost": 0, "draining": 0, "total": 0}
    assert o["tasks"]["pending"] == 7 and o["tasks"]["cancelled"] == 2
    tp = o["throughput"]
    assert tp["bucket_seconds"] == 60 and len(tp["succeeded"]) == 10
    assert sum(tp["other"]) == 2 and sum(tp["succeeded"]) == sum(tp["failed"]) == 0
    assert [e["kind"] for e in o["events"]][-1] == "job_cancelled"
    assert len(o["events"]) == 3 and o["events"][0]["seq"] < o["events"][-1]["seq"]
    assert any(e["job_id"] == job_id for e in o["events"])


def test_an_unknown_node_is_a_clear_404(http: httpx.Client) -> None:
    for path in ("/v1/nodes/n-nosuch", "/v1/nodes/n-nosuch/attempts"):
        found = http.get(path)
        assert found.status_code == 404 and "mesh nodes" in found.json()["error"], path


class Stream:
    """The events of an open /v1/events/stream, read on a thread."""

    def __init__(self, http: httpx.Client, **kwargs: Any) -> None:
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.ids: list[str] = []
        self._context = http.stream("GET", "/v1/events/stream", timeout=30, **kwargs)
        self.response = self._context.__enter__()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                if line.startswith("id: "):
                    self.ids.append(line[4:])
                elif line.startswith("data: "):
                    self.events.put(json.loads(line[6:]))
        except (httpx.HTTPError, OSError):
            pass  # the server ended the stream, or close() cut it off
        self.events.put(None)  # the stream ended

    def next(self, timeout: float = 10) -> dict[str, Any] | None:
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        # Wake the reading thread by shutting the socket down, and let it finish, before the
        # response is closed: closing a TLS socket another thread is still reading lets that
        # thread's next read land on whatever connection reuses the descriptor (seen in CI as
        # the next request's WRONG_VERSION_NUMBER).
        sock = self.response.extensions["network_stream"].get_extra_info("socket")
        if sock is not None and self._reader.is_alive():
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._reader.join(timeout=10)
        assert not self._reader.is_alive(), "the stream's reader did not stop"
        self._context.__exit__(None, None, None)


def test_the_event_stream_sends_new_events_and_resumes_after_the_last_one(
    client: Client, http: httpx.Client
) -> None:
    last = client.events(after=0, limit=1000)[-1].seq if client.events() else 0
    stream = Stream(http, params={"after": last})
    try:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        job_id = submit(client, "streamed")
        event = stream.next()
        assert event is not None and event["kind"] == "job_submitted"
        assert event["job_id"] == job_id and event["seq"] > last
        client.cancel(job_id)
        cancelled = stream.next()
        assert cancelled is not None and cancelled["kind"] == "job_cancelled"
        assert stream.ids[-1] == str(cancelled["seq"])
    finally:
        stream.close()
    # A reconnecting browser sends Last-Event-ID: only what came after it.
    resumed = Stream(http, headers={"Last-Event-ID": str(event["seq"])})
    try:
        again = resumed.next()
        assert again is not None and again["seq"] == cancelled["seq"]
    finally:
        resumed.close()
    assert http.get("/v1/events/stream", params={"after": "x"}).status_code == 422
    # A nonsense Last-Event-ID (past any event, past SQLite's integers) is no server error.
    huge = {"Last-Event-ID": "9" * 24}
    with http.stream("GET", "/v1/events/stream", headers=huge, timeout=10) as beyond:
        assert beyond.status_code == 200
        assert next(beyond.iter_lines()) == "retry: 2000"
    stream = Stream(http, headers=huge)  # and new events after it are not sent
    try:
        submit(client, "after-huge")
        with pytest.raises(queue.Empty):
            stream.events.get(timeout=1.0)
    finally:
        stream.close()


def test_the_event_stream_of_a_browser_ends_when_it_logs_out(
    coordinator: Coordinator, mesh_cli: MeshCli
) -> None:
    browser, csrf = signed_in(coordinator, mesh_cli)
    try:
        stream = Stream(browser, params={"after": 0})
        try:
            assert stream.response.status_code == 200
            assert browser.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
            while (event := stream.next()) is not None:  # past events, then the end
                assert "kind" in event
        finally:
            stream.close()
        assert browser.get("/v1/events/stream").status_code == 401
    finally:
        browser.close()


def test_the_page_and_its_assets_need_a_session_and_forbid_other_origins(
    coordinator: Coordinator, mesh_cli: MeshCli
) -> None:
    browser, _ = signed_in(coordinator, mesh_cli)
    try:
        script = browser.get("/ui/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "EventSource" in script.text
        style = browser.get("/ui/style.css")
        assert style.headers["content-type"].startswith("text/css")
        policy = browser.get("/").headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
    finally:
        browser.close()
    with httpx.Client(
        base_url=coordinator.url,
        verify=tls.client_ssl_context(coordinator.paths.ca_cert.read_bytes()),
    ) as stranger:
        assert stranger.get("/ui/app.js").status_code == 401


def test_waiting_on_a_job_returns_as_soon_as_it_ends(
    coordinator: Coordinator, client: Client
) -> None:
    job_id = submit(client, "waited", count=2)
    started = time.monotonic()
    still = client.wait(job_id, timeout=0.5)
    assert still.state == "pending" and time.monotonic() - started >= 0.5
    with Client.from_config(coordinator.client_config) as other:
        canceller = threading.Timer(0.5, other.cancel, [job_id])
        canceller.start()
        started = time.monotonic()
        ended = client.wait(job_id, timeout=60)
        # The wait may return before the cancel's own answer arrives: let it, before closing.
        canceller.join(timeout=30)
    assert ended.state == "cancelled" and ended.tasks["cancelled"] == 2
    assert time.monotonic() - started < 30  # woken by the change, not by the time limit
    with admin_http(coordinator) as http:
        assert http.get(f"/v1/jobs/{job_id}/wait", params={"timeout": 301}).status_code == 422
        assert http.get("/v1/jobs/nosuch/wait").status_code == 404
