"""Run the coordinator: open the store, bind the one HTTPS port, serve until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
from datetime import timedelta
from pathlib import Path

import uvicorn

from planetary_mesh import __version__
from planetary_mesh.config import CoordinatorPaths, read_toml, write_client_config
from planetary_mesh.coordinator.app import create_app
from planetary_mesh.coordinator.bootstrap import coordinator_url, ensure_coordinator_name
from planetary_mesh.coordinator.peer_cert import PeerCertHttpProtocol, PeerCertWebSocketProtocol
from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.core.liveness import LivenessPolicy
from planetary_mesh.discovery import Advertiser, advertised_addresses
from planetary_mesh.errors import ConfigError, DiscoveryError
from planetary_mesh.pki import certs, tls
from planetary_mesh.protocol import MAX_REQUEST_BYTES
from planetary_mesh.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)

SERVER_CERT_POLL_S = 1.0
ADDRESS_POLL_S = 2.0  # how often the advertised addresses are checked against the machine's
# Collect young garbage every 50,000 allocations (not 700) and look at the oldest generation
# 20 x 100 times less often than that. With 1,000 agent sessions the heap holds a few hundred
# thousand long-lived objects, and CPython's default full collections (every ~0.5 s under
# heartbeat traffic) stopped the event loop for ~190 ms each: the scheduling p99 went from
# 24 ms to 200 ms (bench/scale.py). Reference counting still frees all acyclic garbage at once.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Fewer, later cyclic-garbage collections, and none over what start-up built."""
    gc.collect()
    gc.freeze()  # modules, the app, the store: never garbage, never scanned again
    gc.set_threshold(*GC_THRESHOLDS)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets whose proto says TCP, and accepted sockets inherit the listener's. With Nagle on,
    # every response whose headers and body leave in two writes waited 40 ms for the client's
    # delayed ACK: 44 ms a request instead of a fraction of one.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}; pick another with --listen"
        ) from exc
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def public_url(paths: CoordinatorPaths, listen_host: str, port: int) -> str:
    """The address clients should use: the listen host, or the first certified host."""
    if listen_host not in ("0.0.0.0", "::"):
        return coordinator_url(listen_host, port)
    hosts = read_toml(paths.settings).get("hosts") if paths.settings.exists() else None
    first = hosts[0] if isinstance(hosts, list) and hosts else "localhost"
    return coordinator_url(str(first), port)


async def _announce_when_started(server: uvicorn.Server, paths: CoordinatorPaths, url: str) -> None:
    """Write the URL file only once uvicorn serves (and handles SIGTERM cleanly)."""
    while not server.started:
        await asyncio.sleep(0.01)
    tmp = paths.url_file.with_suffix(".tmp")
    tmp.write_text(url + "\n")
    tmp.replace(paths.url_file)
    log.warning("coordinator listening on %s (data in %s)", url, paths.root)


