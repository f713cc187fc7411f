#!/usr/bin/env bash
# Install everything Planetary Mesh needs on Debian 12/13 with Python 3.11: bubblewrap for the
# sandbox (and the system python3 for its warm sandboxes' launcher), and a virtual environment in
# .venv with the package (and, with --dev, test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

# bubblewrap sandboxes tasks; with --dev, iproute2 and nftables build the tests' network
# namespaces and partitions, and chromium runs the dashboard's tests.
need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
# Warm sandboxes run a small launcher, in C or else under the host's own Python in /usr (the
# sandbox shows nothing else of the host); without either every task gets a fresh sandbox.
/usr/bin/python3 -c "import ctypes, socket" >/dev/null 2>&1 || need+=(python3)
# The agent compiles the launcher's C version (it starts ~10 ms sooner for each new job) with
# the host's compiler; without one it runs the Python launcher.
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if [ "${1:-}" = "--dev" ]; then
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v nft >/dev/null 2>&1 || need+=(nftables)
  # The dashboard's browser tests drive Debian's Chromium with Playwright (never
  # `playwright install`, which would download a browser from the internet).
  [ -x /usr/bin/chromium ] || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]}..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing Debian packages: ${need[*]}; install them (apt-get install ${need[*]}) and rerun" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
