#!/usr/bin/env bash
# Create .venv and install shardstore with everything the demo, tests and benchmarks need.
# Idempotent: a second run only checks. torch is pinned first to the CPU build so that
# nothing pulls the multi-gigabyte CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
# torch is an extra of shardstore (the CLI, push, pull and serve run without it); the tests need it.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[torch,transformers,dev,bench]"
