"""The README demo: a local mesh (coordinator + 3 agents, SQLite store) counts primes.

It starts a real mesh with `LocalMesh`, runs an array job through the real `mesh` CLI (so you
see its progress bar and output), fetches the result files, checks the total, counts them again
as Python calls through `MeshExecutor.map`, and stops the mesh.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from planetary_mesh import MeshExecutor
from planetary_mesh.testing import LocalMesh

LIMIT = 2_000_000
TASKS = 12
PRIMES_BELOW_2M = 148_933  # pi(2,000,000)


def mesh(config: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "planetary_mesh", *args],
        env=env,
        text=True,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def count_primes(start: int, stop: int) -> int:
    """The same count as primes.py, as a Python function the mesh runs (sent by value)."""

    def is_prime(n: int) -> bool:
        if n < 2:
            return False
        if n % 2 == 0:
            return n == 2
        return all(n % d for d in range(3, math.isqrt(n) + 1, 2))

    return sum(1 for n in range(start, stop) if is_prime(n))


def main() -> int:
    script = Path(__file__).with_name("primes.py")
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        root = Path(tmp)
        print(f"starting a local mesh in {root}: 1 coordinator, 3 agents, SQLite store")
        with LocalMesh(root / "mesh", agents=3, agent_cpus=1) as local:
            config = local.client_config
            mesh(config, "nodes")
            print(f"\ncounting primes below {LIMIT:,} in {TASKS} sandboxed tasks:")
            run = mesh(
                config,
                "run",
                "--array",
                str(TASKS),
                "--name",
                "primes",
                "--file",
                str(script),
                "--output",
                "primes-*.json",
                "--",
                "python3",
                "primes.py",
                str(LIMIT),
            )
            if run.returncode != 0:
                print(f"the job failed (exit code {run.returncode})", file=sys.stderr)
                return 1
            job_id = mesh(config, "jobs", "-o", "json", capture_output=True).stdout
            job = json.loads(job_id)[0]["id"]
            mesh(config, "status", job)
            results = root / "results"
            mesh(config, "get", job, "-d", str(results))
            total = sum(
                json.loads(path.read_text())["primes"] for path in results.glob("*/primes-*.json")
            )
            print(f"\nprimes below {LIMIT:,}: {total:,} (expected {PRIMES_BELOW_2M:,})")
            print(f"\nthe same as {TASKS} Python calls with MeshExecutor.map:")
            bounds = [LIMIT * i // TASKS for i in range(TASKS + 1)]
            with MeshExecutor(config=config, name="primes-python") as executor:
                by_calls = sum(executor.map(count_primes, bounds[:-1], bounds[1:]))
            print(f"primes below {LIMIT:,}: {by_calls:,}")
        return 0 if total == by_calls == PRIMES_BELOW_2M else 1


if __name__ == "__main__":
    sys.exit(main())
