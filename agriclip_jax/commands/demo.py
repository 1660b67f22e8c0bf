"""`agriclip demo`: the pipeline end to end on what exists so far.

Current stages: build a tiny CLIP, save it as a model directory, load it back (checked against its
config), and embed images and captions with it. Training, alignment and zero-shot stages join as
they land.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", type=Path, required=True, help="output folder")
  parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  from agriclip_jax import model_io
  from agriclip_jax.models.clip import CLIP, l2_normalize
  from agriclip_jax.models.configs import CLIPConfig, clip_config

  start = time.time()
  args.workdir.mkdir(parents=True, exist_ok=True)
  config = clip_config("tiny")
  variables = model_io.init_variables("clip", config.to_dict(), seed=args.seed)
  model_dir = model_io.save_model_dir(args.workdir / "clip_tiny", "clip", config.to_dict(), variables)
  print(f"[demo] model directory written: {model_dir}")
  model_type, config_dict, variables = model_io.load_model_dir(model_dir)
  model = CLIP(CLIPConfig.from_dict(config_dict))
  rng = np.random.default_rng(args.seed)
  images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 49406, size=(4, 77)), jnp.int32).at[:, 10].set(49407)
  out = jax.jit(model.apply)(variables, images, tokens)
  logits = np.asarray(out["logit_scale"] * out["image_embeddings"] @ out["text_embeddings"].T)
  np.savez(args.workdir / "embeddings.npz", image_embeddings=np.asarray(out["image_embeddings"]),
           text_embeddings=np.asarray(out["text_embeddings"]), logits=logits)
  print(f"[demo] {model_type}: image/text embeddings {tuple(out['image_embeddings'].shape)}, "
        f"logits {logits.shape} -> {args.workdir / 'embeddings.npz'} ({time.time() - start:.1f}s)")
  return 0
