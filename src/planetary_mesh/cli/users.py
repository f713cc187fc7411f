"""`mesh users`: the people who may use the mesh: add one (a certificate bundle to hand over),
list them, remove one (their certificate is refused from then on)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from planetary_mesh.cli.common import (
    ConfigOption,
    OutputFormat,
    OutputOption,
    client_for,
    print_json,
    relative_time,
    table,
)
from planetary_mesh.config import write_client_config
from planetary_mesh.errors import ConfigError
from planetary_mesh.pki import certs

users_app = typer.Typer(help="People with access: add, list, remove.", no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The person's user name.")]


@users_app.command("add")
def users_add(
    name: NameArg,
    admin: Annotated[
        bool, typer.Option("--admin", help="May manage nodes, tokens, users.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the bundle (default ./mesh-user-NAME)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make a certificate bundle for a person: key, certificate, the mesh's CA, client.toml.

    The key is made here and never sent anywhere; hand the folder over privately.
    """
    folder = out or Path(f"mesh-user-{name}")
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not empty: pick another --out")
    key = certs.generate_key()
    with client_for(config) as client:
        made = client.add_user(name, admin, certs.make_csr(key, name).decode())
        coordinator = client.config.coordinator
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    key_file, cert_file, ca_file = (
        folder / f"{name}-key.pem",
        folder / f"{name}.pem",
        folder / "ca.pem",
    )
    certs.write_private_file(key_file, certs.key_to_pem(key))
    certs.write_public_file(cert_file, made.certificate.encode())
    certs.write_public_file(ca_file, made.ca.encode())
    write_client_config(folder / "client.toml", coordinator, ca_file, cert_file, key_file)
    role = "admin" if admin else "user"
    print(f"{role} {name} added; bundle in {folder}")
    print(f"they use it with: mesh --config {folder / 'client.toml'} jobs  (or MESH_CONFIG)")


@users_app.command("list")
def users_list(config: ConfigOption = None, output: OutputOption = OutputFormat.TABLE) -> None:
    """Everyone with a certificate made by `mesh init` or `mesh users add`."""
    with client_for(config) as client:
        found = client.users()
    if output is OutputFormat.JSON:
        print_json(found)
        return
    now = time.time()
    table(
        None,
        ["NAME", "ROLE", "CERTIFICATE EXPIRES", "ADDED BY"],
        [
            [
                u.name,
                "admin" if u.admin else "user",
                relative_time(u.expires_at - now),
                u.created_by,
            ]
            for u in found
        ],
    )


@users_app.command("remove")
def users_remove(name: NameArg, config: ConfigOption = None) -> None:
    """Refuse a person's certificate from now on. Their jobs stay."""
    with client_for(config) as client:
        client.remove_user(name)
    print(f"user {name} removed: their certificate is refused from now on")
