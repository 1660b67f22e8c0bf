#!/usr/bin/env bash
# Accelerator check, at most 9.5 minutes on one GPU (budgets: 175 + 105 + 150 + 2 x 60 s, each a timeout):
#   1. CLIP ViT-B/16 bf16 contrastive train step at the largest batch that fits (doubling, judged
#      by XLA's memory analysis of the compiled step), and
#   2. DINO ViT-S/16 multi-crop bf16 train step (2x224 + 8x96 crops),
# each printing images/s, MFU (against the H200's bf16 dense peak 989 TFLOP/s and against a bf16
# matmul peak measured in the same process) and peak memory (device.memory_stats()), and
#   3. the pod-memory configurations of BENCHMARKS.md ("The pod on paper": joint ViT-B/16 and
#      contrastive ViT-L/14, bf16, accumulate 1 and 8) on this machine's own devices, at the
#      per-device batch of the simulated 8-device runs (global 4k and 32k over 8 -> 512 and 4096
#      per device): XLA's memory analysis from the real compiler, and one executed step's peak
#      memory where the estimate fits (benchmarks/bench_pod_memory.py --real --execute), and
#   4. the end-to-end images/s of `agriclip train` (DINO ViT-S/16 multi-crop) on real JPEGs with
#      the views rendered on the device and on the host (data.augment_on=device|host).
#
# Usage (repo root or anywhere):  benchmarks/gpu.sh          on a GPU machine
#                                 benchmarks/gpu.sh --tiny   tiny sizes on CPU (smoke test)
# Environment: PYTHON (default python3), GPU_CHECK_LOG (default /tmp/agriclip_gpu_check.log; the
# lines are also printed). Nothing is installed except what is missing: a CUDA jax (`jax[cuda12]`/`jax[cuda13]`,
# matching the driver, same jax version) and missing packages of requirements.txt at their pins,
# from wheels in .whl/ if that folder exists (machines without network), else from the index.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
LOG=${GPU_CHECK_LOG:-/tmp/agriclip_gpu_check.log}
TINY=""
if [[ "${1:-}" == "--tiny" ]]; then
  TINY="--tiny"
elif [[ -n "${1:-}" ]]; then
  echo "usage: $0 [--tiny]" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# JAX takes 75% of GPU memory by default; the batch search wants nearly all of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if [[ -n "$TINY" ]]; then
  export JAX_PLATFORMS=cpu
fi

pip_install() {
  if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --find-links .whl "$@"
  else
    "$PY" -m pip install -q "$@"
  fi
}

requirement_pin() {  # the requirements.txt line of a package, e.g. flax==0.12.8
  grep -iE "^$1([=<>~ ]|$)" requirements.txt | head -n1
}

# 1. A jax that sees the GPU.
if [[ -z "$TINY" ]]; then
  if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    cuda_major=$(nvidia-smi 2>/dev/null | grep -oE "CUDA Version: [0-9]+" | grep -oE "[0-9]+$")
    if [[ -z "$cuda_major" ]]; then
      echo "gpu.sh: no GPU found (nvidia-smi reports no CUDA driver)" >&2
      exit 1
    fi
    (( cuda_major >= 13 )) && extra=cuda13 || extra=cuda12
    jax_version=$("$PY" -c "import jax; print(jax.__version__)" 2>/dev/null \
                  || requirement_pin jax | sed -E 's/^jax==//')
    echo "# installing jax[$extra]==$jax_version for the CUDA $cuda_major driver"
    if ! pip_install "jax[$extra]==$jax_version"; then
      echo "gpu.sh: could not install jax[$extra]==$jax_version (no network? put its wheels in .whl/)" >&2
      exit 1
    fi
  fi
fi

