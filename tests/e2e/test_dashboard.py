"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against a real local
mesh: log in with the one-time link `mesh dashboard` prints, see the nodes, watch a job's
progress bar finish without a reload, cancel a job and drain a node from the page, page through
10,000 tasks. Screenshots of every page go to test-artifacts/dashboard/ (or
$MESH_TEST_ARTIFACTS/dashboard/): look at them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for, wait_job
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from planetary_mesh.client import Client
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("dashboard")]

CHROMIUM = "/usr/bin/chromium"  # Debian's; `playwright install` is never used
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MESH_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
SECONDS = 20_000  # Playwright's waits, in milliseconds
LAPTOP: ViewportSize = {"width": 1366, "height": 820}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    local = LocalMesh(
        tmp_path_factory.mktemp("dash"), agents=2, agent_cpus=1, agent_args=("--label", "room=lab")
    )
    with local:
        yield local


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[Client]:
    with mesh.client() as c:
        yield c


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()


def mesh_cli(mesh: LocalMesh, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "planetary_mesh", *args],
        env={**os.environ, "MESH_CONFIG": str(mesh.client_config)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def new_context(chromium: Browser) -> BrowserContext:
    # The mesh's CA is not in Chromium's trust store; the page's TLS is still the coordinator's.
    context = chromium.new_context(ignore_https_errors=True, viewport=LAPTOP)
    context.set_default_timeout(SECONDS)
    return context


@pytest.fixture
def page(mesh: LocalMesh, chromium: Browser) -> Iterator[Page]:
    """A browser signed in through a fresh one-time link, with nothing reloading it."""
    context = new_context(chromium)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(mesh_cli(mesh, "dashboard"))
        expect(page.locator("#live")).to_have_text("live")
        page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page
        yield page
        assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
        assert not errors, errors
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def go(page: Page, hash_path: str) -> None:
    """Follow an in-page link (no reload), as a click on the navigation would."""
    page.evaluate("(h) => { location.hash = h; }", hash_path)


def test_the_login_link_works_once_and_the_page_shows_the_nodes(
    mesh: LocalMesh, chromium: Browser
) -> None:
    url = mesh_cli(mesh, "dashboard")
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+/login\?token=[\w-]+", url), url
    context = new_context(chromium)
    page = context.new_page()
    page.goto(url)
    assert page.url.endswith("/")  # the secret is gone from the address bar
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator('[data-card="nodes"] .figure')).to_have_text("2 / 2")
    expect(page.locator("#live")).to_have_text("live")
    shot(page, "overview")

    page.get_by_role("link", name="Nodes").click()
    for name in ("agent-1", "agent-2"):
        row = page.locator(f'tr[data-name="{name}"]')
        expect(row.locator("td.state")).to_have_text("ready")
        expect(row).to_contain_text("room=lab")
        expect(row).to_contain_text("%")  # the machine's live CPU use
        expect(row).to_contain_text("bwrap")
    shot(page, "nodes")
    with mesh.client() as client:
        nodes = client.nodes()
    for node in nodes:
        assert node.labels == {"room": "lab"} and node.cpu_percent is not None
        assert node.memory_in_use is not None and 0 < node.memory_in_use <= node.memory

    page.locator('tr[data-name="agent-1"] a').first.click()
    expect(page.get_by_role("heading", name=re.compile("Node agent-1"))).to_be_visible()
    expect(page.locator("dl.facts")).to_contain_text("room=lab")
    shot(page, "node")
    context.close()

    # The same link in another browser: refused, with what to do, and no session.
    other = new_context(chromium)
    second = other.new_page()
    response = second.goto(url)
    assert response is not None and response.status == 403
    expect(second.locator("#message")).to_contain_text("used already")
    expect(second.locator("#message")).to_contain_text("mesh dashboard")
    shot(second, "login-link-used-twice")
    home = second.goto(url.split("/login")[0] + "/")
    assert home is not None and home.status == 401
    expect(second.get_by_role("heading")).to_have_text("Sign in to Planetary Mesh")
    other.close()


