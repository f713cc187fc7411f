"""Rounds of samples into a table: each figure's median and min–max over rounds, the mesh's
per-round ratio against Dask and Ray (median of ratios), and the issue's targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.common import median


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: str  # in words, "" for none


METRICS = [
    Metric(
        "commands_per_s",
        "commands: /bin/true tasks per second",
        "/s",
        True,
        "≥ 1.0× Dask (aim ≥ 1.0× Ray)",
    ),
    Metric(
        "latency_p50_ms",
        "latency: one tiny task, submit→result, p50",
        "ms",
        False,
        "≤ 1.0× Dask (aim ≤ 2× Ray)",
    ),
    Metric("latency_p99_ms", "latency p99", "ms", False, "≤ 3× own p50"),
    Metric(
        "functions_per_s",
        "functions: no-op Python calls per second (mesh: MeshExecutor.map)",
        "/s",
        True,
        "≥ 1.0× Dask (aim ≥ 1.0× Ray)",
    ),
    Metric(
        "function_latency_p50_ms",
        "function latency: one no-op Python call, submit→result, p50",
        "ms",
        False,
        "≤ 1.0× Dask (aim ≤ 2× Ray)",
    ),
    Metric("function_latency_p99_ms", "function latency p99", "ms", False, ""),
    Metric("large_array_s", "large array: all tasks done", "s", False, ""),
    Metric("cpu_speedup", "CPU-bound: speedup over serial (limit 2.0)", "×", True, "≥ 1.9"),
    Metric("kill_rerun_s", "kill -9 a worker: task running again after", "s", False, "≤ 1 s"),
    Metric("kill_lost", "kill -9: results lost", "", False, "0"),
    Metric("freeze_rerun_s", "SIGSTOP a worker: task running again after", "s", False, "≤ 5 s"),
    Metric(
        "footprint_mib", "footprint: cluster of 2 idle workers, RSS", "MiB", False, "≤ 1.0× Dask"
    ),
    Metric(
        "restart_serving_s",
        "restart: coordinator kill -9 amid the pending job, serving again after",
        "s",
        False,
        "",
    ),
    Metric(
        "restart_resumed_s",
        "restart: tasks finishing again after",
        "s",
        False,
        "",
    ),
    Metric(
        "restart_finished_s",
        "restart: the whole job done after (first round only)",
        "s",
        False,
        "",
    ),
    Metric(
        "pending_mib",
        "coordinator RSS holding the pending tasks",
        "MiB",
        False,
        "≤ 300 MiB (100,000)",
    ),
    Metric(
        "scale_idle_cpu_share",
        "scale: 1,000 simulated agents heartbeating, coordinator CPU (share of one core)",
        "",
        False,
        "≤ 0.25",
    ),
    Metric(
        "scale_busy_cpu_share",
        "scale: the same while one-task jobs run back to back, coordinator CPU",
        "",
        False,
        "",
    ),
    Metric(
        "scale_latency_p50_ms", "scale: scheduling latency, submit→assigned, p50", "ms", False, ""
    ),
    Metric("scale_latency_p99_ms", "scale: scheduling latency p99", "ms", False, "≤ 50 ms"),
    Metric("scale_not_ready", "scale: nodes not ready at the end", "", False, "0"),
    Metric(
        "fresh_sandbox_ms",
        "sandbox cost: fresh bwrap, start→exit of /bin/true, p50",
        "ms",
        False,
        "",
    ),
    Metric("warm_sandbox_ms", "sandbox cost: in a warm sandbox, p50", "ms", False, ""),
    Metric("fork_exec_ms", "sandbox cost: plain fork+exec (floor), p50", "ms", False, ""),
]


def fmt(value: float) -> str:
    if math.isinf(value):
        return "never (cap)"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def summarize(
    rounds: list[dict[str, dict[str, float]]], systems: list[str]
) -> list[dict[str, Any]]:
    """One row per metric: per system the median and range, and the mesh's ratios."""
    rows = []
    for metric in METRICS:
        row: dict[str, Any] = {"metric": metric}
        for system in systems:
            values = [r[system][metric.key] for r in rounds if metric.key in r.get(system, {})]
            if values:
                row[system] = (median(values), min(values), max(values))
        for other in ("dask", "ray"):
            ratios = [
                r["mesh"][metric.key] / r[other][metric.key]
                for r in rounds
                if metric.key in r.get("mesh", {})
                and metric.key in r.get(other, {})
                and r[other][metric.key] not in (0, math.inf)
                and not math.isinf(r["mesh"][metric.key])
            ]
            if ratios:
                row[f"mesh/{other}"] = median(ratios)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], systems: list[str], header: str) -> str:
    lines = [header, ""]
    cols = ["Scenario", *systems, "mesh ÷ Dask", "mesh ÷ Ray", "target"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for row in rows:
        metric: Metric = row["metric"]
        if not any(s in row for s in systems):
            continue
        cells = [f"{metric.label} ({metric.unit})" if metric.unit else metric.label]
        for system in systems:
            if system in row:
                mid, low, high = row[system]
                spread = "" if low == high else f" ({fmt(low)}–{fmt(high)})"
                cells.append(f"{fmt(mid)}{spread}")
            else:
                cells.append("–")
        for other in ("dask", "ray"):
            ratio = row.get(f"mesh/{other}")
            cells.append("–" if ratio is None else f"{ratio:.2f}×")
        cells.append(metric.target or "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Medians over rounds, min–max in brackets; a ratio is the median of the per-round ratios"
        " (mesh's figure divided by the other's). Higher is better for per-second figures and"
        " speedup, lower for the rest."
    )
    return "\n".join(lines) + "\n"
