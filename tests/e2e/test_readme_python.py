"""The README's Python example runs as written, against a real local mesh (MESH_CONFIG points
it there, as the README's `--config`/`MESH_CONFIG` says)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.xdist_group("readme-python")
README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    section = README.read_text().split("## Python on the mesh", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example, "the README's Python section has no example"
    script = tmp_path / "example.py"
    script.write_text(example[1])
    with LocalMesh(tmp_path / "mesh", agents=2, agent_cpus=1) as mesh:
        env = {**os.environ, "MESH_CONFIG": str(mesh.client_config)}
        done = subprocess.run(
            [sys.executable, str(script)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == str([sum(i * i for i in range(x)) for x in range(100)])
    assert sorted(lines[1:3]) == sorted(str(sum(i * i for i in range(x))) for x in (10**5, 10**6))
    assert lines[3] == str(sum(i * i for i in range(10**7)))
