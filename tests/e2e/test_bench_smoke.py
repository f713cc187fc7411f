"""The benchmark still runs: `python -m bench --smoke` against a real local mesh, every
scenario once at tiny sizes. No figure is judged here (timings belong to the benchmark);
what must hold is that each scenario produced its figure and no result was lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mesh_system import MeshSystem

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_smoke_produces_every_mesh_figure(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--rounds", "1", "--systems", "mesh",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (raw,) = tmp_path.glob("smoke-*.json")
    found = json.loads(raw.read_text())
    figures = found["rounds"][0]["mesh"]
    samples = found["raw"][0]["mesh"]["raw"]
    # The speedup's serial and parallel runs were made side by side, two of each.
    assert len(samples["cpu_serial_s"]) == 2 and len(samples["cpu_parallel_s"]) == 2
    expected = {
        "footprint_mib", "commands_per_s", "latency_p50_ms", "latency_p99_ms", "large_array_s",
        "functions_per_s", "function_latency_p50_ms", "function_latency_p99_ms",
        "cpu_speedup", "kill_rerun_s", "kill_lost", "freeze_rerun_s", "freeze_lost",
        "pending_mib", "fresh_sandbox_ms", "warm_sandbox_ms", "fork_exec_ms",
        "restart_serving_s", "restart_resumed_s", "restart_finished_s", "scale_idle_cpu_share",
        "scale_busy_cpu_share", "scale_latency_p50_ms", "scale_latency_p99_ms", "scale_not_ready",
    }  # fmt: skip
    assert expected <= set(figures), expected - set(figures)
    assert figures["kill_lost"] == 0 and figures["freeze_lost"] == 0
    assert figures["scale_not_ready"] == 0  # every simulated agent stayed ready
    assert all(v is not None and v >= 0 for v in figures.values()), figures
    (table,) = tmp_path.glob("smoke-*.md")
    assert "| commands: /bin/true tasks per second (/s) |" in table.read_text()
    assert not (tmp_path / "latest.md").exists()  # a smoke never passes for a measurement


def test_a_missed_rerun_records_what_the_mesh_showed(tmp_path: Path) -> None:
    """A freeze given too little time to be noticed misses: the round keeps the task's state
    and the nodes', so a rare miss in a long run can be studied afterwards."""
    system = MeshSystem(tmp_path)
    system.start()
    try:
        rerun, lost = system.freeze_rerun(cap=0.3)  # the node is lost only after 4 s
    finally:
        system.stop()
    assert rerun == float("inf") and lost == 1
    missed_rerun, missed_result = system.anomalies
    assert missed_rerun.startswith("freeze: no rerun within 0.3 s; task running on ")
    assert "1 attempts" in missed_rerun and "agent-1" in missed_rerun
    assert missed_result.startswith("freeze: no result (none within 0.3 s); ")
