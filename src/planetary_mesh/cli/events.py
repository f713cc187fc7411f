"""`mesh events`: what happened in the mesh, oldest first, and with -f as it happens."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated

import typer

from planetary_mesh.cli.common import (
    ConfigOption,
    OutputFormat,
    OutputOption,
    client_for,
)
from planetary_mesh.protocol import EventInfo

FOLLOW_POLL_S = 0.5


def _line(event: EventInfo) -> str:
    when = datetime.fromtimestamp(event.time).strftime("%Y-%m-%d %H:%M:%S")
    return f"{when}  {event.kind:<15} {event.message}"


def events(
    job: Annotated[str | None, typer.Option("--job", help="Only this job's events.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    last: Annotated[int, typer.Option("--last", help="How many past events to show first.")] = 50,
    config: ConfigOption = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """Job, task and node events: submitted, placed, started, ended (with why), node suspect,
    lost, back, removed, tasks handed back, drained. Kept in the store: they survive restarts."""
    with client_for(config) as client:
        after = 0
        found: list[EventInfo] = []
        while batch := client.events(after, job=job, limit=1000):  # to the newest, then the tail
            found = (found + batch)[-max(last, 0) :] if last else []
            after = batch[-1].seq
        _show(found, output)
        while follow:
            time.sleep(FOLLOW_POLL_S)
            batch = client.events(after, job=job, limit=1000)
            if batch:
                after = batch[-1].seq
                _show(batch, output)


def _show(found: list[EventInfo], output: OutputFormat) -> None:
    if output is OutputFormat.JSON:
        for event in found:  # one object a line, so -f output streams
            print(json.dumps(event.model_dump(mode="json")), flush=True)
        return
    for event in found:
        print(_line(event), flush=True)