async def serve(
    paths: CoordinatorPaths,
    host: str,
    port: int,
    client_config: Path | None,
    policy: LivenessPolicy | None = None,
    retry_backoff: tuple[float, float] = (1.0, 60.0),
    node_cert_lifetime: timedelta = timedelta(hours=24),
    mdns: bool = True,
) -> None:
    if not paths.ca_key.exists():
        raise ConfigError(f"no mesh in {paths.root}: run `mesh init --data-dir {paths.root}` first")
    if ensure_coordinator_name(paths):
        log.warning("re-issued the server certificate: it now also names the coordinator for"
                    " clients that find it by mDNS")  # fmt: skip
    ca_cert = certs.load_cert_pem(paths.ca_cert.read_bytes())
    ca_key = certs.load_key_pem(paths.ca_key.read_bytes())
    store = SQLiteStore(paths.database)
    service = CoordinatorService(
        store,
        ca_cert,
        ca_key,
        policy=policy,
        retry_backoff=retry_backoff,
        node_cert_lifetime=node_cert_lifetime,
    )
    if paths.admin_cert.exists():  # `mesh init`'s admin, listed with the users made later
        service.register_user(certs.load_cert_pem(paths.admin_cert.read_bytes()), "mesh init")
    app = create_app(service)
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=PeerCertHttpProtocol,
        ws=PeerCertWebSocketProtocol,
        ws_max_size=MAX_REQUEST_BYTES,
        # On a LAN, compressing the session's small messages costs more CPU than the bytes it
        # saves: ~0.1 ms a message each way (ADR 2).
        ws_per_message_deflate=False,
        ws_ping_interval=5.0,
        ws_ping_timeout=10.0,
        log_level="warning",
        access_log=False,
        # No proxy in front: X-Forwarded-* headers are a client's say-so, and reading them is a
        # middleware layer on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=2,
    )
    config.load()
    # Our own context: client certificates are optional at the TLS layer (for /healthz and
    # joining) and required by the app everywhere else.
    config.ssl = tls.server_ssl_context(paths.ca_cert, paths.server_cert, paths.server_key)
    reloader = asyncio.create_task(_reload_server_cert(config.ssl, paths))
    server = uvicorn.Server(config)
    tune_gc()
    url = public_url(paths, host, actual_port)
    if client_config is not None and client_config.exists():
        write_client_config(client_config, url, paths.ca_cert, paths.admin_cert, paths.admin_key)
    scheduler = asyncio.create_task(service.run_scheduler())
    liveness = asyncio.create_task(service.run_liveness())
    announcer = asyncio.create_task(_announce_when_started(server, paths, url))
    # In the background: registering waits out mDNS probing (~2 s), serving must not.
    advertising = (
        asyncio.create_task(_advertise(paths, service.ca_hash, host, actual_port)) if mdns else None
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in (scheduler, liveness, announcer, reloader, advertising):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        paths.url_file.unlink(missing_ok=True)
        store.close()
        sock.close()


async def _advertise(paths: CoordinatorPaths, ca_hash: str, host: str, port: int) -> None:
    """Advertise the mesh on the LAN (ADR 13) until cancelled, following this machine's
    addresses; if it cannot, the coordinator still serves, and agents need --coordinator."""
    addresses = advertised_addresses(host)
    if not addresses:
        log.info("not advertising over mDNS: listening on loopback only")
        return
    settings = read_toml(paths.settings) if paths.settings.exists() else {}
    name = str(settings.get("mesh_name", "mesh"))
    advertiser = Advertiser(name, ca_hash, __version__, port, addresses)
    try:
        await advertiser.start()
    except DiscoveryError as exc:
        log.warning("%s", exc)
        return
    log.warning(
        "advertising the mesh over mDNS on %s (turn off with --no-mdns)",
        ", ".join(advertiser.addresses),
    )
    try:
        await _follow_addresses(advertiser, host)
    finally:
        await advertiser.stop()  # says goodbye on the LAN


async def _follow_addresses(advertiser: Advertiser, host: str) -> None:
    """Keep the advertisement true when this machine's addresses change (DHCP)."""
    while True:
        await asyncio.sleep(ADDRESS_POLL_S)
        now = advertised_addresses(host)
        if now and now != advertiser.addresses:
            try:
                await advertiser.update(now)
            except Exception as exc:  # zeroconf's own errors; the next poll tries again
                log.warning("could not update the mDNS advertisement: %s", exc)
                continue
            log.warning("this machine's addresses changed: now advertising %s", ", ".join(now))


async def _reload_server_cert(context: ssl.SSLContext, paths: CoordinatorPaths) -> None:
    """Serve a rotated server certificate (`mesh rotate-server-cert`) without a restart: new
    handshakes use it, open connections go on. Checked every SERVER_CERT_POLL_S."""
    seen = paths.server_cert.stat().st_mtime_ns
    while True:
        await asyncio.sleep(SERVER_CERT_POLL_S)
        try:
            changed = paths.server_cert.stat().st_mtime_ns
            if changed == seen:
                continue
            context.load_cert_chain(paths.server_cert, paths.server_key)
        except (OSError, ssl.SSLError) as exc:  # mid-write, or a mismatched pair: next time
            log.warning("could not load the new server certificate yet: %s", exc)
            continue
        seen = changed
        served = certs.load_cert_pem(paths.server_cert.read_bytes())
        log.warning(
            "now serving a new server certificate (serial %x, valid until %s)",
            served.serial_number,
            served.not_valid_after_utc,
        )
