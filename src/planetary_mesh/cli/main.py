"""The `mesh` command. Every command talks to the coordinator through the client library only;
`init`, `coordinator`, `agent` and `up` are the daemons and set-up steps around it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer

from planetary_mesh.cli import work
from planetary_mesh.cli.common import ConfigOption, client_for, err_console
from planetary_mesh.cli.events import events as events_command
from planetary_mesh.cli.nodes import nodes_app
from planetary_mesh.cli.tokens import token_app
from planetary_mesh.cli.users import users_app
from planetary_mesh.cli.why import why as why_command
from planetary_mesh.config import (
    DEFAULT_PORT,
    AgentPaths,
    CoordinatorPaths,
    default_data_dir,
    split_listen,
    user_config_path,
)
from planetary_mesh.errors import ConfigError, MeshError
from planetary_mesh.units import parse_duration, parse_size

if TYPE_CHECKING:
    from planetary_mesh.doctor import Subject

app = typer.Typer(
    name="mesh",
    help="Planetary Mesh: turn the idle machines of a home, lab or office into one computer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(token_app, name="token")
app.add_typer(users_app, name="users")
app.command("events")(events_command)
app.command("why")(why_command)
app.add_typer(nodes_app, name="nodes")
work.register(app)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Where this keeps its files.")]
DISCOVERY_SECONDS = 5.0  # how long a joining agent listens for its mesh's mDNS advertisement


def _daemon_logging() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # zeroconf warns, with a traceback, about every interface it cannot send multicast on (an
    # IPv6 one with no route, say); what discovery found or missed is said in our own words.
    logging.getLogger("zeroconf").setLevel(logging.ERROR)


def _coordinator_dirs(data_dir: Path | None) -> tuple[CoordinatorPaths, Path]:
    """The coordinator's folder and the client config that goes with it."""
    if data_dir is None:
        return CoordinatorPaths(default_data_dir("coordinator")), user_config_path()
    return CoordinatorPaths(data_dir), data_dir / "client.toml"


@app.command()
def init(
    data_dir: DataDir = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Name or IP agents and clients use to reach the coordinator."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="The mesh's name.")] = "mesh",
) -> None:
    """Make the mesh CA, the coordinator's certificate and an admin client config."""
    from planetary_mesh.coordinator.bootstrap import init_mesh

    paths, client_config = _coordinator_dirs(data_dir)
    init_mesh(paths, client_config, list(host or []), mesh_name=name)
    print(f"mesh created in {paths.root}")
    print(f"client config: {client_config}")
    print(f"next: mesh coordinator{f' --data-dir {data_dir}' if data_dir else ''}")


@app.command()
def dashboard(config: ConfigOption = None) -> None:
    """Print a one-time login link for a browser (no client certificate needed there)."""
    import time

    from planetary_mesh.units import format_duration

    with client_for(config) as client:
        link = client.login_link()
    print(link.url)
    left = format_duration(max(0.0, link.expires_at - time.time()))
    err_console.print(
        f"open it in a browser within {left}; it works once, then the browser stays signed in",
        highlight=False,
    )


@app.command("rotate-server-cert")
def rotate_server_cert(
    data_dir: DataDir = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Names and IPs for it (default: those of the current one)."),
    ] = None,
) -> None:
    """Give the coordinator a new server certificate; a running one serves it within seconds."""
    from planetary_mesh.coordinator.bootstrap import rotate_server_cert as rotate

    paths, _ = _coordinator_dirs(data_dir)
    made = rotate(paths, list(host or []))
    print(
        f"new server certificate (serial {made.serial:x}, valid until"
        f" {made.not_after:%Y-%m-%d}); a running coordinator serves it within seconds"
    )


@app.command()
def coordinator(
    data_dir: DataDir = None,
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to serve on.")
    ] = f"0.0.0.0:{DEFAULT_PORT}",
    heartbeat: Annotated[
        str, typer.Option("--heartbeat", help="Agents' heartbeat interval on a small mesh.")
    ] = "1s",
    lost_after: Annotated[
        str, typer.Option("--lost-after", help="Silence after which a node is lost.")
    ] = "4s",
    disconnect_grace: Annotated[
        str,
        typer.Option("--disconnect-grace", help="How long a closed session may come back."),
    ] = "500ms",
    restart_grace: Annotated[
        str,
        typer.Option("--restart-grace", help="After a restart, how long nodes have to return."),
    ] = "10s",
    retry_backoff: Annotated[
        str, typer.Option("--retry-backoff", help="First retry delay; it doubles each time.")
    ] = "1s",
    node_cert_lifetime: Annotated[
        str,
        typer.Option(
            "--node-cert-lifetime",
            help="How long an agent's certificate is valid; agents renew it on their own.",
        ),
    ] = "24h",
    no_mdns: Annotated[
        bool,
        typer.Option("--no-mdns", help="Do not advertise the mesh on the LAN (mDNS/DNS-SD)."),
    ] = False,
) -> None:
    """Serve the mesh API over HTTPS with client-certificate authentication."""
    from planetary_mesh.coordinator.server import serve
    from planetary_mesh.core.liveness import LivenessPolicy

    _daemon_logging()
    paths, client_config = _coordinator_dirs(data_dir)
    host, port = split_listen(listen)
    policy = LivenessPolicy(
        heartbeat_interval=parse_duration(heartbeat),
        lost_after_silence=parse_duration(lost_after),
        lost_after_disconnect=parse_duration(disconnect_grace),
        restart_grace=parse_duration(restart_grace),
    )
    backoff = (parse_duration(retry_backoff), 60.0)
    lifetime = timedelta(seconds=parse_duration(node_cert_lifetime))
    asyncio.run(
        serve(paths, host, port, client_config, policy, backoff, lifetime, mdns=not no_mdns)
    )


