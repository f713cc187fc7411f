"""Commands that submit and watch work: run, submit, jobs, status, logs, cancel, get, nodes."""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from planetary_mesh.cli.common import (
    ConfigOption,
    OutputFormat,
    OutputOption,
    client_for,
    console,
    err_console,
    print_json,
    table,
)
from planetary_mesh.client import Client
from planetary_mesh.errors import ConfigError, NotFound
from planetary_mesh.protocol import AttemptInfo, JobInfo, JobSubmit, TaskInfo
from planetary_mesh.units import format_duration, parse_duration, parse_size

POLL_INTERVAL = 0.2
_ENDED_JOB = {"succeeded", "failed", "cancelled"}

Cpus = Annotated[float, typer.Option("--cpus", help="CPUs each task needs.")]
Memory = Annotated[str, typer.Option("--memory", help="Memory each task needs, e.g. 512M, 2G.")]
Timeout = Annotated[
    str | None, typer.Option("--timeout", help="Wall-clock limit per task, e.g. 30s, 5m.")
]
Retries = Annotated[int, typer.Option("--retries", help="Retries after a failed attempt.")]
Array = Annotated[int, typer.Option("--array", help="Run N tasks (MESH_TASK_INDEX 0..N-1).")]
Env = Annotated[list[str] | None, typer.Option("--env", help="K=V for the task; repeatable.")]
Files = Annotated[
    list[Path] | None, typer.Option("--file", help="Input file put in each task's directory.")
]
Outputs = Annotated[
    list[str] | None, typer.Option("--output", help="Glob of result files to collect back.")
]
Name = Annotated[str | None, typer.Option("--name", help="Job name (default: the command).")]
Priority = Annotated[int, typer.Option("--priority", help="Higher runs first.")]
Network = Annotated[bool, typer.Option("--network", help="Let tasks use the network.")]
Gpus = Annotated[int, typer.Option("--gpus", help="Whole GPUs each task needs.")]
Command = Annotated[list[str], typer.Argument(help="The command and its arguments, after --.")]


def build_submit(
    command: list[str],
    cpus: float,
    memory: str,
    timeout: str | None,
    retries: int,
    array: int,
    env: list[str] | None,
    files: list[Path] | None,
    outputs: list[str] | None,
    name: str | None,
    priority: int,
    network: bool,
    gpus: int = 0,
) -> JobSubmit:
    environment = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad --env {item!r}: write KEY=VALUE")
        environment[key] = value
    contents = {}
    for path in files or []:
        try:
            contents[path.name] = base64.b64encode(path.read_bytes()).decode()
        except OSError as exc:
            raise ConfigError(f"cannot read --file {path}: {exc.strerror}") from exc
    if array < 1:
        raise ConfigError(f"bad --array {array}: it must be at least 1")
    from pydantic import ValidationError

    try:
        return JobSubmit(
            name=name or " ".join(command)[:128] or "job",
            argv=command,
            env=environment,
            files=contents,
            outputs=outputs or [],
            cpus=cpus,
            memory=parse_size(memory),
            timeout=parse_duration(timeout) if timeout else None,
            retries=retries,
            count=array,
            priority=priority,
            network=network,
            gpus=gpus,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"bad job: {where}: {first['msg']}") from None


