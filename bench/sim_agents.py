"""Simulated agents for the scale scenario: many real agent sessions in one process.

Each simulated node joins with the token (its own key and certificate, as `mesh agent` does),
opens its own mutually authenticated WebSocket session, says hello, and heartbeats at the
interval the coordinator sets. Assigned tasks "run" at once: a report with their start and end
goes back straight away. The time each job's first assignment arrived is written to ``--out``
when the process is told to stop (SIGTERM), for the driver's scheduling latency.

    python -m bench.sim_agents --coordinator URL --token T --dir D --first 0 --count 250 --out F
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from planetary_mesh import __version__
from planetary_mesh.agent.join import join
from planetary_mesh.config import AgentPaths
from planetary_mesh.pki import tls
from planetary_mesh.protocol import MAX_REQUEST_BYTES

OPENING_AT_ONCE = 25  # sessions opened concurrently (each is a TLS handshake)


class SimulatedNode:
    def __init__(self, name: str, context: ssl.SSLContext, arrivals: dict[str, float]) -> None:
        self.name = name
        self.context = context
        self.arrivals = arrivals
        self.interval = 1.0
        self.seq = 0
        self.opened = asyncio.Event()

    async def run(self, url: str, opening: asyncio.Semaphore) -> None:
        async with opening:
            ws = await connect(
                url,
                ssl=self.context,
                max_size=MAX_REQUEST_BYTES,
                ping_interval=5,  # as the real agent does
                ping_timeout=10,
                open_timeout=60,
            )
            hello = {
                "type": "hello",
                "name": self.name,
                "cpus": 1.0,
                "memory": 1024**3,
                "sandbox": "simulated",
                "version": __version__,
                "held": [],
            }
            await ws.send(json.dumps(hello))
        self.opened.set()
        async with ws:
            beating = asyncio.create_task(self._beat(ws))
            try:
                async for raw in ws:
                    await self._handle(ws, json.loads(raw))
            finally:
                beating.cancel()

    async def _beat(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await ws.send('{"type": "heartbeat"}')

    async def _handle(self, ws: ClientConnection, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("welcome", "timing"):
            self.interval = float(message["heartbeat_interval"])
        elif kind == "assign":
            now = time.time()
            events: list[dict[str, Any]] = []
            for task_id, attempt, epoch, job_id, _index in message["tasks"]:
                self.arrivals.setdefault(job_id, now)
                ref = [task_id, attempt, epoch]
                events.append({"kind": "started", "task": ref})
                events.append(
                    {
                        "kind": "ended",
                        "task": ref,
                        "end": "exited",
                        "exit_code": 0,
                        "signal": None,
                        "message": "exit code 0",
                    }
                )
            self.seq += 1
            await ws.send(json.dumps({"type": "report", "seq": self.seq, "events": events}))


async def main_async(args: argparse.Namespace) -> None:
    base = args.coordinator.rstrip("/")
    url = base.replace("https://", "wss://", 1) + "/v1/agent/session"
    arrivals: dict[str, float] = {}
    nodes = []
    for i in range(args.first, args.first + args.count):
        paths = AgentPaths(args.dir / f"sim-{i}")
        name = f"sim-{i}"
        await asyncio.to_thread(join, base, args.token, name, paths)
        context = tls.client_ssl_context(paths.ca_cert.read_bytes(), paths.cert, paths.key)
        nodes.append(SimulatedNode(name, context, arrivals))
    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    sessions = [asyncio.create_task(node.run(url, opening)) for node in nodes]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    all_open: asyncio.Future[list[bool]] = asyncio.ensure_future(
        asyncio.gather(*(n.opened.wait() for n in nodes))
    )
    watched: list[asyncio.Future[Any]] = [all_open, *sessions]
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    if not all_open.done():  # a session failed before every one was open
        failed = next(t for t in sessions if t.done())
        raise SystemExit(f"a simulated session could not open: {failed.exception()!r}")
    print(f"OPEN {len(nodes)}", flush=True)
    await stop.wait()
    ended = [t for t in sessions if t.done()]
    for task in ended:
        print(f"a simulated session ended early: {task.exception()!r}", file=sys.stderr)
    for task in sessions:
        task.cancel()
    args.out.write_text(json.dumps({"arrivals": arrivals, "sessions_ended_early": len(ended)}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_agents")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
