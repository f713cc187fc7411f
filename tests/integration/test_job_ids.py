"""Job ids: the coordinator's are never a repeat, a client's own is refused once taken. Real
SQLite, no network."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import make_service

from planetary_mesh.errors import RequestRejected
from planetary_mesh.protocol import JobSubmit


def test_a_picked_id_that_is_taken_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service(tmp_path)
    picks: Iterator[str] = iter(["aaaaaaaaaa", "aaaaaaaaaa", "aaaaaaaaaa", "bbbbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda _: next(picks))
    first = service.submit("alice", JobSubmit(argv=["true"]))
    second = service.submit("alice", JobSubmit(argv=["false"]))
    assert (first.id, second.id) == ("aaaaaaaaaa", "bbbbbbbbbb")
    assert service.job("aaaaaaaaaa").spec.argv == ("true",)
    assert service.job("bbbbbbbbbb").spec.argv == ("false",)


def test_a_clients_id_is_kept_and_refused_once_taken_with_nothing_added(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    mine = "0123456789abcdef"
    assert service.submit("alice", JobSubmit(id=mine, argv=["true"])).id == mine
    events = len(service.store.events(0, 1000))
    with pytest.raises(RequestRejected) as taken:
        service.submit("bob", JobSubmit(id=mine, argv=["rm", "-rf", "/work"]))
    assert taken.value.status == 409 and mine in str(taken.value)
    job = service.job(mine)
    assert job.owner == "alice" and job.spec.argv == ("true",)
    assert len(service.store.jobs()) == 1
    assert len(service.store.events(0, 1000)) == events
