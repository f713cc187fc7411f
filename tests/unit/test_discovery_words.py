"""What the coordinator advertises, and how a found one is dialled (no network needed)."""

from __future__ import annotations

from planetary_mesh.discovery import Advertised, advertised_addresses, describe_others


def test_a_coordinator_on_loopback_advertises_nothing_and_an_address_itself() -> None:
    assert advertised_addresses("127.0.0.1") == []
    assert advertised_addresses("::1") == []
    assert advertised_addresses("10.1.2.3") == ["10.1.2.3"]
    assert advertised_addresses("[fd00::5]") == ["fd00::5"]
    everything = advertised_addresses("0.0.0.0")
    assert all(not a.startswith("127.") and a != "::1" for a in everything)
    assert all(not a.lower().startswith("fe80") for a in everything)  # no scope-less link-local


def test_a_found_coordinator_is_dialled_ipv4_first_with_ipv6_in_brackets() -> None:
    found = Advertised("home x", "home", "ab" * 32, "0.1.0", ("fd00::1", "10.0.0.2"), 7443)
    assert found.urls() == ["https://10.0.0.2:7443", "https://[fd00::1]:7443"]


def test_what_was_ignored_is_named() -> None:
    assert describe_others([]) == "no mesh answered over mDNS"
    other = Advertised("n", "neighbours", "cd" * 32, "0.1.0", ("10.0.0.9",), 7443)
    words = describe_others([other])
    assert "neighbours" in words and "another CA" in words and "cdcdcdcdcdcd" in words
