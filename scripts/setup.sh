#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with attnreuse and its test tools.
# torch: where none is installed, the CPU wheel (torch==2.13.0) goes in first, so that the package's
# `torch>=2.1` requirement does not pull a multi-GB CUDA build; an existing torch (e.g. CUDA) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
