"""`mesh token`: make, list and revoke the join tokens new agents join with."""

from __future__ import annotations

import sys
import time
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
from planetary_mesh.errors import ConfigError
from planetary_mesh.units import parse_duration

token_app = typer.Typer(help="Join tokens for new agents.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    ttl: Annotated[str, typer.Option("--ttl", help="How long it stays valid.")] = "1h",
    uses: Annotated[int, typer.Option("--uses", help="How many agents may join with it.")] = 1,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="Any number of uses.")] = False,
    config: ConfigOption = None,
) -> None:
    """Print a join token: PMTKN-1-<CA hash>-<secret>. Its id goes to stderr."""
    if uses < 1:
        raise ConfigError(f"bad --uses {uses}: it must be at least 1 (or use --unlimited)")
    with client_for(config) as client:
        made = client.new_token(parse_duration(ttl), None if unlimited else uses)
    print(made.token)
    print(f"token id {made.id} (`mesh token revoke {made.id}` to withdraw it)", file=sys.stderr)


@token_app.command("list")
def token_list(config: ConfigOption = None, output: OutputOption = OutputFormat.TABLE) -> None:
    """Every join token with its state (active, expired, used up, revoked); never the secret."""
    with client_for(config) as client:
        found = client.tokens()
    if output is OutputFormat.JSON:
        print_json(found)
        return
    now = time.time()
    table(
        None,
        ["ID", "STATE", "USES LEFT", "EXPIRES", "CREATED"],
        [
            [
                t.id,
                t.state,
                "unlimited" if t.uses_left is None else str(t.uses_left),
                relative_time(t.expires_at - now),
                relative_time(t.created_at - now),
            ]
            for t in found
        ],
    )


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The id `mesh token list` shows.")],
    config: ConfigOption = None,
) -> None:
    """Refuse a join token from now on. Agents that joined with it stay joined."""
    with client_for(config) as client:
        revoked = client.revoke_token(token_id)
    print(f"token {revoked.id} revoked")
