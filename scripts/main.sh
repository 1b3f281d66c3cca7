#!/usr/bin/env bash
# The main job on the embedded default data: set up, prepare, train, evaluate, print the table.
# Extra arguments go to `python -m models.run` (e.g. --dataset ml-latest-small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m models.run "$@"
