"""Durations, sizes, listen addresses and the client configuration file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planetary_mesh.config import (
    FIND_BY_MDNS,
    ClientConfig,
    load_client_config,
    split_listen,
    user_config_path,
    write_client_config,
)
from planetary_mesh.errors import ConfigError, MeshError
from planetary_mesh.units import format_duration, format_size, parse_duration, parse_size

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4

# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
        ("1MS", 0.001),
        ("2H", 7200.0),
        (" 5 m ", 300.0),
        ("0.5", 0.5),
    ],
)
def test_parse_duration_reads_numbers_with_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "5 min", "-1", "1e3", "inf", "nan", "5m30s", "1,5h", "ten", "5x"]
)
def test_parse_duration_refuses_what_it_cannot_read_and_says_what_to_write(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "30s" in message
    assert "5m" in message


@pytest.mark.parametrize("text", ["0", "0s", "0.0h", "0ms"])
def test_parse_duration_refuses_zero(text: str) -> None:
    with pytest.raises(ConfigError, match="greater than zero"):
        parse_duration(text)


def test_parse_duration_refuses_a_number_too_big_to_hold() -> None:
    with pytest.raises(ConfigError):
        parse_duration("9" * 400)


# -- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", MIB),
        ("512M", 512 * MIB),
        ("512m", 512 * MIB),
        ("2G", 2 * GIB),
        ("2GB", 2 * GIB),
        ("2GiB", 2 * GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("64K", 64 * KIB),
        ("64kb", 64 * KIB),
        ("1T", TIB),
        ("10b", 10),
        (" 3 G ", 3 * GIB),
        ("0.5K", 512),
    ],
)
def test_parse_size_reads_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "1e3", "2 gigs", "1.5x", "1P", "1,5G", "twelve"])
def test_parse_size_refuses_what_it_cannot_read_and_says_what_to_write(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "512M" in message
    assert "2G" in message


@pytest.mark.parametrize("text", ["0", "0.5", "0K", "0.0001K"])
def test_parse_size_refuses_less_than_a_byte(text: str) -> None:
    with pytest.raises(ConfigError, match="at least one byte"):
        parse_size(text)


def test_parse_size_refuses_a_number_too_big_to_hold_with_a_config_error() -> None:
    # Every bad size a person can type must come back as a ConfigError (one line, no
    # traceback), not as a Python error from deep inside the parser.
    with pytest.raises(ConfigError):
        parse_size("9" * 400)


# -- formatting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1023, "1023"),
        (1024, "1.0K"),
        (1536, "1.5K"),
        (256 * MIB, "256.0M"),
        (2 * GIB, "2.0G"),
        (3 * TIB, "3.0T"),
        (2048 * TIB, "2048.0T"),  # no unit past T
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (0.0, "0ms"),
        (1, "1s"),
        (59.4, "59s"),
        (60, "1m00s"),
        (75.2, "1m15s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7322, "2h02m"),
        (3 * 86400, "72h00m"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=1024**5))
def test_a_formatted_size_parses_back_to_within_a_rounding_step(size: int) -> None:
    # One decimal of the largest unit that keeps the number at least 1: off by 5 % at most.
    assert abs(parse_size(format_size(size)) - size) <= 0.05 * size


@given(st.integers(min_value=1, max_value=30 * 86400))
def test_a_formatted_whole_duration_parses_back_to_within_a_minute(seconds: int) -> None:
    # ``1h02m`` style is not a single number-and-unit, so parse each part.
    text = format_duration(seconds)
    total = 0.0
    number = ""
    for char in text:
        if char.isdigit():
            number += char
        else:
            if int(number):  # parse_duration refuses zero, and a zero part adds nothing
                total += parse_duration(number + char)
            number = ""
    assert abs(total - seconds) < 60


# -- listen addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7443", ("127.0.0.1", 7443)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:0", ("localhost", 0)),
        (":7443", ("0.0.0.0", 7443)),
        ("[::1]:7443", ("::1", 7443)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_split_listen(text: str, expected: tuple[str, int]) -> None:
    assert split_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "7443", "host", "host:", "host:http", "host:65536", "host:-1", "host: 80", "host:³"],
)
def test_split_listen_refuses_bad_addresses_and_says_what_to_write(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        split_listen(text)
    assert repr(text) in str(caught.value)
    assert "HOST:PORT" in str(caught.value)


# -- the client configuration file --------------------------------------------------------------


def write_config(path: Path, **values: object) -> Path:
    lines = []
    for key, value in values.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {
    "coordinator": "https://127.0.0.1:7443",
    "ca": "ca.pem",
    "cert": "certs/me.pem",
    "key": "/abs/elsewhere/me-key.pem",
}


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's own MESH_* variables and ~/.config out of every test."""
    monkeypatch.delenv("MESH_CONFIG", raising=False)
    monkeypatch.delenv("MESH_COORDINATOR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_relative_paths_are_resolved_against_the_file_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "mesh" / "client.toml", **GOOD)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_client_config(path)
    assert config == ClientConfig(
        coordinator="https://127.0.0.1:7443",
        ca=tmp_path / "mesh" / "ca.pem",
        cert=tmp_path / "mesh" / "certs" / "me.pem",
        key=Path("/abs/elsewhere/me-key.pem"),
        source=path,
    )


def test_a_relative_config_path_still_finds_files_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "mesh" / "client.toml", **GOOD)
    monkeypatch.chdir(tmp_path)
    config = load_client_config(Path("mesh/client.toml"))
    assert config.ca.resolve() == (tmp_path / "mesh" / "ca.pem").resolve()


