#!/usr/bin/env bash
# 1,000 generations on the default model (sizes, modes, schedules, first-use plans and injected faults
# alternating), RSS and cache bytes every 100; exits 1 if RSS at the last report is more than 5% off the first.
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
${PYTHON:-.venv/bin/python} scripts/soak.py "$@"
