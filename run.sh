#!/usr/bin/env bash
# agriclip-jax entry point. Sets itself up on a fresh machine, then runs.
#   ./run.sh              the main job: the whole AgriCLIP pipeline offline (same as ./run.sh demo)
#   ./run.sh demo [ARGS]  the same, with arguments for `agriclip demo`
#   ./run.sh test [ARGS]  the whole test suite (arguments go to pytest)
#   ./run.sh bench [ARGS] the benchmarks (arguments go to `python -m benchmarks`)
#   ./run.sh CMD [ARGS]   any other `agriclip` subcommand, e.g. ./run.sh convert --help
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
# AGRICLIP_VENV chooses another environment, e.g. one with requirements.txt alone (as CI checks).
VENV="${AGRICLIP_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
  if [ ! -x "$PY" ]; then
    echo "[run.sh] creating $VENV"
    python3 -m venv "$VENV"
  fi
}

# Installs a requirements file once; reinstalls only when the file changes. The package itself is
# installed editable (for the `agriclip` command) in pip's isolated build environment, which
# brings the setuptools and wheel that a new venv lacks.
ensure_requirements() {
  local req="$1" stamp="$VENV/.installed-$(basename "$1")"
  local want; want=$(cat "$req" requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[run.sh] installing $req and agriclip-jax into $VENV (first run, or the file changed)"
    "$PY" -m pip install --disable-pip-version-check -q -r "$req"
    "$PY" -m pip install --disable-pip-version-check -q --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

# The tokenizer tests read OpenAI's BPE vocabulary shipped inside open_clip_torch; the package is
# installed without its dependencies because only that data file is used.
ensure_openclip_vocab() {
  if ! "$PY" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('open_clip') else 1)" 2>/dev/null; then
    "$PY" -m pip install --disable-pip-version-check -q --no-deps open_clip_torch || \
      echo "[run.sh] open_clip_torch unavailable: tests that need OpenAI's BPE file will be skipped"
  fi
}

mode="${1:-demo}"
[ $# -gt 0 ] && shift
ensure_venv
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
case "$mode" in
  test)
    ensure_requirements requirements-test.txt
    ensure_openclip_vocab
    exec "$PY" -m pytest "$@"
    ;;
  bench)
    ensure_requirements requirements-test.txt
    ensure_openclip_vocab
    exec "$PY" -m benchmarks "$@"
    ;;
  demo)
    ensure_requirements requirements.txt
    if [ $# -eq 0 ]; then set -- --workdir "$ROOT/runs/demo"; fi
    exec "$PY" -m agriclip_jax demo "$@"
    ;;
  *)
    ensure_requirements requirements.txt
    exec "$PY" -m agriclip_jax "$mode" "$@"
    ;;
esac