def test_a_job_submitted_from_the_cli_fills_its_progress_bar_without_a_reload(
    mesh: LocalMesh, page: Page
) -> None:
    go(page, "#/jobs")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    script = "echo hello from $MESH_TASK_INDEX; sleep 0.5; echo bye"
    job_id = mesh_cli(
        mesh, "submit", "--array", "12", "--name", "watched", "--", "sh", "-c", script
    )
    # The new job appears by itself (the event stream), and its page follows it.
    page.locator(f'tr[data-job="{job_id}"] a').first.click()
    bar = page.locator(f'[role="progressbar"][data-job="{job_id}"]')
    expect(bar).to_be_visible()
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while not seen or seen[-1] < 100:
        assert time.monotonic() < deadline, f"the bar stopped at {seen[-1:]}"
        value = int(bar.get_attribute("aria-valuenow") or "0")
        if not seen or value != seen[-1]:
            seen.append(value)
            if 0 < value < 100 and not (ARTIFACTS / "job-running.png").exists():
                shot(page, "job-running")
        time.sleep(0.05)
    assert any(0 < v < 100 for v in seen), f"no step between 0 and 100 was shown: {seen}"
    assert seen == sorted(seen), f"the bar went backwards: {seen}"
    expect(page.locator("h1 .badge")).to_have_text("succeeded")
    expect(page.locator("tr[data-task] td.state")).to_have_text(["succeeded"] * 12)

    # A task's output, and its story.
    page.get_by_role("link", name="Task 7", exact=True).click()
    expect(page.locator("pre.output")).to_contain_text("hello from 7\nbye")
    expect(page.locator("#task-panel")).to_contain_text("exit code 0")
    shot(page, "job")


def test_a_running_task_s_output_is_followed_live(mesh: LocalMesh, page: Page) -> None:
    script = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done"
    job_id = mesh_cli(mesh, "submit", "--name", "chatty", "--", "sh", "-c", script)
    go(page, f"#/jobs/{job_id}?task=0")
    output = page.locator("pre.output")
    expect(output).to_contain_text("line 2")
    assert "line 6" not in (output.text_content() or "")  # shown while it runs, not after
    expect(page.locator("#task-panel h2").last).to_contain_text("(live)")
    expect(output).to_contain_text("line 6")
    expect(page.locator("#task-panel h2").last).to_contain_text("(ended)")
    assert (output.text_content() or "").count("line 3") == 1  # followed, not repeated


def test_cancelling_from_the_page_ends_its_tasks_as_cancelled(
    mesh: LocalMesh, page: Page, client: Client
) -> None:
    job = client.submit(JobSubmit(name="doomed", argv=["sleep", "300"], count=4))
    go(page, f"#/jobs/{job.id}")
    expect(page.locator("tr[data-task] td.state").first).to_have_text(
        re.compile("running|assigned|pending")
    )
    # With the keyboard: the button, then the confirmation that takes the focus.
    page.get_by_role("button", name="Cancel job").focus()
    page.keyboard.press("Enter")
    confirm = page.get_by_role("button", name="Yes, cancel job")
    expect(confirm).to_be_focused()
    shot(page, "job-cancel-confirm")
    page.keyboard.press("Enter")
    expect(page.locator("h1 .badge")).to_have_text("cancelled")
    expect(page.locator("tr[data-task] td.state")).to_have_text(["cancelled"] * 4)
    expect(page.locator("tr[data-task] td.reason").first).to_contain_text("cancelled by admin")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    shot(page, "job-cancelled")
    ended = wait_job(client, job.id)
    assert ended.task_list is not None
    assert {t.state for t in ended.task_list} == {"cancelled"}
    assert all("cancelled by admin" in (t.reason or "") for t in ended.task_list)
    assert ended.cancelled_by == "admin"


def test_drain_and_undrain_a_node_from_the_page(
    mesh: LocalMesh, page: Page, client: Client
) -> None:
    go(page, "#/nodes")
    row = page.locator('tr[data-name="agent-2"]')
    row.get_by_role("button", name="Drain").click()
    expect(row.locator("td.state")).to_have_text("draining")
    node = next(n for n in client.nodes() if n.name == "agent-2")
    assert node.state == "draining"
    shot(page, "nodes-draining")
    row.get_by_role("button", name="Undrain").click()
    expect(row.locator("td.state")).to_have_text("ready")
    wait_for(
        lambda: next(n for n in client.nodes() if n.name == "agent-2").state == "ready",
        10, "agent-2 to take work again",
    )  # fmt: skip


