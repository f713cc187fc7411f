"""`mesh doctor`'s words for what needs no network: certificates and clocks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from planetary_mesh.doctor import certificate, clock
from planetary_mesh.pki import certs


def _cert(tmp_path: Path, hours: float) -> tuple[Path, datetime]:
    ca_cert, ca_key = certs.create_ca("doctor")
    cert, _ = certs.issue_user_cert(ca_cert, ca_key, "alice", timedelta(hours=hours), admin=False)
    path = tmp_path / "alice.pem"
    path.write_bytes(certs.cert_to_pem(cert))
    return path, cert.not_valid_after_utc


def test_an_expired_certificate_says_when_and_what_to_do(tmp_path: Path) -> None:
    path, ends = _cert(tmp_path, 24)
    found = certificate(path, now=ends + timedelta(minutes=1))
    assert not found.ok and "expired at" in found.seen
    assert "join again with a new token" in found.fix and "mesh users add" in found.fix
    soon = certificate(path, now=ends - timedelta(minutes=30))
    assert not soon.ok and "expires in 30 min" in soon.seen
    assert certificate(path, now=datetime.now(UTC)).ok
    assert certificate(None).ok  # nothing joined yet is not a problem
    unreadable = certificate(tmp_path / "missing.pem")
    assert not unreadable.ok and "cannot read" in unreadable.seen


def test_clock_skew_beyond_half_a_minute_is_a_problem_with_a_remedy() -> None:
    assert clock(2.0).ok and "2 s ahead" in clock(2.0).seen
    behind = clock(-600.0)
    assert not behind.ok and "600 s behind" in behind.seen and "time sync" in behind.fix
    assert clock(None).ok
