#!/usr/bin/env bash
# Set up and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The linter and the formatter (ruff, pinned in the dev extra, configured in pyproject.toml) first.
.venv/bin/ruff check --output-format concise .
.venv/bin/ruff format --check .
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q --durations=30 "$@"  # the slowest tests named, to keep the run short
