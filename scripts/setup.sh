#!/usr/bin/env bash
# Create .venv and install the project; a no-op when pyproject.toml is unchanged.
#   bash scripts/setup.sh        what the main job needs
#   bash scripts/setup.sh dev    and the test suite's extra (pytest, playwright, ...)
# pip's own output goes to .venv/pip-install.log (shown when the install fails; VERBOSE=1 shows it live).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
extra=${1:-}
case "$extra" in ""|dev) ;; *) echo "usage: bash scripts/setup.sh [dev]" >&2; exit 2 ;; esac
hash=$(sha256sum pyproject.toml | cut -c1-16)
stamp=.venv/.installed-$hash${extra:+-$extra}
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-$hash-dev" ]; then     # the dev install covers the plain one
  log=.venv/pip-install.log
  echo "==> installing dependencies (first time: a few minutes; pip's log: $log)"
  SKIP_COMPILE='/(tests?|pip|networkx)/|/transformers/models/(?!(auto|bert|align|encoder_decoder)/|__init__)'
  install() {
    # The venv's own pip where it is new enough (an editable pyproject-only install needs 21.3;
    # Python 3.10.0-3.10.2 ship 21.2): no upgrade to the latest, which cost time.
    .venv/bin/pip install --quiet 'pip>=21.3'
    # torch is pinned to the CPU wheel in pyproject.toml; a looser pin would pull a multi-GB CUDA build.
    # pip compiles the installed modules one at a time; compileall does it on every core, and
    # leaves out what no run imports: the packages' own test folders, pip, networkx, and the model
    # families of transformers but BERT's (measured on 2 cores: pip's install 109 s without
    # compiling, 215 s with; compileall 58 s). Whatever is left out compiles when imported.
    .venv/bin/pip install --quiet --no-compile -e ".${extra:+[$extra]}"
    # A few packages ship files that are not Python 3 (templates, samples): compileall's status is not the install's.
    .venv/bin/python -m compileall -q -j 0 -x "$SKIP_COMPILE" .venv/lib >/dev/null || true
  }
  if [ "${VERBOSE:-0}" = 1 ]; then
    install 2>&1 | tee "$log"
  else
    install >"$log" 2>&1 &
    pid=$!
    start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do          # a heartbeat on a terminal, silence in a log
      [ -t 1 ] && printf '\r    %d s' $((SECONDS - start))
      sleep 1
    done
    [ -t 1 ] && printf '\r'
    if ! wait "$pid"; then
      echo "error: installing the dependencies failed; the end of $log:" >&2
      tail -n 30 "$log" >&2
      exit 1
    fi
    echo "    installed in $((SECONDS - start)) s"
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# dev: checkov, the policy scanner tests/test_k8s_checkov.py runs on k8s/, in a virtual environment of its
# own (.venv/checkov): its dependencies pin other versions of packages the project uses.
CHECKOV_VERSION=3.3.30
if [ "$extra" = dev ] && [ ! -f ".venv/checkov/.installed-$CHECKOV_VERSION" ]; then
  echo "==> installing checkov $CHECKOV_VERSION in .venv/checkov"
  rm -rf .venv/checkov
  "$PY" -m venv .venv/checkov
  if ! .venv/checkov/bin/pip install --quiet --no-compile "checkov==$CHECKOV_VERSION" >.venv/checkov/pip-install.log 2>&1; then
    echo "error: installing checkov failed; the end of .venv/checkov/pip-install.log:" >&2
    tail -n 30 .venv/checkov/pip-install.log >&2
    exit 1
  fi
  touch ".venv/checkov/.installed-$CHECKOV_VERSION"
fi