def test_an_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    path = write_config(tmp_path / "client.toml", **GOOD, coordinater="typo")
    with pytest.raises(ConfigError) as caught:
        load_client_config(path)
    message = str(caught.value)
    assert "coordinater" in message
    assert "unknown" in message
    assert str(path) in message


def test_no_coordinator_address_means_find_it_by_mdns(tmp_path: Path) -> None:
    values = {k: v for k, v in GOOD.items() if k != "coordinator"}
    config = load_client_config(write_config(tmp_path / "client.toml", **values))
    assert config.coordinator == FIND_BY_MDNS == "mdns"


@pytest.mark.parametrize("missing", sorted(set(GOOD) - {"coordinator"}))
def test_a_missing_key_is_refused_by_name(tmp_path: Path, missing: str) -> None:
    values = {k: v for k, v in GOOD.items() if k != missing}
    path = write_config(tmp_path / "client.toml", **values)
    with pytest.raises(ConfigError) as caught:
        load_client_config(path)
    assert "missing" in str(caught.value)
    assert repr(missing) in str(caught.value)


def test_a_value_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path / "client.toml", **{**GOOD, "ca": 7})
    with pytest.raises(ConfigError, match="string"):
        load_client_config(path)


def test_a_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text("coordinator = [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_client_config(path)


def test_a_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_client_config(tmp_path / "nope.toml")
    message = str(caught.value)
    assert "nope.toml" in message
    assert "mesh up" in message
    assert "--config" in message
    assert isinstance(caught.value, MeshError)


def test_without_a_path_the_user_config_is_read(tmp_path: Path) -> None:
    path = user_config_path()
    assert path == tmp_path / "xdg" / "planetary-mesh" / "client.toml"
    write_config(path, **GOOD)
    assert load_client_config().source == path


def test_mesh_config_beats_the_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(user_config_path(), **{**GOOD, "coordinator": "https://user:1"})
    chosen = write_config(
        tmp_path / "env" / "client.toml", **{**GOOD, "coordinator": "https://env:2"}
    )
    monkeypatch.setenv("MESH_CONFIG", str(chosen))
    config = load_client_config()
    assert config.source == chosen
    assert config.coordinator == "https://env:2"
    assert config.ca == tmp_path / "env" / "ca.pem"


def test_an_explicit_path_beats_mesh_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = write_config(tmp_path / "env" / "client.toml", **{**GOOD, "coordinator": "https://env:2"})
    flag = write_config(tmp_path / "flag" / "client.toml", **{**GOOD, "coordinator": "https://f:3"})
    monkeypatch.setenv("MESH_CONFIG", str(env))
    config = load_client_config(flag)
    assert config.source == flag
    assert config.coordinator == "https://f:3"


def test_mesh_config_naming_a_missing_file_is_an_error_not_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(user_config_path(), **GOOD)
    monkeypatch.setenv("MESH_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml"):
        load_client_config()


def test_mesh_coordinator_overrides_the_address_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "client.toml", **GOOD)
    monkeypatch.setenv("MESH_COORDINATOR", "https://10.0.0.5:9000")
    config = load_client_config(path)
    assert config.coordinator == "https://10.0.0.5:9000"
    # Only the address: the credentials still come from the file.
    assert config.ca == tmp_path / "ca.pem"
    monkeypatch.setenv("MESH_COORDINATOR", "")
    assert load_client_config(path).coordinator == GOOD["coordinator"]


def test_a_written_config_reads_back_and_survives_moving_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mesh"
    folder.mkdir()
    outside = tmp_path / "outside-key.pem"
    write_client_config(
        folder / "client.toml", "https://h:1", folder / "ca.pem", folder / "me.pem", outside
    )
    moved = tmp_path / "moved"
    folder.rename(moved)
    config = load_client_config(moved / "client.toml")
    assert config.coordinator == "https://h:1"
    assert config.ca == moved / "ca.pem"
    assert config.cert == moved / "me.pem"
    assert config.key == outside.resolve()
