"""Image embedding throughput: the `agriclip embed` path (JAX) against PyTorch's HF CLIPModel.

Both sides run the same weights (a random HF CLIPModel ported by our converter), the same batch of
real photos preprocessed once by the embed path, on the same CPU; torch gets as many threads as the
cores XLA uses. Figures, one line each:
  - `*_forward_*`: the image tower alone (jitted apply vs torch.no_grad get_image_features);
  - `*_embed_path_*`: decode + CLIP eval view + forward over a folder of photos, as `agriclip embed`
    runs it (threaded decoding, fixed padded batch), against the same loader feeding torch.

  python benchmarks/bench_embed.py          # full
  python benchmarks/bench_embed.py --quick  # a short smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORN = REPO.parent / "shared" / "data" / "corn"


def hf_clip(name: str):
  import torch
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(0)
  if name == "tiny":
    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(common), vision_config=dict(common, image_size=32, patch_size=8),
                        projection_dim=32)
  else:
    config = CLIPConfig(vision_config=dict(patch_size=16))  # HF defaults otherwise: ViT-B/16
  return CLIPModel(config).eval()


def port(model) -> tuple[dict, dict]:
  """The HF model's weights through our converter (in memory, no files)."""
  from agriclip_jax import model_io
  from agriclip_jax.convert import clip_formats
  config = clip_formats.hf_config_to_ours(model.config.to_dict(), "benchmark")
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  variables = clip_formats.torch_layout_to_flax(
      state, clip_formats.clip_rules(config, "hf"),
      model_io.abstract_variables("clip", config.to_dict()), "benchmark")
  return config.to_dict(), variables


def timed(fn, repeats: int) -> float:
  """Seconds per call: best of `repeats` after one warm-up (compilation, caches)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def photo_paths(count: int) -> list[Path]:
  paths = sorted(CORN.rglob("*.jpg"))
  if not paths:
    raise SystemExit(f"no photos under {CORN}")
  return paths[:count]


def bench(name: str, batch: int, images: int, repeats: int, threads: int) -> None:
  import jax
  import torch
  from agriclip_jax import api, features, model_io
  from input_pipeline.transforms import load_eval_image

  model = hf_clip(name)
  config, variables = port(model)
  size = config["vision"]["image_size"]
  spec = model_io.preprocess_for("clip", config)
  paths = photo_paths(images)

  def load(path):
    return load_eval_image(path.read_bytes(), spec, str(path))

  pixels = np.stack([load(p) for p in paths[:batch]])
  jax_forward = jax.jit(features.image_features_fn("clip", config))
  torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

  def run_jax():
    return np.asarray(jax.block_until_ready(jax_forward(variables, pixels)))

  def run_torch():
    with torch.no_grad():
      return model.get_image_features(pixel_values=torch_pixels).pooler_output.numpy()

  diff = float(np.abs(run_jax() - run_torch()).max())
  jax_s, torch_s = timed(run_jax, repeats), timed(run_torch, repeats)
  details = f"batch {batch}, {size}px, fp32, {threads} CPU threads, max abs diff {diff:.1e}"
  print(f"embed_{name}_forward_jax: {batch / jax_s:.1f} images/s ({details})")
  print(f"embed_{name}_forward_torch: {batch / torch_s:.1f} images/s ({details})")
  print(f"embed_{name}_forward_ratio_jax_over_torch: {torch_s / jax_s:.2f} x ({details})")

  def torch_path():
    outputs = []
    for start in range(0, len(paths), batch):
      tensor = torch.from_numpy(np.stack([load(p) for p in paths[start:start + batch]])
                                .transpose(0, 3, 1, 2).copy())
      with torch.no_grad():
        outputs.append(model.get_image_features(pixel_values=tensor).pooler_output.numpy())
    return np.concatenate(outputs)

  # The path `agriclip embed` and the Python API take: decode + view threads, one compiled forward.
  image = features.spec_encoder("clip_image", name, spec, features.image_features_fn("clip", config),
                                variables)
  ours = api.Model(clip=features.ClipEncoders(image, None, 100.0), batch_size=batch)

  def jax_path():
    return ours.image_features(paths, "clip")

  jax_s, torch_s = timed(jax_path, 1), timed(torch_path, 1)
  details = (f"{len(paths)} corn photos decoded + eval view + forward, batch {batch}, {size}px, "
             f"{threads} CPU threads")
  print(f"embed_{name}_embed_path_jax: {len(paths) / jax_s:.1f} images/s ({details})")
  print(f"embed_{name}_embed_path_torch: {len(paths) / torch_s:.1f} images/s ({details})")
  print(f"embed_{name}_embed_path_ratio_jax_over_torch: {torch_s / jax_s:.2f} x ({details})")


def main(quick: bool) -> None:
  import jax
  import torch
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)  # XLA's CPU backend uses every core it is given
  print(f"# {platform.processor() or platform.machine()}, {threads} cores, jax {jax.__version__}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
  bench("tiny", batch=32, images=64 if quick else 256, repeats=3 if quick else 10, threads=threads)
  bench("vitb16", batch=4, images=8 if quick else 32, repeats=2 if quick else 5, threads=threads)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  main(parser.parse_args().quick)
