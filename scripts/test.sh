#!/usr/bin/env bash
# Install everything, then run the whole suite: lint, types, unit, integration, end to end.
# Fast loop while developing: .venv/bin/pytest tests/unit
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
.venv/bin/ruff check src tests examples bench
.venv/bin/ruff format --check src tests examples bench
.venv/bin/mypy
# loadgroup: the tests of one xdist_group (the dashboard's browser tests) share a worker and a mesh.
exec .venv/bin/pytest -n 2 --dist loadgroup "$@"
