"""DINO multi-crop train step, images/s: the project's Flax step vs a plain PyTorch step.

Both sides do the same work per step (facebookresearch/dino's `train_one_epoch` recipe):
  teacher forward on the 2 global crops; student forward on the 2 global + N local crops (crops of
  one resolution batched together, stochastic depth 0.1); DINO head (3-layer MLP, L2 normalise,
  weight-normed prototypes); DINO loss (centred, sharpened teacher); backward; per-parameter
  gradient clip 3.0; AdamW (no decay on biases and norms); last layer frozen in the first epoch;
  EMA teacher; centre update.
Flax: `agriclip_jax.train.steps.make_train_step` on a `kind="dino"` task (the project's DINO head
from models/dino.py and loss from losses.py), jitted with the state donated. PyTorch: the peer
below, written with plain torch.nn (torchvision does not import here), attention through
`F.scaled_dot_product_attention`, foreach optimizer / EMA / clipping kernels.

images/s counts samples (each with 2 + N crops). Steps of the two frameworks are interleaved
(A B A B ...) in one process with the same thread count, and the ratio is of medians.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_mfu import cost_analysis_flops, count_compilations, matmul_peak_flops


@dataclasses.dataclass(frozen=True)
class DinoBenchConfig:
  variant: str = "ViT-S/16"
  batch: int = 4
  global_size: int = 224
  local_size: int = 96
  n_local: int = 4
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  drop_path_rate: float = 0.1
  dtype: str = "float32"


QUICK = DinoBenchConfig(variant="tiny", batch=4, global_size=32, local_size=16, n_local=2,
                        out_dim=256, hidden_dim=128, bottleneck_dim=32)
FULL = DinoBenchConfig(batch=2, n_local=4)  # 2 cores: ~10 s per step and framework
STEPS_PER_EPOCH = 100  # the last layer stays frozen over the measured steps, as in epoch 0
TOTAL_STEPS = 1000


# ----------------------------------------------------------------------------------------------
# Flax: the project's DINO step
# ----------------------------------------------------------------------------------------------

def project_run_config(bench: DinoBenchConfig):
  """The project's run config (ml_collections) for a DINO task of these sizes."""
  from agriclip_jax.train.config import default_config
  cfg = default_config()
  cfg.kind = "dino"
  cfg.dtype = bench.dtype
  cfg.batch_size = bench.batch
  cfg.total_steps = TOTAL_STEPS
  cfg.data.global_crop_size = bench.global_size
  cfg.data.local_crop_size = bench.local_size
  cfg.data.n_local_crops = bench.n_local
  d = cfg.dino
  d.variant, d.out_dim, d.hidden_dim = bench.variant, bench.out_dim, bench.hidden_dim
  d.bottleneck_dim, d.drop_path_rate = bench.bottleneck_dim, bench.drop_path_rate
  return cfg


def project_dino_step(bench: DinoBenchConfig, seed: int = 0):
  """(task, jitted step, initial state) of the project's DINO train step on one device."""
  from agriclip_jax.train.state import build_task, init_state
  from agriclip_jax.train.steps import make_train_step
  task = build_task(project_run_config(bench), steps_per_epoch=STEPS_PER_EPOCH)
  state = jax.jit(lambda: init_state(task, seed))()
  step = jax.jit(make_train_step(task, None), donate_argnums=0)
  return task, step, state