def register(app: typer.Typer) -> None:
    def run_or_submit(
        ctx: typer.Context,
        command: Command,
        cpus: Cpus = 1.0,
        memory: Memory = "256M",
        timeout: Timeout = None,
        retries: Retries = 0,
        array: Array = 1,
        env: Env = None,
        file: Files = None,
        output: Outputs = None,
        name: Name = None,
        priority: Priority = 0,
        network: Network = False,
        gpus: Gpus = 0,
        config: ConfigOption = None,
    ) -> None:
        # One function behind both commands: they take the same options and differ only in
        # whether they wait for the job.
        body = build_submit(
            command, cpus, memory, timeout, retries, array, env, file, output, name, priority,
            network, gpus,
        )  # fmt: skip
        with client_for(config) as client:
            job = client.submit(body)
            if ctx.info_name == "submit":
                print(job.id)
                return
            err_console.print(
                f"job {job.id} submitted ({job.tasks['total']} tasks)", highlight=False
            )
            final = follow_job(client, job)
        raise typer.Exit(job_exit_code(final))

    no_interspersed = {"allow_interspersed_args": False}
    app.command(
        "run",
        context_settings=no_interspersed,
        help="Run a command on the mesh, show progress and output, exit with its exit code.",
    )(run_or_submit)
    app.command(
        "submit", context_settings=no_interspersed, help="Submit a command and print the job id."
    )(run_or_submit)

    @app.command()
    def jobs(config: ConfigOption = None, output: OutputOption = OutputFormat.TABLE) -> None:
        """List jobs, newest first."""
        with client_for(config) as client:
            found = client.jobs()
        if output is OutputFormat.JSON:
            print_json(found)
            return
        table(
            None,
            ["ID", "NAME", "OWNER", "STATE", "TASKS", "AGE"],
            [
                [
                    j.id,
                    j.name[:40],
                    j.owner,
                    j.state,
                    _counts(j),
                    format_duration(time.time() - j.created_at),
                ]
                for j in found
            ],
        )

    @app.command()
    def status(
        job_id: Annotated[str, typer.Argument(metavar="JOB")],
        config: ConfigOption = None,
        output: OutputOption = OutputFormat.TABLE,
    ) -> None:
        """A job's state and each task's state, node, attempts and end reason."""
        with client_for(config) as client:
            job = client.job(job_id)
        if output is OutputFormat.JSON:
            print_json(job)
            return
        console.print(
            f"job {job.id} [bold]{job.state}[/bold]  {job.name}  owner {job.owner}  {_counts(job)}",
            highlight=False,
        )
        table(
            None,
            ["TASK", "STATE", "NODE", "ATTEMPTS", "EXIT", "DURATION", "REASON"],
            [
                [
                    str(t.index),
                    t.state,
                    t.node or "-",
                    str(t.attempts),
                    "-" if t.exit_code is None else str(t.exit_code),
                    format_duration(t.ended_at - t.started_at)
                    if t.ended_at and t.started_at
                    else "-",
                    t.reason or "",
                ]
                for t in job.task_list or []
            ],
        )
        # Tasks that needed more than one try, or got a late result, show every attempt.
        retried = [
            t for t in job.task_list or [] if len(t.history or []) > 1 or _late(t.history or [])
        ]
        if retried:
            table(
                "attempts",
                ["TASK", "#", "NODE", "STATE", "EXIT", "REASON"],
                [
                    [
                        str(t.index),
                        str(a.attempt),
                        a.node,
                        a.state,
                        "-" if a.exit_code is None else str(a.exit_code),
                        (a.reason or "")
                        + (f"; late result: {a.late_result}" if a.late_result else ""),
                    ]
                    for t in retried
                    for a in t.history or []
                ],
            )

    @app.command()
    def logs(
        job_id: Annotated[str, typer.Argument(metavar="JOB")],
        task: Annotated[int, typer.Option("--task", help="Task index.")] = 0,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
        config: ConfigOption = None,
    ) -> None:
        """Print a task's output (stdout and stderr together)."""
        with client_for(config) as client:
            if follow:
                follow_task(client, job_id, task)
                return
            chunk = client.logs(job_id, task)
            while True:
                sys.stdout.buffer.write(base64.b64decode(chunk.data))
                if chunk.next_offset == chunk.offset:
                    break
                chunk = client.logs(job_id, task, chunk.next_offset, chunk.attempt)
            sys.stdout.flush()

    @app.command()
    def cancel(
        job_id: Annotated[str, typer.Argument(metavar="JOB")], config: ConfigOption = None
    ) -> None:
        """Cancel a job: pending tasks never start, running ones are killed."""
        with client_for(config) as client:
            job = client.cancel(job_id)
        print(f"job {job.id} {job.state}")

    @app.command()
    def get(
        job_id: Annotated[str, typer.Argument(metavar="JOB")],
        task: Annotated[int | None, typer.Option("--task", help="Only this task.")] = None,
        directory: Annotated[Path, typer.Option("--dir", "-d", help="Where to write.")] = Path("."),
        config: ConfigOption = None,
    ) -> None:
        """Download the output files a job's tasks produced."""
        with client_for(config) as client:
            job = client.job(job_id)
            indexes = [task] if task is not None else range(job.tasks["total"])
            written = 0
            for index in indexes:
                target = (
                    directory
                    if task is not None or job.tasks["total"] == 1
                    else (directory / str(index))
                )
                for name, data in client.outputs(job_id, index).items():
                    path = target / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    written += 1
        err_console.print(f"{written} files written under {directory}", highlight=False)


