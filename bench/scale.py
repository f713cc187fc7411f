"""The scale scenario (mesh only): one coordinator, 1,000 simulated agents.

The agents are simulated in a few processes (bench/sim_agents.py), but each holds a real
authenticated session: it joined with a token, has its own certificate, speaks the agent
protocol over mutual TLS and heartbeats at the rate the coordinator sets (which stretches with
the mesh's size). Measured: the coordinator's CPU share (of one core) while they only
heartbeat, and while one-task jobs are submitted one after another; and the scheduling latency
of those jobs, from just before the submit call to the assignment's arrival at an agent (so the
HTTP round trip of the submit is counted too).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.common import percentile, wait_until
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

PROCESSES = 4  # simulator processes the agents are spread over
OPEN_TIMEOUT = 600.0  # joining and opening 1,000 sessions, at most


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def run(
    root: Path, agents: int = 1000, window: float = 20.0, probes: int = 200
) -> dict[str, float]:
    """Figures: coordinator CPU share idle and under the probes (fractions of one core),
    scheduling latency p50/p99 (ms), nodes not ready at the end, sessions lost."""
    mesh = LocalMesh(root / "mesh", agents=0)
    sims: list[subprocess.Popen[str]] = []
    try:
        mesh.start()
        client = mesh.client()
        token = client.create_token(ttl=OPEN_TIMEOUT + 600, uses=agents)
        share = -(-agents // PROCESSES)
        for p in range(PROCESSES):
            first, count = p * share, min(share, agents - p * share)
            if count <= 0:
                break
            argv = [sys.executable, "-m", "bench.sim_agents", "--coordinator", mesh.url]
            argv += ["--token", token, "--dir", str(root / "sims"), "--first", str(first)]
            argv += ["--count", str(count), "--out", str(root / f"sim-{p}.json")]
            sims.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        for sim in sims:
            assert sim.stdout is not None
            line = sim.stdout.readline()  # blocks until its sessions are open (or it died)
            if not line.startswith("OPEN"):
                raise RuntimeError(f"a simulator failed (exit {sim.wait()}); see its stderr")

        def all_ready() -> bool:
            return sum(1 for n in client.nodes() if n.state == "ready") >= agents

        wait_until(all_ready, OPEN_TIMEOUT, f"{agents} simulated nodes to be ready", step=0.5)
        assert mesh.coordinator is not None
        coordinator = psutil.Process(mesh.coordinator.pid)
        time.sleep(5.0)  # let every session take up the stretched heartbeat interval
        before, started = _cpu_seconds(coordinator), time.monotonic()
        time.sleep(window)
        idle_share = (_cpu_seconds(coordinator) - before) / (time.monotonic() - started)

        submitted: dict[str, float] = {}
        before, started = _cpu_seconds(coordinator), time.monotonic()
        for _ in range(probes):
            at = time.time()
            job = client.submit(JobSubmit(name="scale-probe", argv=["/bin/true"], count=1))
            submitted[job.id] = at
            client.wait(job.id)
        busy_share = (_cpu_seconds(coordinator) - before) / (time.monotonic() - started)
        not_ready = sum(1 for n in client.nodes() if n.state != "ready")
        client.close()
    finally:
        for sim in sims:
            if sim.poll() is None:
                sim.send_signal(signal.SIGTERM)
        for sim in sims:
            try:
                sim.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        mesh.stop()
    arrivals: dict[str, float] = {}
    lost_sessions = 0
    for p in range(len(sims)):
        found = json.loads((root / f"sim-{p}.json").read_text())
        arrivals |= found["arrivals"]
        lost_sessions += int(found["sessions_ended_early"])
    latencies = [arrivals[j] - at for j, at in submitted.items() if j in arrivals]
    if len(latencies) != len(submitted):
        raise RuntimeError(f"{len(submitted) - len(latencies)} probe jobs never reached an agent")
    return {
        "scale_idle_cpu_share": idle_share,
        "scale_busy_cpu_share": busy_share,
        "scale_latency_p50_ms": percentile(latencies, 0.5) * 1000,
        "scale_latency_p99_ms": percentile(latencies, 0.99) * 1000,
        "scale_not_ready": float(not_ready),
        "scale_sessions_lost": float(lost_sessions),
    }


if __name__ == "__main__":
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    print(json.dumps(run(Path(tempfile.mkdtemp(prefix="pm-scale-")), agents=count), indent=1))
