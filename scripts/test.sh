#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the project's checks: ruff, mypy and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-packages.sh
.venv/bin/ruff check .
.venv/bin/mypy shardstore
.venv/bin/python -m pytest -q "$@"
