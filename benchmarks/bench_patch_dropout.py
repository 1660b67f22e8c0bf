"""FLIP patch dropout: contrastive train-step throughput with half the image patches dropped
against none, same model, batch and machine, measured one after the other in one process.

  python benchmarks/bench_patch_dropout.py [--quick]     (ViT-B/16 at 224 px, batch 8; quick: tiny)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks.bench_train import jax_images_per_sec  # noqa: E402


def main(quick: bool = False) -> None:
  model, batch_size, steps = ("tiny", 64, 10) if quick else ("ViT-B/16", 8, 3)
  rates = {p: jax_images_per_sec(model, batch_size, steps, patch_dropout=p) for p in (0.0, 0.5)}
  print(f"patch_dropout_speedup: {rates[0.5] / rates[0.0]:.2f} x ({rates[0.5]:.2f} / "
        f"{rates[0.0]:.2f} img/s at patch dropout 0.5 / 0; {model} CLIP, batch {batch_size}, "
        f"{steps} timed steps, CPU, {os.cpu_count()} cores, same run)")


if __name__ == "__main__":
  main(quick="--quick" in sys.argv)
