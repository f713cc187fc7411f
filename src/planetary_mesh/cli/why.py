"""`mesh why JOB [--task I]`: why a task is pending, or how it ended."""

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


def why(
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    task: Annotated[int, typer.Option("--task", help="Task index.")] = 0,
    config: ConfigOption = None,
    output: OutputOption = OutputFormat.TABLE,
) -> None:
    """A pending task: each node and why it is not chosen. An ended one: how it ended (exit
    code, signal, timeout, out of memory, node lost, cancelled by whom) and its last lines."""
    with client_for(config) as client:
        info = client.why(job_id, task)
    if output is OutputFormat.JSON:
        print_json(info)
        return
    print(f"task {info.job_id}[{info.index}] {info.summary}")
    if info.nodes:
        table(None, ["NODE", "NAME", "WHY"], [[n.node_id, n.name, n.reason] for n in info.nodes])
    for attempt in info.attempts if len(info.attempts) > 1 else []:
        print(f"  attempt {attempt.attempt} on {attempt.node}: {attempt.state}, {attempt.reason}")
    if info.output_tail:
        print("last lines of its output:")
        for line in info.output_tail.splitlines():
            print(f"  | {line}")