def local_dino_step(bench: DinoBenchConfig, seed: int = 0):
  """The same step without the training package (for a GPU image without ml_collections):
  models/dino.py + losses.dino_loss + per-parameter clip + AdamW + EMA teacher + centre."""
  import optax
  from agriclip_jax import losses
  from agriclip_jax.models.configs import vision_config
  from agriclip_jax.models.dino import DINO, DINOConfig, DINOHeadConfig
  from agriclip_jax.train.optim import clip_by_per_param_norm
  backbone = vision_config(bench.variant, flavour="dino", image_size=bench.global_size,
                           drop_path_rate=bench.drop_path_rate, dtype=bench.dtype)
  model = DINO(DINOConfig(backbone, DINOHeadConfig(bench.out_dim, bench.hidden_dim,
                                                   bench.bottleneck_dim)))
  tx = optax.chain(clip_by_per_param_norm(3.0), optax.adamw(5e-4 * bench.batch / 256,
                                                            weight_decay=0.04))
  size = bench.global_size

  def init():
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
    return dict(params=params, teacher=params, opt_state=tx.init(params),
                centre=jnp.zeros((bench.out_dim,)), rng=jax.random.key(seed + 1))

  def step(state, batch):
    rng = jax.random.fold_in(state["rng"], 0)
    teacher_out = model.apply({"params": state["teacher"]}, batch["global_crops"], None,
                              method=DINO.multi_crop)

    def loss_fn(params):
      student_out = model.apply({"params": params}, batch["global_crops"], batch["local_crops"],
                                train=True, rngs={"dropout": rng}, method=DINO.multi_crop)
      return losses.dino_loss(student_out, teacher_out, state["centre"], 0.04)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    teacher = jax.tree.map(lambda t, s: 0.996 * t + 0.004 * s, state["teacher"], params)
    centre = losses.update_centre(state["centre"], teacher_out)
    return dict(params=params, teacher=teacher, opt_state=opt_state, centre=centre,
                rng=jax.random.fold_in(state["rng"], 1)), dict(loss=loss)

  return jax.jit(step, donate_argnums=0), jax.jit(init)()


