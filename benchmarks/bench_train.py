"""Contrastive train-step throughput (images/s): agriclip-jax against transformers.CLIPModel.

The same CLIP on both sides -- the tiny one (configs/tiny.py sizes: 32 px images, patch 8, width 64,
2 layers, embed 32) and, outside --quick, ViT-B/16 at 224 px (text tower 512 wide, 12 layers) --
with the toy captions (vocab 16, context 8), the same global batch, AdamW, symmetric InfoNCE, on
this machine's CPU, one JAX device against PyTorch's default threads. Steps after the first
(compilation / warm-up) are timed.

  python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from agriclip_jax.train import state as state_lib  # noqa: E402
from agriclip_jax.train import steps as steps_lib  # noqa: E402
from agriclip_jax.train.sharding import make_mesh  # noqa: E402
from agriclip_jax.testing.toy_data import TOY_CONTEXT_LENGTH, TOY_VOCAB_SIZE, make_toy_dataset  # noqa: E402
from configs import tiny  # noqa: E402


def _batches(cfg, n: int) -> list[dict]:
  it = iter(make_toy_dataset("contrastive", global_batch_size=cfg.batch_size, seed=0,
                             n_records=max(64, cfg.batch_size * 2), image_size=cfg.data.image_size,
                             global_crop_size=32, local_crop_size=16, n_local_crops=0))
  return [next(it) for _ in range(n)]


# name -> (our variant, image size, HF vision dims, HF text dims, projection dim)
MODELS = {
    "tiny": ("tiny", 32, dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, patch_size=8),
             dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2), 32),
    "ViT-B/16": ("ViT-B/16", 224, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, patch_size=16),
                 dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8), 512),
}


def _config(model: str, batch_size: int):
  variant, image_size = MODELS[model][:2]
  cfg = tiny.get_config("contrastive")
  cfg.batch_size = batch_size
  cfg.clip.variant = variant
  cfg.data.image_size = image_size
  return cfg


def jax_images_per_sec(model: str, batch_size: int, steps: int, patch_dropout: float = 0.0) -> float:
  cfg = _config(model, batch_size)
  cfg.clip.patch_dropout = patch_dropout
  cfg.fast_compile = False  # measure the optimised program
  cfg.mesh.data = 1
  mesh = make_mesh(1, 1, jax.devices()[:1])
  task = state_lib.build_task(cfg, steps_per_epoch=100)
  state, shardings = state_lib.create_sharded_state(task, mesh, cfg)
  step = steps_lib.jit_train_step(task, mesh, shardings)
  batches = _batches(cfg, steps + 1)
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return batch_size * steps / (time.perf_counter() - start)


def torch_images_per_sec(model_name: str, batch_size: int, steps: int) -> float:
  import torch
  import transformers
  _, image_size, vision, text, projection = MODELS[model_name]
  config = transformers.CLIPConfig(
      text_config=dict(text, vocab_size=TOY_VOCAB_SIZE, max_position_embeddings=TOY_CONTEXT_LENGTH,
                       eos_token_id=TOY_VOCAB_SIZE - 1, bos_token_id=1, pad_token_id=0),
      vision_config=dict(vision, image_size=image_size),
      projection_dim=projection)
  model = transformers.CLIPModel(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
  cfg = _config(model_name, batch_size)
  batches = [(torch.from_numpy(np.ascontiguousarray(b["images"].transpose(0, 3, 1, 2))),
              torch.from_numpy(b["tokens"]).long()) for b in _batches(cfg, steps + 1)]

  def train_step(images, tokens):
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, pixel_values=images, return_loss=True).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(max=np.log(100.0))

  train_step(*batches[0])
  start = time.perf_counter()
  for images, tokens in batches[1:]:
    train_step(images, tokens)
  return batch_size * steps / (time.perf_counter() - start)


def main(quick: bool = False) -> None:
  runs = [("tiny", 64, 10)] if quick else [("tiny", 256, 30), ("ViT-B/16", 8, 3)]
  for model, batch_size, steps in runs:
    ours = jax_images_per_sec(model, batch_size, steps)
    theirs = torch_images_per_sec(model, batch_size, steps)
    detail = f"{model} CLIP, batch {batch_size}, {steps} timed steps, CPU, {os.cpu_count()} cores"
    tag = "" if model == "tiny" else "_vitb16"
    print(f"train_step_images_per_sec_jax{tag}: {ours:.2f} images/s ({detail})", flush=True)
    print(f"train_step_images_per_sec_torch{tag}: {theirs:.2f} images/s (transformers.CLIPModel, {detail})")
    print(f"train_step_speed_ratio_jax_over_torch{tag}: {ours / theirs:.2f} x (same run)", flush=True)


if __name__ == "__main__":
  main(quick="--quick" in sys.argv)
