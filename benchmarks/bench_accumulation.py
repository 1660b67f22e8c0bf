"""Peak memory of the contrastive train step with exact (GradCache) accumulation, by micro-batches.

The same global batch compiled with accumulate_steps = 1, 2, 4, 8, on one CPU device; nothing is
run: the figures are XLA's memory analysis of each compiled step (parameters, optimiser state and
batch are the arguments; activations and the rest are temporaries). The towers are the tiny CLIP
at 64 px, so that activations, which accumulation divides, dominate as they do at scale.

  python benchmarks/bench_accumulation.py [--quick]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from agriclip_jax.train import state as state_lib  # noqa: E402
from agriclip_jax.train import steps as steps_lib  # noqa: E402
from agriclip_jax.train.sharding import batch_sharding, make_mesh  # noqa: E402
from configs import tiny  # noqa: E402


def compiled_step(batch_size: int, accumulate_steps: int, image_size: int):
  cfg = tiny.get_config("contrastive")
  cfg.batch_size, cfg.accumulate_steps = batch_size, accumulate_steps
  cfg.data.image_size = image_size
  cfg.mesh.data = cfg.mesh.fsdp = 1
  mesh = make_mesh(1, 1, jax.devices()[:1])
  task = state_lib.build_task(cfg, steps_per_epoch=10)
  state, shardings = state_lib.create_sharded_state(task, mesh, cfg)
  sharding = batch_sharding(mesh)
  batch = {"images": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32,
                                          sharding=sharding),
           "tokens": jax.ShapeDtypeStruct((batch_size, cfg.data.context_length), jnp.int32,
                                          sharding=sharding)}
  step = steps_lib.jit_train_step(task, mesh, shardings, fast_compile=False)
  return step.lower(state, batch).compile()


def main(quick: bool = False) -> None:
  batch, size = (128, 32) if quick else (512, 64)
  base = None
  for k in (1, 2, 4, 8):
    analysis = compiled_step(batch, k, size).memory_analysis()
    temp = int(analysis.temp_size_in_bytes)
    base = base or temp
    print(f"accumulation_temp_bytes_k{k}: {temp / 2**20:.1f} MiB (global batch {batch} at {size} "
          f"px, tiny CLIP, exact accumulation, {temp / base:.2f} x k=1; arguments "
          f"{analysis.argument_size_in_bytes / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
  main(quick="--quick" in sys.argv)