def _late(history: list[AttemptInfo]) -> bool:
    return any(a.late_result for a in history)


def _counts(job: JobInfo) -> str:
    parts = [f"{n} {state}" for state, n in job.tasks.items() if state != "total" and n]
    return f"{job.tasks['total']} tasks: " + ", ".join(parts)


def follow_job(client: Client, job: JobInfo) -> JobInfo:
    """Stream output and show progress until the job ends; the final job."""
    total = job.tasks["total"]
    if total == 1:
        return _follow_single(client, job)
    printed: set[int] = set()
    interactive = sys.stderr.isatty()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not interactive,
    )
    last_line = ""
    with progress:
        bar = progress.add_task(job.id, total=total, detail="")
        while True:
            job = client.job(job.id)
            ended = [t for t in job.task_list or [] if t.state in _ENDED_JOB]
            for t in sorted(ended, key=lambda t: t.index):
                if t.index in printed:
                    continue
                printed.add(t.index)
                text = _all_output(client, job.id, t.index)
                for line in text.splitlines():
                    if interactive:
                        progress.console.print(f"[{t.index}] {line}", markup=False, highlight=False)
                    else:
                        print(f"[{t.index}] {line}")
                if t.state != "succeeded":
                    err_console.print(f"task {t.index} {t.state}: {t.reason}", highlight=False)
            done = len(ended)
            detail = f"{job.tasks['running']} running, {job.tasks['failed']} failed"
            progress.update(bar, completed=done, detail=detail)
            line = f"{job.id}: {done}/{total} done, {detail}"
            if not interactive and line != last_line:
                print(line, file=sys.stderr)
                last_line = line
            if job.state in _ENDED_JOB:
                return job
            time.sleep(POLL_INTERVAL)


def _all_output(client: Client, job_id: str, index: int) -> str:
    data = bytearray()
    offset = 0
    while True:
        chunk = client.logs(job_id, index, offset)
        data += base64.b64decode(chunk.data)
        if chunk.next_offset == offset:
            return data.decode(errors="replace")
        offset = chunk.next_offset


def follow_task(client: Client, job_id: str, index: int) -> None:
    """Print a task's output as it comes until the task ends, following retries."""
    offset, attempt = 0, None
    while True:
        chunk = client.logs(job_id, index, offset, attempt)
        if attempt is None and chunk.attempt > 0:
            attempt = chunk.attempt
        sys.stdout.buffer.write(base64.b64decode(chunk.data))
        sys.stdout.flush()
        offset = chunk.next_offset
        if chunk.next_offset > chunk.offset:
            continue  # more may be waiting: read on before asking about the task
        if chunk.ended:
            task = _task(client, job_id, index)
            if task.state in _ENDED_JOB:
                return  # output is committed before the end it precedes: nothing is missing
            if task.attempts != attempt:
                attempt, offset = task.attempts, 0  # a retry: follow the new attempt
                err_console.print(f"task {index}: attempt {attempt}", highlight=False)
                continue
        time.sleep(POLL_INTERVAL)


def _task(client: Client, job_id: str, index: int) -> TaskInfo:
    job = client.job(job_id)
    for task in job.task_list or []:
        if task.index == index:
            return task
    raise NotFound(f"job {job_id} has no task {index}")


def _follow_single(client: Client, job: JobInfo) -> JobInfo:
    follow_task(client, job.id, 0)
    final = client.job(job.id)
    task = final.task_list[0] if final.task_list else None
    if task is not None and task.state != "succeeded":
        err_console.print(f"task 0 {task.state}: {task.reason}", highlight=False)
    return final


def job_exit_code(job: JobInfo) -> int:
    tasks = job.task_list or []
    if job.tasks["total"] == 1 and tasks:
        task = tasks[0]
        if task.state == "succeeded":
            return 0
        if task.exit_code is not None and task.exit_code > 0:
            return task.exit_code
        return 1
    return 0 if job.state == "succeeded" else 1