@app.command()
def agent(
    coordinator: Annotated[
        str | None, typer.Option("--coordinator", help="https://HOST:PORT of the coordinator.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="MESH_TOKEN", help="Join token (first start).")
    ] = None,
    data_dir: DataDir = None,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPUs to offer.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="Memory to offer.")] = None,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", help="GPUs to offer (default: the NVIDIA GPUs found)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Node name.")] = None,
    no_sandbox: Annotated[
        bool, typer.Option("--no-sandbox", help="Run tasks unsandboxed if bwrap is missing.")
    ] = False,
    task_disk: Annotated[
        str, typer.Option("--task-disk", help="Disk one task's work directory may use.")
    ] = "4G",
    task_log: Annotated[
        str, typer.Option("--task-log", help="Output one task attempt may keep; the rest is cut.")
    ] = "64M",
    warm_sandboxes: Annotated[
        str,
        typer.Option(
            "--warm-sandboxes",
            help="Reuse one sandbox for the tasks of a job: auto (jobs of several tasks),"
            " always, or off (a fresh sandbox for every task).",
        ),
    ] = "auto",
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="KEY=VALUE shown with the node (room=lab); repeatable."),
    ] = None,
) -> None:
    """Join a mesh (first start, with a token) and run the tasks it assigns."""
    import socket

    from planetary_mesh.agent import probe
    from planetary_mesh.agent.daemon import Agent
    from planetary_mesh.agent.join import find_and_join, join, joined_state
    from planetary_mesh.sandbox.runner import default_runner

    if warm_sandboxes not in ("auto", "always", "off"):
        raise ConfigError(f"bad --warm-sandboxes {warm_sandboxes!r}: use auto, always or off")
    labels = _parse_labels(label or [])
    _daemon_logging()
    disk = parse_size(task_disk)
    paths = AgentPaths(data_dir or default_data_dir("agent"))
    node_name = name or socket.gethostname()
    runner = default_runner(allow_unsandboxed=no_sandbox, warm=warm_sandboxes)
    state = joined_state(paths)
    if state is None:
        if not token:
            raise ConfigError(
                "this agent has not joined a mesh yet: pass --token TOKEN (make one with `mesh"
                " token create` on the coordinator), and --coordinator URL unless the"
                " coordinator is on this LAN (it is then found by mDNS)"
            )
        if coordinator:
            node_id = join(coordinator, token, node_name, paths)
        else:
            node_id = find_and_join(token, node_name, paths, DISCOVERY_SECONDS)
        err_console.print(f"joined the mesh as node {node_id}", highlight=False)
        state = joined_state(paths)
        assert state is not None
    offered_cpus = cpus if cpus is not None else probe.detect_cpus()
    if offered_cpus <= 0:
        raise ConfigError(f"bad --cpus {cpus}: it must be greater than zero")
    daemon = Agent(
        coordinator or state["coordinator"],
        paths,
        runner,
        name=node_name,
        cpus=offered_cpus,
        memory=parse_size(memory) if memory else probe.detect_memory(),
        task_disk=disk,
        task_log=parse_size(task_log),
        labels=labels,
        gpus=_offered_gpus(gpus, probe.detect_gpus()),
        # A --coordinator given now is checked by its address; a found one by the fixed name.
        server_name=None if coordinator else state.get("server_name"),
    )
    asyncio.run(daemon.run())


def _offered_gpus(asked: int | None, found: int) -> int:
    """The GPUs the agent offers: those found, or as many as --gpus says (devices 0..N-1)."""
    if asked is None:
        return found
    if asked < 0:
        raise ConfigError(f"bad --gpus {asked}: it must be 0 or more")
    if asked > found:
        logging.getLogger(__name__).warning(
            "offering %d GPUs (--gpus) where %d NVIDIA GPUs were found: tasks get devices"
            " 0..%d, whether or not the sandbox has their device files",
            asked,
            found,
            asked - 1,
        )
    return asked


