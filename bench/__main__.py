"""`python -m bench`: the mesh, Dask and Ray side by side on this machine, in one run.

Each round starts every system afresh (two executors each: the mesh's coordinator and two agents
of one CPU; `dask scheduler` and two one-thread workers; `ray.init(num_cpus=2)`), runs every
scenario on it and stops it; the order of the systems turns each round. Raw samples go to
bench/results/<time>.json, the table to bench/results/<time>.md and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from bench import sandbox_cost, scale
from bench.common import MIB, Sizes, calibrate_spin, median, percentile, spin
from bench.report import markdown, summarize

RESULTS = Path(__file__).resolve().parent / "results"


class System(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def footprint(self) -> int: ...
    def commands(self, count: int) -> float: ...
    def latency(self, count: int) -> list[float]: ...
    def functions(self, count: int) -> float: ...
    def function_latency(self, count: int) -> list[float]: ...
    def cpu_bound(self, count: int, loops: int) -> float: ...
    def kill_rerun(self, cap: float) -> tuple[float, int]: ...
    def freeze_rerun(self, cap: float) -> tuple[float, int]: ...


def make(name: str, root: Path) -> System:
    if name == "mesh":
        from bench.mesh_system import MeshSystem

        return MeshSystem(root)
    if name == "dask":
        from bench.dask_system import DaskSystem

        return DaskSystem(root)
    if name == "ray":
        from bench.ray_system import RaySystem

        return RaySystem(root)
    raise SystemExit(f"unknown system {name!r}: use mesh, dask, ray")


def available(name: str) -> bool:
    module = {"mesh": "planetary_mesh", "dask": "distributed", "ray": "ray"}[name]
    try:
        metadata.version(module)
    except metadata.PackageNotFoundError:
        return False
    return True


def cpu_runs(system: System, sizes: Sizes, loops: int) -> tuple[list[float], list[float]]:
    """Seconds of the CPU-bound work done serially (before and after) and on the system (twice),
    all next to each other. A 2-core VM's share of the host drifts by tens of percent over
    minutes, so a serial time taken at another moment made speedups of 1.2 to 2.3 (past the
    limit) in one run; the fastest of each pair, side by side, is the least disturbed.

    Serial is the same work one after another: in one process for Dask and Ray, as one command
    after another for the mesh (its tasks are commands: interpreter start-up too)."""

    def in_process(count: int, loops: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            spin(loops)
        return time.perf_counter() - started

    serial_run = getattr(system, "serial_cpu", in_process)
    serial = [serial_run(sizes.cpu_tasks, loops)]
    parallel = [system.cpu_bound(sizes.cpu_tasks, loops) for _ in range(2)]
    serial.append(serial_run(sizes.cpu_tasks, loops))
    return serial, parallel


def one_round(name: str, sizes: Sizes, loops: int, log: Any, first: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"pm-bench-{name}-"))
    system = make(name, root)
    figures: dict[str, float] = {}
    raw: dict[str, Any] = {}
    try:
        system.start()
        time.sleep(1.0)  # let start-up settle before reading idle memory
        figures["footprint_mib"] = system.footprint() / MIB
        log(f"  {name}: footprint {figures['footprint_mib']:.0f} MiB")
        took = system.commands(sizes.commands)
        figures["commands_per_s"] = sizes.commands / took
        log(f"  {name}: commands {figures['commands_per_s']:.0f}/s")
        samples = system.latency(sizes.latency)
        raw["latency_s"] = samples
        figures["latency_p50_ms"] = percentile(samples, 0.5) * 1000
        figures["latency_p99_ms"] = percentile(samples, 0.99) * 1000
        log(f"  {name}: latency p50 {figures['latency_p50_ms']:.2f} ms")
        figures["functions_per_s"] = sizes.functions / system.functions(sizes.functions)
        log(f"  {name}: no-op Python calls {figures['functions_per_s']:.0f}/s")
        samples = system.function_latency(sizes.function_latency)
        raw["function_latency_s"] = samples
        figures["function_latency_p50_ms"] = percentile(samples, 0.5) * 1000
        figures["function_latency_p99_ms"] = percentile(samples, 0.99) * 1000
        log(f"  {name}: one Python call p50 {figures['function_latency_p50_ms']:.2f} ms")
        figures["large_array_s"] = system.commands(sizes.large_array)
        log(f"  {name}: {sizes.large_array} tasks in {figures['large_array_s']:.1f} s")
        serial, parallel = cpu_runs(system, sizes, loops)
        raw["cpu_serial_s"], raw["cpu_parallel_s"] = serial, parallel
        figures["cpu_speedup"] = min(serial) / min(parallel)
        log(f"  {name}: cpu speedup {figures['cpu_speedup']:.2f}")
        figures["kill_rerun_s"], figures["kill_lost"] = system.kill_rerun(sizes.rerun_cap)
        log(f"  {name}: kill → rerun {figures['kill_rerun_s']:.2f} s")
        figures["freeze_rerun_s"], figures["freeze_lost"] = system.freeze_rerun(sizes.rerun_cap)
        log(f"  {name}: freeze → rerun {figures['freeze_rerun_s']:.2f} s")
        restart = getattr(system, "restart", None)
        if restart is not None:
            # Running all of them to the end takes minutes: in the first round only.
            serving, resumed, finished = restart(sizes.pending, finish=first)
            figures["restart_serving_s"], figures["restart_resumed_s"] = serving, resumed
            log(
                f"  {name}: restart with {sizes.pending} tasks: serving after {serving:.2f} s,"
                f" tasks ending again after {resumed:.2f} s"
            )
            if finished is not None:
                figures["restart_finished_s"] = finished
                log(f"  {name}: all {sizes.pending} done {finished:.0f} s after the kill")
        pending = getattr(system, "pending_memory", None)
        if pending is not None:
            figures["pending_mib"] = pending(sizes.pending) / MIB
            log(f"  {name}: {sizes.pending} pending tasks: {figures['pending_mib']:.0f} MiB")
    finally:
        system.stop()
        anomalies = list(getattr(system, "anomalies", []))
        if anomalies:
            raw["anomalies"] = anomalies
            kept = Path(tempfile.mkdtemp(prefix=f"pm-bench-{name}-kept-"))
            if (root / "logs").is_dir():
                shutil.copytree(root / "logs", kept / "logs")
            for store in root.glob("mesh.db*"):  # the events: placed, requeued, started, ended
                shutil.copy2(store, kept / store.name)
            for line in anomalies:
                log(f"  {name}: MISSED {line}")
            log(f"  {name}: its logs and store (the events table) are kept in {kept}")
        shutil.rmtree(root, ignore_errors=True)
    return {"figures": figures, "raw": raw}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"
        f" {platform.release()}, Python {platform.python_version()}"
    )


def versions(systems: list[str]) -> str:
    names = {"mesh": "planetary-mesh", "dask": "distributed", "ray": "ray"}
    return ", ".join(f"{names[s]} {metadata.version(names[s])}" for s in systems)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default="mesh,dask,ray")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does it all still run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = Sizes.smoke() if args.smoke else Sizes()
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    systems = [s for s in wanted if available(s)]
    for missing in sorted(set(wanted) - set(systems)):
        print(f"skipping {missing}: not installed (pip install -e '.[bench]')", file=sys.stderr)
    if "mesh" not in systems:
        raise SystemExit("the benchmark compares against the mesh: it must be installed")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    loops = calibrate_spin(sizes.cpu_seconds)
    rounds: list[dict[str, dict[str, float]]] = []
    raw: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
        figures: dict[str, dict[str, float]] = {}
        raw_round: dict[str, Any] = {}
        for name in order:
            done = one_round(name, sizes, loops, log, first=r == 0)
            figures[name] = done["figures"]
            raw_round[name] = done
        if sizes.scale_agents:
            root = Path(tempfile.mkdtemp(prefix="pm-bench-scale-"))
            try:
                found = scale.run(root, sizes.scale_agents, sizes.scale_window, sizes.scale_probes)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            figures["mesh"] |= found
            log(
                f"  mesh: {sizes.scale_agents} simulated agents: coordinator"
                f" {found['scale_idle_cpu_share']:.0%} of a core idle,"
                f" scheduling p99 {found['scale_latency_p99_ms']:.1f} ms"
            )
        cost = sandbox_cost.measure(30 if args.smoke else 200)
        for key, samples in cost.items():
            figures["mesh"][f"{key}_ms"] = median(samples) * 1000
        raw_round["sandbox_s"] = cost
        shown = ", ".join(f"{k} {median(v) * 1000:.2f} ms" for k, v in cost.items())
        log(f"  sandbox p50: {shown}")
        rounds.append(figures)
        raw.append(raw_round)

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    command = "python -m bench " + " ".join(sys.argv[1:])
    header = (
        f"## Benchmark {stamp}\n\nMachine: {machine()}. {versions(systems)}.\n"
        f"Command: `{command.strip()}`; {args.rounds} rounds"
        + (" (smoke sizes: not a measurement)" if args.smoke else "")
        + f". Sizes: {sizes.commands} command tasks, {sizes.latency} sequential calls,"
        f" {sizes.functions} no-op Python calls, {sizes.function_latency} sequential ones,"
        f" {sizes.large_array} tasks in one call, {sizes.cpu_tasks} CPU tasks of"
        f" ~{sizes.cpu_seconds} s, {sizes.pending} pending tasks, {sizes.scale_agents}"
        " simulated agents."
    )
    table = markdown(summarize(rounds, systems), systems, header)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "smoke-" if args.smoke else ""
    # A rerun that never came within the cap is Infinity in the JSON (Python reads it back).
    (args.out / f"{kind}{stamp}.json").write_text(
        json.dumps({"sizes": sizes.__dict__, "rounds": rounds, "raw": raw}, indent=1)
    )
    (args.out / f"{kind}{stamp}.md").write_text(table)
    if not args.smoke:
        (args.out / "latest.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
