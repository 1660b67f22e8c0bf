"""Peak memory of the sharded (local) InfoNCE against the dense one, from XLA's memory analysis.

Both compile loss + gradients for the same global batch: dense on one device (the B x B logits),
sharded over 8 simulated CPU devices (B/8 x B logits per device). Nothing is run; the figures are
XLA's own per-device accounting of the compiled programs.

  python benchmarks/bench_infonce_memory.py [--quick]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from agriclip_jax import losses  # noqa: E402


def _peak_bytes(compiled) -> int:
  analysis = compiled.memory_analysis()
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
             analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


def measure(batch: int, dim: int, n_devices: int = 8) -> tuple[int, int]:
  embeddings = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  dense_grad = jax.jit(jax.value_and_grad(losses.infonce_loss, argnums=(0, 1, 2)))
  dense = dense_grad.lower(embeddings, embeddings, scale).compile()

  mesh = Mesh(np.array(jax.devices()[:n_devices]).reshape(n_devices, 1), ("data", "fsdp"))
  sharded_in = jax.ShapeDtypeStruct((batch, dim), jnp.float32,
                                    sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  scale_in = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  sharded_grad = jax.jit(jax.value_and_grad(
      lambda i, t, s: losses.infonce_loss_sharded(i, t, s, mesh), argnums=(0, 1, 2)))
  sharded = sharded_grad.lower(sharded_in, sharded_in, scale_in).compile()
  return _peak_bytes(dense), _peak_bytes(sharded)


def main(quick: bool = False) -> None:
  batch, dim = (4096, 512) if quick else (16384, 512)
  dense, sharded = measure(batch, dim)
  print(f"infonce_dense_peak_bytes: {dense / 2**20:.1f} MiB (batch {batch}, dim {dim}, 1 device, "
        "loss+grads, XLA memory_analysis)")
  print(f"infonce_sharded_peak_bytes_per_device: {sharded / 2**20:.1f} MiB (batch {batch}, dim "
        f"{dim}, 8 simulated CPU devices, local loss)")
  print(f"infonce_memory_ratio_dense_over_sharded: {dense / sharded:.2f} x (same run)")


if __name__ == "__main__":
  main(quick="--quick" in sys.argv)
