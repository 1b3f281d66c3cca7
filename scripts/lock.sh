#!/usr/bin/env bash
# Write the lock files again from pyproject.toml: after changing a dependency there, run this and commit
# pyproject.toml with requirements-dev.lock, requirements.lock and requirements-cuda.lock.
#   bash scripts/lock.sh             keep every pin that still fits pyproject.toml
#   bash scripts/lock.sh --upgrade   the newest releases pyproject.toml allows
# uv (the dev extra's) resolves for CPython 3.11 on Linux x86_64, torch from its CPU index (pyproject.toml's
# [tool.uv]); where that index cannot be reached, from the CPU wheel in pip's find-links (same hashes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/uv ]; then
  echo "error: uv is not in .venv: bash scripts/setup.sh dev installs it" >&2
  exit 1
fi
exec .venv/bin/python scripts/lockfile.py lock "$@"
