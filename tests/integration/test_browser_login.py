"""The browser's door, over real TLS against a real coordinator process, with a client that
presents no certificate (as a browser does): a one-time login link becomes a strict session
cookie; the session acts with its user's role; changes need the CSRF token; nothing else gets in.
(The browser tests of the dashboard itself come with it, in a real Chromium.)"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from browser_helpers import Coordinator, MeshCli, browser, login_url, signed_in

from planetary_mesh.client import Client
from planetary_mesh.config import load_client_config
from planetary_mesh.coordinator.browser import BrowserLogins
from planetary_mesh.errors import TrustError
from planetary_mesh.pki import certs
from planetary_mesh.protocol import JobSubmit


def test_a_login_link_becomes_a_strict_session_cookie_and_works_once(
    coordinator: Coordinator, mesh_cli: MeshCli
) -> None:
    url = login_url(mesh_cli, coordinator)
    with browser(coordinator) as client:
        assert client.get("/v1/jobs").status_code == 401  # nothing without the cookie
        landed = client.get(url)
        assert landed.status_code == 303 and landed.headers["location"] == "/"
        cookie = landed.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "secure", "max-age", "path"} <= attributes, cookie
        assert "samesite=strict" in cookie.lower(), cookie
        assert landed.headers["cache-control"] == "no-store"
        assert landed.headers["referrer-policy"] == "no-referrer"
        home = client.get("/")
        assert home.status_code == 200 and 'data-user="admin" data-role="admin"' in home.text
        assert "script-src 'self'" in home.headers["content-security-policy"]
        assert client.get("/v1/jobs").status_code == 200  # the API, on the cookie alone
    with browser(coordinator) as other:
        replay = other.get(url)
        assert replay.status_code == 403 and "used already" in replay.text
        assert "mesh_session" not in replay.headers.get("set-cookie", "")
        assert other.get("/").status_code == 401  # a page that says how to sign in
        assert other.get("/v1/jobs").status_code == 401
        other.cookies.set("mesh_session", "forged", domain="127.0.0.1")
        assert other.get("/v1/jobs").status_code == 401


def test_a_browser_change_needs_the_csrf_token_and_this_origin(
    coordinator: Coordinator, mesh_cli: MeshCli
) -> None:
    with Client(load_client_config(coordinator.client_config)) as admin:
        job = admin.submit(JobSubmit(argv=["sleep", "60"]))
    client, csrf = signed_in(coordinator, mesh_cli)
    with contextlib.closing(client):
        cancel = f"/v1/jobs/{job.id}/cancel"
        missing = client.post(cancel)
        assert missing.status_code == 403 and "X-CSRF-Token" in missing.json()["error"]
        wrong = client.post(cancel, headers={"X-CSRF-Token": "0" * len(csrf)})
        assert wrong.status_code == 403
        elsewhere = client.post(
            cancel, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
        )
        assert elsewhere.status_code == 403 and "another site" in elsewhere.json()["error"]
        with Client(load_client_config(coordinator.client_config)) as admin:
            assert admin.job(job.id, tasks=False).state != "cancelled"  # none of it got through
        done = client.post(cancel, headers={"X-CSRF-Token": csrf, "Origin": coordinator.url})
        assert done.status_code == 200 and done.json()["state"] == "cancelled"
        assert done.json()["cancelled_by"] == "admin"
        # A browser cannot mint more links; logging out ends the session.
        assert client.post("/v1/dashboard/login", headers={"X-CSRF-Token": csrf}).status_code == 403
        assert client.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
        assert client.get("/v1/jobs").status_code == 401


def test_a_browser_session_has_its_users_role_and_ends_with_the_user(
    coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    added = mesh_cli(
        "users", "add", "frank", "--out", str(tmp_path / "frank"),
        "--config", str(coordinator.client_config),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    url = login_url(mesh_cli, coordinator, tmp_path / "frank" / "client.toml")
    with browser(coordinator) as client:
        client.get(url)
        page = client.get("/")
        csrf = re.search(r'content="([0-9a-f]+)"', page.text)
        assert csrf and 'data-user="frank" data-role="user"' in page.text
        token = client.post("/v1/tokens", json={"ttl": 60}, headers={"X-CSRF-Token": csrf[1]})
        assert token.status_code == 403 and "only an admin" in token.json()["error"]
        removed = mesh_cli("users", "remove", "frank", "--config", str(coordinator.client_config))
        assert removed.returncode == 0, removed.stderr
        refused = client.get("/v1/jobs")
        assert refused.status_code == 403 and "revoked" in refused.json()["error"]


def test_links_and_sessions_expire() -> None:
    now = [1000.0]
    logins = BrowserLogins(lambda: now[0], login_ttl=60, session_ttl=600)
    who = certs.Identity(certs.PeerKind.USER, "gina", 7, datetime.now(UTC), admin=False)
    late, _ = logins.create_link(who)
    now[0] += 61
    with pytest.raises(TrustError, match="expired"):
        logins.redeem(late)
    fresh, _ = logins.create_link(who)
    cookie, session = logins.redeem(fresh)
    assert logins.session(cookie) == session and session.user.name == "gina"
    now[0] += 599
    assert logins.session(cookie) is not None
    now[0] += 2
    assert logins.session(cookie) is None
    assert logins.session(None) is None and logins.session("") is None


def test_the_dashboard_command_needs_a_client_certificate(mesh_cli: MeshCli) -> None:
    done = mesh_cli("dashboard", "--config", "/nonexistent/client.toml")
    assert done.returncode != 0 and "client.toml" in done.stderr