def test_ten_thousand_tasks_are_shown_a_page_at_a_time_with_why_they_wait(
    mesh: LocalMesh, page: Page, client: Client
) -> None:
    # More memory than any node has: all 10,000 wait, and `why` can say so for each node.
    job = client.submit(JobSubmit(name="wide", argv=["true"], count=10_000, memory=1024**4))
    try:
        go(page, f"#/jobs/{job.id}")
        expect(page.locator("nav.pager")).to_contain_text("Page 1 of 100 · 10000 tasks")
        assert page.locator("tr[data-task]").count() == 100
        page.get_by_role("link", name="Next →").click()
        expect(page.locator("tr[data-task]").first).to_have_attribute("data-task", "100")
        assert page.locator("tr[data-task]").count() == 100
        page.get_by_role("link", name="Task 150", exact=True).click()
        panel = page.locator("#task-panel")
        expect(panel).to_contain_text("no node can ever run it")
        for name in ("agent-1", "agent-2"):
            expect(panel.locator("ul.why li", has_text=name)).to_contain_text("too small")
        shot(page, "job-10000-tasks")
        go(page, "#/jobs")
        expect(page.locator(f'tr[data-job="{job.id}"]')).to_contain_text("0/10000 ended")
    finally:
        client.cancel(job.id)


def test_after_a_coordinator_restart_the_open_page_goes_on_with_the_same_history(
    tmp_path: Path, chromium: Browser
) -> None:
    with LocalMesh(tmp_path / "mesh", agents=1) as mesh, mesh.client() as client:
        done = client.submit(JobSubmit(name="before", argv=["echo", "kept"], count=3))
        assert wait_job(client, done.id).state == "succeeded"
        context = new_context(chromium)
        try:
            page = context.new_page()
            page.goto(mesh_cli(mesh, "dashboard"))
            expect(page.locator("#live")).to_have_text("live")
            page.evaluate("window.__sameDocument = true")
            go(page, "#/jobs")
            expect(page.locator(f'tr[data-job="{done.id}"] td.state')).to_have_text("succeeded")

            mesh.kill_coordinator()  # kill -9: nothing is saved on the way out
            expect(page.locator("#live")).not_to_have_text("live")
            mesh.start_coordinator()
            # The browser's session is in the store: the stream reconnects by itself.
            expect(page.locator("#live")).to_have_text("live", timeout=30_000)
            with mesh.client() as again:
                after = again.submit(JobSubmit(name="after", argv=["true"]))
            row = page.locator(f'tr[data-job="{after.id}"]')
            expect(row.locator("td.state")).to_have_text("succeeded", timeout=30_000)
            expect(page.locator(f'tr[data-job="{done.id}"] td.state')).to_have_text("succeeded")
            shot(page, "jobs-after-restart")

            go(page, f"#/jobs/{done.id}?task=2")
            expect(page.locator("tr[data-task] td.state")).to_have_text(["succeeded"] * 3)
            expect(page.locator("pre.output")).to_contain_text("kept")
            go(page, "#/")
            expect(page.locator('[data-card="succeeded"] .figure')).to_have_text("4")
            assert page.evaluate("window.__sameDocument") is True
        finally:
            context.close()


def shout_and_fail(x: int) -> float:
    print(f"about to divide {x} by zero")
    return x / 0


def test_an_executor_s_calls_are_a_job_on_the_page_with_why_each_ended(
    page: Page, client: Client
) -> None:
    from planetary_mesh import MeshExecutor

    with MeshExecutor(client, name="python-calls") as executor:
        assert executor.submit(abs, -3).result(timeout=60) == 3
        failed = executor.submit(shout_and_fail, 7)
        with pytest.raises(ZeroDivisionError):
            failed.result(timeout=60)
        (job_id,) = executor.job_ids()
    go(page, f"#/jobs/{job_id}?task=1")
    expect(page.locator("h1")).to_contain_text("python-calls")
    python = f"Python {sys.version_info.major}.{sys.version_info.minor} function calls"
    expect(page.locator("dl.facts")).to_contain_text(python)
    expect(page.locator("tr[data-task] td.state")).to_have_text(["succeeded", "failed"])
    expect(page.locator("tr[data-task] td.reason").last).to_contain_text(
        "raised builtins.ZeroDivisionError: division by zero"
    )
    expect(page.locator("pre.output")).to_contain_text("about to divide 7 by zero")
    shot(page, "job-python-calls")
