#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on a GPU machine that has no network and lacks part of
# requirements.txt. Run here (where pip reaches the index); it fills .whl/ (git-ignored) with the
# Python 3.12 x86-64 wheels of what the workplace's H200 image lacks: grain and ml_collections at
# their pins, and grain's own dependencies that the image lacks (array-record, portpicker) at the
# versions this project's environment runs. The device call then carries .whl; gpu.sh installs
# every wheel in it with --no-deps into a folder of its own and puts that on PYTHONPATH.
#
# Usage:  benchmarks/gpu_wheels.sh          (PYTHON: the pip to use, default .venv/bin/python;
#                                            WHEELS_PYTHON: the target Python version, default 3.12)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
TARGET=${WHEELS_PYTHON:-3.12}

pin() {  # the requirements.txt pin of a package, e.g. grain==0.2.18
  local line
  line=$(grep -iE "^$1==" requirements.txt | head -n1 | sed -E 's/[[:space:]]*#.*$//')
  [[ -n "$line" ]] || { echo "gpu_wheels.sh: $1 has no == pin in requirements.txt" >&2; exit 1; }
  echo "$line"
}
installed() {  # the version this project's environment runs, e.g. array-record==0.8.6
  local version
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1") \
    || { echo "gpu_wheels.sh: $1 is not installed in $PY's environment" >&2; exit 1; }
  echo "$1==$version"
}

packages=("$(pin grain)" "$(pin ml_collections)" "$(installed array-record)" "$(installed portpicker)")
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --python-version "$TARGET" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${packages[@]}"
echo "gpu_wheels.sh: $(ls .whl | wc -l) wheels for Python $TARGET in .whl/ ($(du -sh .whl | cut -f1)):"
ls .whl
