#!/usr/bin/env bash
# Create .venv and install the project from its lock files; a no-op when they and pyproject.toml are unchanged.
#   bash scripts/setup.sh        what the main job needs (requirements.lock)
#   bash scripts/setup.sh dev    and the test suite's extra: pytest, playwright, ... (requirements-dev.lock)
#   TORCH=cuda bash scripts/setup.sh [dev]   PyPI's CUDA build of torch instead of the CPU build
#                                (requirements-cuda.lock); the venv keeps it until TORCH=cpu
# The lock files pin every package with its hashes, for CPython 3.11 on Linux x86_64; after a change of a
# dependency in pyproject.toml, `bash scripts/lock.sh` writes them again (the install refuses a stale lock).
# Another Python (pyproject.toml allows >= 3.10) or platform installs from pyproject.toml's ranges,
# torch from its CPU index, and says it is not the locked install.
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
torch=${TORCH:-$(cat .venv/.torch 2>/dev/null || echo cpu)}
case "$torch" in cpu|cuda) ;; *) echo "error: TORCH is cpu or cuda, not '$torch'" >&2; exit 2 ;; esac
hash=$(cat pyproject.toml requirements.lock requirements-dev.lock requirements-cuda.lock | sha256sum | cut -c1-16)
stamp=.venv/.installed-$hash-$torch${extra:+-$extra}
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-$hash-$torch-dev" ]; then     # the dev install covers the plain one
  locked=1
  if ! .venv/bin/python scripts/lockfile.py covers 2>/dev/null; then
    locked=0
    echo "warning: the lock files are for CPython 3.11 on Linux x86_64; installing from pyproject.toml's ranges (not the locked versions)" >&2
  fi
  log=.venv/pip-install.log
  echo "==> installing dependencies (first time: a few minutes; pip's log: $log)"
  SKIP_COMPILE='/(tests?|pip|networkx)/|/transformers/models/(?!(auto|bert|align|encoder_decoder)/|__init__)'
  # The lock files to install: the CUDA lock's torch (and the CUDA libraries it brings) replaces the dev lock's.
  case "$torch${extra:+-$extra}" in
    cpu) locks="requirements.lock" ;;
    cpu-dev) locks="requirements-dev.lock" ;;
    cuda) locks="requirements-cuda.lock" ;;
    cuda-dev) locks="requirements-cuda.lock requirements-dev.lock" ;;
  esac
  install() {
    # The venv's own pip where it is new enough (an editable pyproject-only install needs 21.3;
    # Python 3.10.0-3.10.2 ship 21.2): no upgrade to the latest, which cost time.
    .venv/bin/pip install --quiet 'pip>=21.3'
    if [ "$locked" = 0 ]; then  # the CPU build of torch from its index (unless CUDA is asked for), then the rest
      [ "$torch" = cuda ] || .venv/bin/pip install --quiet --no-compile "$(grep -o 'torch==[0-9.]*' pyproject.toml)" \
        --index-url https://download.pytorch.org/whl/cpu
      .venv/bin/pip install --quiet --no-compile -e ".${extra:+[$extra]}"
      return
    fi
    # Exactly the lock's files (their hashes), nothing resolved here (--no-deps). pip asks every index it is
    # given for every package, so each lock is split: the packages of the default index (PyPI), then those of
    # torch's CPU index, installed with that index alone (the CUDA install leaves the CPU build out).
    # pip compiles the installed modules one at a time; compileall does it on every core, and
    # leaves out what no run imports: the packages' own test folders, pip, networkx, and the model
    # families of transformers but BERT's (measured on 2 cores: pip's install 109 s without
    # compiling, 215 s with; compileall 58 s). Whatever is left out compiles when imported.
    rm -rf .venv/lock
    parts=()
    for lock in $locks; do
      .venv/bin/python scripts/lockfile.py split "$lock" ".venv/lock/$lock"
      parts+=(".venv/lock/$lock/default.txt")
      [ "$torch" = cuda ] || parts+=(".venv/lock/$lock/extra.txt")
    done
    # uv installs the same pinned files, hashes checked, from the sources pip is configured with, in a
    # fraction of pip's time; uv itself comes from its pin and hashes in requirements-dev.lock. If uv
    # cannot be had or fails, pip installs the parts as before.
    .venv/bin/python scripts/lockfile.py pin requirements-dev.lock uv >.venv/lock/uv.txt
    mapfile -t sources < <(.venv/bin/python scripts/lockfile.py pip-sources)
    if .venv/bin/pip install --quiet --no-deps --require-hashes -r .venv/lock/uv.txt &&
      .venv/bin/uv pip install --python .venv/bin/python --no-deps --require-hashes \
        --index-strategy unsafe-best-match "${sources[@]}" "${parts[@]/#/--requirement=}"; then
      echo "installed with uv"
    else
      echo "uv could not install the lock files; pip installs them"
      for part in "${parts[@]}"; do
        .venv/bin/pip install --quiet --no-compile --no-deps --require-hashes -r "$part"
      done
    fi
    # What an earlier install left that the lock does not pin (a removed dependency, the other torch's CUDA libraries).
    .venv/bin/python scripts/lockfile.py stale "${parts[@]}" | xargs -r .venv/bin/pip uninstall --quiet -y
    .venv/bin/pip install --quiet --no-compile --no-deps -e .
    .venv/bin/python scripts/lockfile.py check
    .venv/bin/pip check
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
  echo "$torch" >.venv/.torch
  touch "$stamp"
fi
# dev: checkov, the policy scanner tests/test_k8s_checkov.py runs on k8s/, in a virtual environment of its
# own (.venv/checkov): its dependencies pin other versions of packages the project uses.
CHECKOV_VERSION=3.3.30
if [ "$extra" = dev ] && [ ! -f ".venv/checkov/.installed-$CHECKOV_VERSION" ]; then
  echo "==> installing checkov $CHECKOV_VERSION in .venv/checkov"
  rm -rf .venv/checkov
  "$PY" -m venv .venv/checkov
  mapfile -t sources < <(.venv/bin/python scripts/lockfile.py pip-sources)
  if ! { .venv/bin/uv pip install --python .venv/checkov/bin/python --index-strategy unsafe-best-match \
    "${sources[@]}" "checkov==$CHECKOV_VERSION" ||
    .venv/checkov/bin/pip install --quiet --no-compile "checkov==$CHECKOV_VERSION"; } >.venv/checkov/pip-install.log 2>&1; then
    echo "error: installing checkov failed; the end of .venv/checkov/pip-install.log:" >&2
    tail -n 30 .venv/checkov/pip-install.log >&2
    exit 1
  fi
  touch ".venv/checkov/.installed-$CHECKOV_VERSION"
fi
