#!/usr/bin/env bash
# Create .venv and install the project with its dev extra; a no-op when pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "==> installing dependencies (first time: a few minutes)"
  .venv/bin/pip install --quiet --upgrade pip
  # torch is pinned to the CPU wheel in pyproject.toml; a looser pin would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
