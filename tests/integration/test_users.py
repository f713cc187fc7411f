"""Users and roles over real mutual TLS against a real coordinator process: an admin makes a
person's certificate bundle; users see every job but cancel only their own; only admins manage;
a removed user's certificate is refused from then on, and the name can be given to someone new.
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import pytest

from planetary_mesh.client import Client
from planetary_mesh.config import CoordinatorPaths, load_client_config, write_client_config
from planetary_mesh.errors import NotFound, RequestRejected, TrustError
from planetary_mesh.pki import certs
from planetary_mesh.protocol import JobSubmit


class Coordinator(Protocol):
    """What the ``coordinator`` and ``fresh_coordinator`` fixtures (conftest.py) give."""

    @property
    def client_config(self) -> Path: ...


MeshCli = Callable[..., "subprocess.CompletedProcess[str]"]


def _admin(coordinator: Coordinator) -> Client:
    return Client(load_client_config(coordinator.client_config))


def _add(mesh_cli: MeshCli, coordinator: Coordinator, name: str, out: Path, *extra: str) -> Path:
    done = mesh_cli(
        "users", "add", name, "--out", str(out), *extra,
        "--config", str(coordinator.client_config),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{name} added; bundle in {out}" in done.stdout
    return out / "client.toml"


def test_an_admin_adds_a_user_whose_bundle_works_and_whose_role_holds(
    fresh_coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    bob_config = _add(mesh_cli, fresh_coordinator, "bob", tmp_path / "bob")
    key = tmp_path / "bob" / "bob-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "bob").stat().st_mode) == 0o700
    cert = certs.load_cert_pem((tmp_path / "bob" / "bob.pem").read_bytes())
    who = certs.identity_of(cert)
    assert (who.kind, who.name, who.admin) == (certs.PeerKind.USER, "bob", False)

    with _admin(fresh_coordinator) as admin, Client(load_client_config(bob_config)) as bob:
        admins_job = admin.submit(JobSubmit(name="admins", argv=["sleep", "60"]))
        bobs_job = bob.submit(JobSubmit(name="bobs", argv=["sleep", "60"]))
        assert bobs_job.owner == "bob"
        assert {admins_job.id, bobs_job.id} <= {j.id for j in bob.jobs()}  # sees everyone's
        with pytest.raises(RequestRejected, match=r"only the job's owner \(admin\)") as refused:
            bob.cancel(admins_job.id)
        assert refused.value.status == 403
        assert admin.job(admins_job.id).state != "cancelled"
        assert bob.cancel(bobs_job.id).state == "cancelled"  # his own
        assert admin.cancel(admins_job.id).state == "cancelled"
        for manage in (bob.users, bob.tokens, lambda: bob.remove_user("admin")):
            with pytest.raises(RequestRejected, match="only an admin"):
                manage()

    listed = mesh_cli(
        "users", "list", "-o", "json", "--config", str(fresh_coordinator.client_config)
    )
    assert listed.returncode == 0, listed.stderr
    users = {u["name"]: (u["admin"], u["created_by"]) for u in json.loads(listed.stdout)}
    assert users == {"admin": (True, "mesh init"), "bob": (False, "admin")}


def test_an_admin_user_may_manage(
    fresh_coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    carol_config = _add(mesh_cli, fresh_coordinator, "carol", tmp_path / "carol", "--admin")
    with Client(load_client_config(carol_config)) as carol:
        assert {u.name for u in carol.users()} == {"admin", "carol"}
        assert carol.create_token(ttl=60)
        with pytest.raises(RequestRejected, match="cannot remove yourself"):
            carol.remove_user("carol")


def test_a_removed_user_is_refused_and_the_name_can_be_given_again(
    fresh_coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    old_config = _add(mesh_cli, fresh_coordinator, "dave", tmp_path / "dave")
    with Client(load_client_config(old_config)) as dave:
        job = dave.submit(JobSubmit(name="daves", argv=["true"]))
    removed = mesh_cli("users", "remove", "dave", "--config", str(fresh_coordinator.client_config))
    assert removed.returncode == 0, removed.stderr
    with (
        Client(load_client_config(old_config)) as dave,
        pytest.raises(RequestRejected, match=r"revoked.*ask an admin") as refused,
    ):
        dave.jobs()
    assert refused.value.status == 403
    with _admin(fresh_coordinator) as admin:
        assert admin.job(job.id).owner == "dave"  # the jobs stay
        assert "dave" not in {u.name for u in admin.users()}
        with pytest.raises(NotFound, match="no user 'dave'"):
            admin.remove_user("dave")
    new_config = _add(mesh_cli, fresh_coordinator, "dave", tmp_path / "new-dave")
    with Client(load_client_config(new_config)) as new_dave:
        assert job.id in {j.id for j in new_dave.jobs()}
    with Client(load_client_config(old_config)) as dave, pytest.raises(RequestRejected):
        dave.jobs()  # the old certificate stays refused


def test_bad_or_taken_user_names_are_refused_and_nothing_is_written(
    coordinator: Coordinator, mesh_cli: MeshCli, tmp_path: Path
) -> None:
    _add(mesh_cli, coordinator, "erin", tmp_path / "erin")
    again = mesh_cli(
        "users", "add", "erin", "--out", str(tmp_path / "erin2"),
        "--config", str(coordinator.client_config),
    )  # fmt: skip
    assert again.returncode != 0 and "exists already" in again.stderr
    assert not (tmp_path / "erin2").exists()
    bad = mesh_cli(
        "users", "add", "no/slashes", "--out", str(tmp_path / "bad"),
        "--config", str(coordinator.client_config),
    )  # fmt: skip
    assert bad.returncode != 0 and "name" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_an_expired_user_certificate_is_refused_and_the_cli_says_why(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    paths = CoordinatorPaths(coordinator.client_config.parent)
    ca = certs.load_cert_pem(paths.ca_cert.read_bytes())
    ca_key = certs.load_key_pem(paths.ca_key.read_bytes())
    cert, key = certs.issue_user_cert(ca, ca_key, "hank", timedelta(seconds=1), admin=False)
    certs.write_public_file(tmp_path / "hank.pem", certs.cert_to_pem(cert))
    certs.write_private_file(tmp_path / "hank-key.pem", certs.key_to_pem(key))
    config = tmp_path / "client.toml"
    url = load_client_config(coordinator.client_config).coordinator
    write_client_config(
        config, url, paths.ca_cert, tmp_path / "hank.pem", tmp_path / "hank-key.pem"
    )
    deadline = cert.not_valid_after_utc.timestamp() + 0.2
    while time.time() < deadline:  # a certificate's end is a point in time: wait past it
        time.sleep(0.05)
    with Client(load_client_config(config)) as hank, pytest.raises(TrustError, match="expired"):
        hank.jobs()