def synthetic_crops(bench: DinoBenchConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  g, s = bench.global_size, bench.local_size
  return dict(global_crops=rng.standard_normal((bench.batch, 2, g, g, 3), np.float32),
              local_crops=rng.standard_normal((bench.batch, bench.n_local, s, s, 3), np.float32))


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------

def _timed(run: Callable[[], Any]) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main(quick: bool = False) -> None:
  import torch  # the peer's side only: the Flax-only checks need no torch

  from benchmarks.dino_torch_peer import TorchDinoStep, to_torch_crops
  bench = QUICK if quick else FULL
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  rounds = 3
  label = (f"{bench.variant} DINO, batch {bench.batch}, 2x{bench.global_size} + "
           f"{bench.n_local}x{bench.local_size} crops, K={bench.out_dim}, fp32, {threads} threads")
  print(f"# {label}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}",
        flush=True)
  crops = synthetic_crops(bench)

  task, step, state = project_dino_step(bench)
  device_crops = jax.device_put(crops)
  start = time.perf_counter()
  compiled = step.lower(state, device_crops).compile()
  compile_s = time.perf_counter() - start
  flops = cost_analysis_flops(compiled)
  del compiled  # the jit cache keeps it: the calls below reuse it
  holder = {"state": state}

  def flax_step():
    holder["state"], metrics = step(holder["state"], device_crops)
    jax.block_until_ready(metrics)

  lr = float(task.schedules["dino"]["lr"](0))
  weight_decay = float(task.schedules["dino"]["weight_decay"](0))
  peer = TorchDinoStep(bench, lr, weight_decay)
  global_crops, local_crops = to_torch_crops(crops)
  torch_step = lambda: peer(global_crops, local_crops, momentum=0.996)

  flax_step()  # warm-up (first call: no compile left, but first-touch allocations)
  torch_step()
  flax_times, torch_times = [], []
  with count_compilations() as later:
    for _ in range(rounds):
      flax_times.append(_timed(flax_step))
      torch_times.append(_timed(torch_step))
  flax_s, torch_s = statistics.median(flax_times), statistics.median(torch_times)
  peak = matmul_peak_flops(1024 if quick else 2048, jnp.float32, repeats=3)
  print(f"dino_step_flax: {bench.batch / flax_s:.2f} images/s ({label}; median of {rounds} steps "
        f"{flax_s * 1e3:.0f} ms; project step agriclip_jax.train.steps)")
  print(f"dino_step_torch: {bench.batch / torch_s:.2f} images/s ({label}; median of {rounds} steps "
        f"{torch_s * 1e3:.0f} ms; plain torch.nn peer, SDPA attention, foreach AdamW)")
  print(f"dino_step_ratio: {torch_s / flax_s:.2f} x (Flax images/s over PyTorch, same run, "
        f"interleaved steps)")
  print(f"dino_step_compile_time: {compile_s:.1f} s (Flax, lower + compile)")
  print(f"dino_step_mfu: {100 * flops / flax_s / peak:.1f} % (XLA {flops / 1e9:.1f} GFLOP/step "
        f"over median step time, of the fp32 matmul peak {peak / 1e9:.1f} GFLOP/s in this run)")
  print(f"dino_step_recompiles: {later.count} (backend compiles during the timed steps; "
        f"expected 0)")


# ----------------------------------------------------------------------------------------------
# GPU: the DINO half of benchmarks/gpu.sh
# ----------------------------------------------------------------------------------------------

def gpu_check(tiny: bool) -> None:
  """DINO ViT-S/16 multi-crop bf16 step (2x224 + 8x96): images/s, MFU, peak memory.

  The batch starts at 256 and halves while XLA's memory analysis says it does not fit.
  """
  from benchmarks.bench_mfu import H200_BF16_DENSE_PEAK, _memory_needed
  device = jax.devices()[0]
  # `tiny`: fp32 tiny model, to check this code on a CPU (XLA:CPU compiles bf16 very slowly).
  bench = QUICK if tiny else DinoBenchConfig(batch=256, n_local=8, dtype="bfloat16")
  steps = 3 if tiny else 10
  print(f"# backend {jax.default_backend()}, device {device.device_kind}", flush=True)
  peak = matmul_peak_flops(512 if tiny else 8192, jnp.bfloat16, repeats=10)
  limit = (device.memory_stats() or {}).get("bytes_limit")
  while True:
    try:
      _, step, state = project_dino_step(bench)
      source = "agriclip_jax.train.steps (kind dino)"
    except ImportError as error:
      print(f"# agriclip_jax.train unavailable ({error}); measuring the local equivalent step")
      step, state = local_dino_step(bench)
      source = "bench_dino_step.local_dino_step"
    crops = jax.device_put(synthetic_crops(bench))
    start = time.perf_counter()
    compiled = step.lower(state, crops).compile()
    compile_s = time.perf_counter() - start
    needed = _memory_needed(compiled)
    if limit is None or needed is None or needed <= 0.95 * limit or bench.batch <= 8:
      break
    print(f"# batch {bench.batch} needs {needed / 2**30:.1f} GiB of {limit / 2**30:.1f}: halving",
          flush=True)
    bench = dataclasses.replace(bench, batch=bench.batch // 2)
  flops = cost_analysis_flops(compiled)
  del compiled
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], crops)
    jax.block_until_ready(metrics)

  run()
  with count_compilations() as later:
    step_s = statistics.median(_timed(run) for _ in range(steps))
  label = (f"{bench.variant} {bench.dtype}, batch {bench.batch}, 2x{bench.global_size} + "
           f"{bench.n_local}x{bench.local_size}, K={bench.out_dim}; {source}")
  stats = device.memory_stats() or {}
  print(f"gpu_dino_images_per_s: {bench.batch / step_s:.1f} images/s ({label}; median of {steps} "
        f"steps of {step_s * 1e3:.1f} ms)")
  print(f"gpu_dino_compile_time: {compile_s:.1f} s ({label})")
  print(f"gpu_dino_mfu_vs_datasheet: {100 * flops / step_s / H200_BF16_DENSE_PEAK:.1f} % (XLA "
        f"{flops / 1e12:.3f} TFLOP/step over 989 TFLOP/s)")
  print(f"gpu_dino_mfu_vs_measured: {100 * flops / step_s / peak:.1f} % (over the bf16 matmul "
        f"peak {peak / 1e12:.1f} TFLOP/s measured in this process)")
  print(f"gpu_dino_peak_memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB (memory_stats)"
        if "peak_bytes_in_use" in stats else "gpu_dino_peak_memory: n/a (no memory_stats)")
  print(f"gpu_dino_recompiles: {later.count} (expected 0)")


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--gpu-check", action="store_true", help="the DINO half of gpu.sh")
  parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test of --gpu-check)")
  args = parser.parse_args()
  if args.gpu_check:
    gpu_check(args.tiny)
  else:
    main(args.quick)
