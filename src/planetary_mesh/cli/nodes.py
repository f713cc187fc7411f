"""`mesh nodes`: list the mesh's machines; drain, undrain and remove them."""

from __future__ import annotations

from typing import Annotated

import typer

from planetary_mesh.cli.common import (
    ConfigOption,
    OutputFormat,
    OutputOption,
    client_for,
    print_json,
    table,
)
from planetary_mesh.client import Client
from planetary_mesh.errors import NotFound
from planetary_mesh.units import format_duration, format_size, parse_duration

nodes_app = typer.Typer(
    help="List the mesh's nodes; drain, undrain or remove one.", invoke_without_command=True
)
NodeArg = Annotated[str, typer.Argument(metavar="NODE", help="Node id or name.")]


@nodes_app.callback()
def nodes(
    ctx: typer.Context, config: ConfigOption = None, output: OutputOption = OutputFormat.TABLE
) -> None:
    """List the mesh's nodes with their state and resources."""
    if ctx.invoked_subcommand is not None:
        return
    with client_for(config) as client:
        found = client.nodes()
    if output is OutputFormat.JSON:
        print_json(found)
        return
    table(
        None,
        ["ID", "NAME", "STATE", "CPUS", "MEMORY", "GPUS", "RUNNING", "SANDBOX"],
        [
            [
                n.id,
                n.name,
                n.state,
                f"{n.used_cpus:g}/{n.cpus:g}",
                f"{format_size(n.used_memory)}/{format_size(n.memory)}",
                f"{n.used_gpus}/{n.gpus}" if n.gpus else "-",
                str(n.running),
                n.sandbox or "-",
            ]
            for n in found
        ],
    )


def _resolve(client: Client, node: str) -> str:
    """A node id from an id or a unique name."""
    found = client.nodes()
    if any(n.id == node for n in found):
        return node
    named = [n.id for n in found if n.name == node]
    if len(named) == 1:
        return named[0]
    if named:
        raise NotFound(f"{len(named)} nodes are named {node!r}: use the id ({', '.join(named)})")
    raise NotFound(f"no node {node!r}: `mesh nodes` lists the nodes of this mesh")


@nodes_app.command()
def drain(
    node: NodeArg,
    deadline: Annotated[
        str | None,
        typer.Option("--deadline", help="Hand back what still runs after this long, e.g. 10m."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Stop new work on a node; running tasks finish (or are handed back at the deadline)."""
    seconds = parse_duration(deadline) if deadline else None
    with client_for(config) as client:
        info = client.drain(_resolve(client, node), seconds)
    after = f"; what still runs in {format_duration(seconds)} is handed back" if seconds else ""
    print(f"node {info.id} ({info.name}) is {info.state}: it takes no new work{after}")


@nodes_app.command()
def undrain(node: NodeArg, config: ConfigOption = None) -> None:
    """Let a drained node take work again."""
    with client_for(config) as client:
        info = client.undrain(_resolve(client, node))
    print(f"node {info.id} ({info.name}) is {info.state}")


@nodes_app.command()
def remove(node: NodeArg, config: ConfigOption = None) -> None:
    """Take a node out of the mesh: its certificate is refused from now on, its tasks move."""
    with client_for(config) as client:
        removed = client.remove_node(_resolve(client, node))
    print(
        f"node {removed.id} removed; {removed.requeued} tasks back in the queue. Its certificate"
        " is refused from now on: to bring the machine back, start its agent with a new data"
        " dir and a new token (`mesh token create`)."
    )
