"""Where things live on disk, and the client configuration file.

Client config precedence: ``--config FILE`` > ``MESH_CONFIG`` > the user's own
``~/.config/planetary-mesh/client.toml``; ``MESH_COORDINATOR`` overrides the address in it.
Unknown keys are rejected so a typo does not silently do nothing.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from planetary_mesh.errors import ConfigError

DEFAULT_PORT = 7443


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "planetary-mesh" / "client.toml"


def default_data_dir(role: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "planetary-mesh" / role


@dataclass(frozen=True)
class CoordinatorPaths:
    """The coordinator's data directory: the CA, its own certificate, the store."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "coordinator.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "coordinator-key.pem"

    @property
    def admin_cert(self) -> Path:
        return self.root / "admin.pem"

    @property
    def admin_key(self) -> Path:
        return self.root / "admin-key.pem"

    @property
    def settings(self) -> Path:
        return self.root / "coordinator.toml"

    @property
    def database(self) -> Path:
        return self.root / "mesh.db"

    @property
    def url_file(self) -> Path:
        """Written when the coordinator listens: its address, port included."""
        return self.root / "coordinator.url"


@dataclass(frozen=True)
class AgentPaths:
    """An agent's data directory: its key, its certificate, the pinned CA."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.root / "node.pem"

    @property
    def key(self) -> Path:
        return self.root / "node-key.pem"

    @property
    def state(self) -> Path:
        return self.root / "agent.toml"


@dataclass(frozen=True)
class ClientConfig:
    coordinator: str
    ca: Path
    cert: Path
    key: Path
    source: Path


_CLIENT_KEYS = {"coordinator", "ca", "cert", "key"}
# As the coordinator's address (in client.toml or MESH_COORDINATOR): find it on the LAN by the
# CA's hash (mDNS, ADR 13) instead.
FIND_BY_MDNS = "mdns"


def load_client_config(path: Path | None = None) -> ClientConfig:
    if path is None:
        env = os.environ.get("MESH_CONFIG")
        path = Path(env) if env else user_config_path()
    if not path.exists():
        raise ConfigError(
            f"no client config at {path}: run `mesh up` or `mesh init`, or pass --config "
            "(or set MESH_CONFIG) to the client.toml they wrote"
        )
    raw = read_toml(path)
    # No address configured: find the coordinator of this CA on the LAN.
    raw.setdefault("coordinator", FIND_BY_MDNS)
    unknown = set(raw) - _CLIENT_KEYS
    missing = _CLIENT_KEYS - set(raw)
    if unknown or missing:
        detail = f"unknown keys {sorted(unknown)}" if unknown else f"missing keys {sorted(missing)}"
        raise ConfigError(f"{path}: {detail}; it needs exactly {sorted(_CLIENT_KEYS)}")
    values = {key: value for key, value in raw.items() if isinstance(value, str)}
    if len(values) != len(_CLIENT_KEYS):
        raise ConfigError(f"{path}: every value must be a string")
    base = path.parent
    return ClientConfig(
        coordinator=os.environ.get("MESH_COORDINATOR") or values["coordinator"],
        ca=base / values["ca"],
        cert=base / values["cert"],
        key=base / values["key"],
        source=path,
    )


def write_client_config(path: Path, coordinator: str, ca: Path, cert: Path, key: Path) -> None:
    """Paths are stored relative to the file when they sit beside it, so a folder can move."""

    def rel(target: Path) -> str:
        try:
            return str(target.resolve().relative_to(path.parent.resolve()))
        except ValueError:
            return str(target.resolve())

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"coordinator": coordinator, "ca": rel(ca), "cert": rel(cert), "key": rel(key)}
    write_toml(path, data)


def read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def write_toml(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, path)


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or ``:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdecimal()) or int(port) > 65535:
        raise ConfigError(f"bad listen address {text!r}: write HOST:PORT, e.g. 0.0.0.0:7443")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
