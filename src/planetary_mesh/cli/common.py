"""Shared CLI plumbing: the client from --config, printing tables or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from planetary_mesh.client import Client
from planetary_mesh.units import format_duration

console = Console()
err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="MESH_CONFIG",
        help="Client config (client.toml). Default: ~/.config/planetary-mesh/client.toml.",
    ),
]
OutputOption = Annotated[OutputFormat, typer.Option("--output", "-o", help="table or json")]


def client_for(config: Path | None) -> Client:
    return Client.from_config(config)


def print_json(data: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    if isinstance(data, BaseModel):
        payload: Any = data.model_dump(mode="json")
    elif isinstance(data, dict):
        payload = data
    else:
        payload = [item.model_dump(mode="json") for item in data]
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    grid = Table(title=title, show_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*row)
    console.print(grid)


def relative_time(seconds: float) -> str:
    """A moment relative to now: ``in 5m00s`` ahead, ``2h03m ago`` behind."""
    if seconds >= 0:
        return "in " + format_duration(seconds)
    return format_duration(-seconds) + " ago"
