#!/usr/bin/env bash
# Install everything, then run the whole suite: lint, types, unit, integration, end to end.
# Fast loop while developing: .venv/bin/pytest tests/unit
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
.venv/bin/ruff check src tests examples
.venv/bin/ruff format --check src tests examples
.venv/bin/mypy
exec .venv/bin/pytest -n 2 "$@"
