#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the project's checks: ruff, mypy, the sanitizer build's fuzz tests, the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-packages.sh
.venv/bin/ruff check .
.venv/bin/mypy shardstore
# The C codec kernels under AddressSanitizer + UBSan, fuzzed over every codec id (a few minutes).
bash scripts/sanitize.sh
.venv/bin/python -m pytest -q "$@"