# 2. Missing requirements only (a GPU image usually has its own jax, flax, optax, numpy). Wheels
#    carried in .whl/ (benchmarks/gpu_wheels.sh makes them) go, without their dependencies, into a
#    folder of their own on PYTHONPATH, leaving the image's packages as they are.
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  echo "# installing $(ls .whl/*.whl | wc -l) carried wheels of .whl/ into $site"
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --target "$site" .whl/*.whl; then
    echo "gpu.sh: could not install the wheels of .whl/" >&2
    exit 1
  fi
  export PYTHONPATH="$PYTHONPATH:$site"
fi
for package in flax optax numpy ml_collections grain; do
  if ! "$PY" -c "import $package" 2>/dev/null; then
    pin=$(requirement_pin "$package")
    echo "# installing missing ${pin:-$package}"
    pip_install "${pin:-$package}" \
      || echo "# could not install ${pin:-$package}; the checks fall back where they can" >&2
  fi
done

"$PY" - <<'EOF'
import jax, flax, optax
print(f"# jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), "
      f"flax {flax.__version__}, optax {optax.__version__}")
EOF

# 3. The checks, each in its own process (peak memory is per process), inside the 9.5 minutes.
run_check() {  # run_check SECONDS MODULE ARGS...: output to the terminal and the log
  local seconds=$1
  shift
  timeout "$seconds" "$PY" -m "$@" 2>&1 | tee -a "$LOG"
  local code=${PIPESTATUS[0]}
  (( code == 124 )) && echo "# $1 stopped after its ${seconds} s budget" | tee -a "$LOG"
  return "$code"
}
echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(hostname) $(nvidia-smi --query-gpu=name,driver_version \
  --format=csv,noheader 2>/dev/null | head -n1)" | tee "$LOG"
status=0
if [[ -n "$TINY" ]]; then
  clip_s=600 dino_s=600  # a shared CPU compiles slowly; the smoke test has no 5-minute budget
else
  clip_s=175 dino_s=105
fi
run_check "$clip_s" benchmarks.bench_mfu --gpu-check $TINY --budget-s 110 || status=1
run_check "$dino_s" benchmarks.bench_dino_step --gpu-check $TINY || status=1
if [[ -n "$TINY" ]]; then
  # Smoke test of the --real path on the CPU: one small joint configuration, compiled only.
  run_check 600 benchmarks.bench_pod_memory --real --meshes all --models joint_vitb16 \
    --batches 8 --accumulate 1,2 || status=1
else
  # Each configuration prints its line when done: a budget cut keeps the ones before it.
  run_check 150 benchmarks.bench_pod_memory --real --meshes all --batches 512,4096 \
    --accumulate 1,8 --execute --out "${LOG%.log}_pod_memory.json" || status=1
fi

# 4. End to end: `agriclip train` (DINO ViT-S/16 multi-crop at 224 px; tiny: configs/tiny.py:dino)
#    on real JPEGs, the views rendered on the device and on the host (PIL in Grain workers); the
#    images/s of the last log window (steps after compilation), per placement.
photos=../shared/data/corn/lab
[[ -d "$photos" ]] || photos=tests/data/corn/lab
e2e_dir=$(mktemp -d)
if [[ -n "$TINY" ]]; then
  e2e_config=(--config configs/tiny.py:dino --config.batch_size=4 --config.total_steps=6
              --config.log_every_steps=3)
  e2e_s=300
else
  e2e_config=(--config configs/dino_vits16_alive.py --config.batch_size=64 --config.total_steps=30
              --config.log_every_steps=10 --config.data.num_workers="$(nproc)")
  e2e_s=60
fi
for placement in device host; do
  timeout "$e2e_s" "$PY" -m agriclip_jax train "${e2e_config[@]}" --workdir "$e2e_dir/$placement" \
      --config.data.source="$photos" --config.data.augment_on="$placement" \
      --config.checkpoint_every_steps=100000 --config.tensorboard=False >"$e2e_dir/$placement.log" 2>&1
  code=$?
  if (( code == 0 )); then
    "$PY" -c '
import json, sys
last = [json.loads(line) for line in open(sys.argv[1]) if "images_per_sec" in line][-1]
rate, step = last["images_per_sec"], last["step"]
print(f"e2e_train_{sys.argv[2]}: {rate:.1f} images/s (agriclip train, views on the "
      f"{sys.argv[2]}, step {step}, JPEGs of {sys.argv[3]})")
' "$e2e_dir/$placement/metrics.jsonl" "$placement" "$photos" | tee -a "$LOG"
  else
    echo "# e2e train with views on the $placement failed (exit $code):" | tee -a "$LOG"
    tail -n 5 "$e2e_dir/$placement.log" | tee -a "$LOG"
    status=1
  fi
done
rm -rf "$e2e_dir"
echo "# gpu.sh finished with status $status; figures also in $LOG"
exit "$status"
