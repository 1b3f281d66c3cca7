#!/usr/bin/env bash
# The main job on the embedded default data: set up, prepare, train with Ray Train, evaluate
# against the baselines, serve the API and start the demo (until Ctrl-C).
# Extra arguments go to `python -m main_job` (e.g. --dataset ml-latest-small, --checkpoint, --tune 8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m main_job "$@"