def _parse_labels(given: list[str]) -> dict[str, str]:
    from planetary_mesh.protocol import LABEL_KEY, MAX_LABELS

    labels: dict[str, str] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not LABEL_KEY.match(key) or len(value) > 128:
            raise ConfigError(
                f"bad --label {item!r}: write KEY=VALUE, KEY of letters, digits, . _ / -"
                " (at most 63), VALUE at most 128 characters"
            )
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"too many --label options: at most {MAX_LABELS}")
    return labels


@app.command()
def doctor(
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="MESH_TOKEN", help="A join token: look for its mesh."),
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option("--coordinator", help="https://HOST:PORT to try.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="An agent's data dir: check its mesh.")
    ] = None,
    config: ConfigOption = None,
    seconds: Annotated[float, typer.Option("--seconds", help="How long to listen for mDNS.")] = 3,
) -> None:
    """Say what this machine sees of its mesh and why joining or connecting fails."""
    from planetary_mesh.doctor import examine

    findings = examine(_doctor_subject(token, coordinator, data_dir, config), seconds)
    for finding in findings:
        mark = "[green]ok[/]" if finding.ok else "[red]PROBLEM[/]"
        # One finding, one line (soft wrap): a terminal wraps it; a log or grep sees it whole.
        line = f"{mark} {finding.check}: {finding.seen}"
        err_console.print(line, highlight=False, soft_wrap=True)
        if not finding.ok and finding.fix:
            err_console.print(f"   what to do: {finding.fix}", highlight=False, soft_wrap=True)
    if not all(f.ok for f in findings):
        raise typer.Exit(1)


def _doctor_subject(
    token: str | None, coordinator: str | None, data_dir: Path | None, config: Path | None
) -> Subject:
    """What `mesh doctor` looks for: a token's mesh, an agent's, or a client config's."""
    from planetary_mesh.agent.join import joined_state
    from planetary_mesh.config import FIND_BY_MDNS, load_client_config
    from planetary_mesh.doctor import Subject
    from planetary_mesh.pki import certs, tokens

    if token:
        return Subject(tokens.parse_join_token(token).ca_hash, coordinator=coordinator)
    if data_dir is not None:
        paths = AgentPaths(data_dir)
        state = joined_state(paths)
        if state is None:
            raise ConfigError(f"no joined agent in {data_dir}: pass --token to check a join")
        ca_pem = paths.ca_cert.read_bytes()
        return Subject(
            certs.ca_fingerprint(certs.load_cert_pem(ca_pem)),
            ca_pem,
            coordinator or state["coordinator"],
            paths.cert,
        )
    loaded = load_client_config(config)
    ca_pem = loaded.ca.read_bytes()
    given = coordinator or (None if loaded.coordinator == FIND_BY_MDNS else loaded.coordinator)
    return Subject(certs.ca_fingerprint(certs.load_cert_pem(ca_pem)), ca_pem, given, loaded.cert)


@app.command()
def up(
    agents: Annotated[int, typer.Option("--agents", help="How many local agents.")] = 3,
    data_dir: DataDir = None,
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT.")
    ] = f"127.0.0.1:{DEFAULT_PORT}",
    agent_cpus: Annotated[
        float | None, typer.Option("--agent-cpus", help="CPUs each agent offers.")
    ] = None,
) -> None:
    """Start a coordinator and N agents on this machine; Ctrl-C stops them all."""
    from planetary_mesh.testing import LocalMesh

    if agents < 1:
        raise ConfigError(f"bad --agents {agents}: it must be at least 1")
    root = data_dir or default_data_dir("local")
    mesh = LocalMesh(root, agents=agents, listen=listen, agent_cpus=agent_cpus)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh.start()
    try:
        if data_dir is None:
            _link_user_config(mesh.client_config)
        print(f"coordinator   {mesh.url}")
        print(f"agents        {agents} (data and logs under {root})")
        print(f"client config {mesh.client_config}")
        if data_dir is not None:
            print(f"try:          MESH_CONFIG={mesh.client_config} mesh run -- echo hello")
        else:
            print("try:          mesh run -- echo hello")
        print("Ctrl-C stops everything.", flush=True)
        stop.wait()
    finally:
        print("stopping...", flush=True)
        mesh.stop()


def _link_user_config(client_config: Path) -> None:
    """Point the user's own client config at the local mesh, so plain `mesh run` finds it."""
    from planetary_mesh.config import load_client_config, write_client_config

    local = load_client_config(client_config)
    write_client_config(user_config_path(), local.coordinator, local.ca, local.cert, local.key)


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except MeshError as exc:
        err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
