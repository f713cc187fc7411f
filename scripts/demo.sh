#!/usr/bin/env bash
# Install, then run a real local mesh that counts primes in an array job, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python examples/demo.py
