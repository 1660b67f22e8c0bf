"""`agriclip embed`: image (and text) embeddings of a model directory, saved as an .npz.

  agriclip embed --model models/clip --images photos/ --texts prompts.txt --out embeddings.npz

The .npz holds `image_paths` (sorted), `image_features` (the image tower's output before
normalisation: for DINO models the backbone's features with the pooling the model records),
`image_embeddings` (L2-normalised) and, for models with a text tower, `texts`, `text_embeddings`
(L2-normalised, one per line of --texts) and `logit_scale`.
Images get the evaluation view the model directory records (`model_io.read_preprocess`: e.g.
open_clip's for CLIP, the AgriCLIP reference's ImageNet view for DINO). One jitted forward with a
fixed batch shape (the last batch is padded) so that XLA compiles once.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from agriclip_jax import features, model_io
from input_pipeline.transforms import PreprocessSpec, load_eval_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
  parser.add_argument("--images", required=True,
                      help="a folder (searched recursively) or a text file with one image path per "
                           "line (relative paths are relative to that file's folder)")
  parser.add_argument("--texts", default=None, help="a UTF-8 text file, one text per line")
  parser.add_argument("--out", required=True, help="output .npz")
  parser.add_argument("--batch-size", type=int, default=32)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def list_images(spec: str | Path) -> list[Path]:
  """Sorted image paths from a folder (recursive, by suffix) or a list file; errors name the path."""
  spec = Path(spec)
  if spec.is_dir():
    paths = [p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
      raise FileNotFoundError(f"{spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return sorted(paths)
  if not spec.is_file():
    raise FileNotFoundError(f"--images {spec}: no such folder or list file")
  paths = []
  for number, line in enumerate(spec.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    path = Path(line.strip())
    path = path if path.is_absolute() else spec.parent / path
    if not path.is_file():
      raise FileNotFoundError(f"{spec}:{number}: image {path} not found")
    paths.append(path)
  if not paths:
    raise ValueError(f"{spec}: the list holds no image paths")
  return sorted(paths)


def read_texts(path: str | Path) -> list[str]:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--texts {path} not found")
  texts = path.read_text(encoding="utf-8").splitlines()
  empty = [i for i, text in enumerate(texts, start=1) if not text.strip()]
  if empty:
    raise ValueError(f"{path}: line {empty[0]} is empty (every line is one text to embed)")
  if not texts:
    raise ValueError(f"{path}: no texts")
  return texts


def load_pixels(path: Path, spec: PreprocessSpec) -> np.ndarray:
  """The model's eval view of one image file: float32 [S, S, 3], normalised."""
  return load_eval_image(path.read_bytes(), spec, str(path))


# ------------------------------------------------------------------------------------------------
# Model functions
# ------------------------------------------------------------------------------------------------

def image_feature_fn(model_type: str, config: Mapping[str, Any], pooling: str | None = None,
                     source: str = "model") -> Callable:
  """jitted (variables, images [B,S,S,3]) -> image features [B, E] (`features.image_features_fn`)."""
  import jax
  return jax.jit(features.image_features_fn(model_type, dict(config), pooling, source))


def text_feature_fn(config: Mapping[str, Any]) -> Callable:
  import jax
  from agriclip_jax.models.clip import CLIP
  module, _ = model_io.build_model("clip", config)
  return jax.jit(lambda variables, tokens: module.apply(variables, tokens, method=CLIP.encode_text))


def padded_batches(items: Sequence[Any], batch_size: int, load: Callable[[Any], np.ndarray],
                   workers: int = 4) -> Iterator[tuple[np.ndarray, int]]:
  """(batch of exactly `batch_size` rows, number of real rows); the last batch is zero-padded.

  Loading runs in threads one batch ahead, so decoding overlaps with the device.
  """
  if batch_size <= 0:
    raise ValueError(f"batch size must be positive, got {batch_size}")
  starts = range(0, len(items), batch_size)

  def load_batch(start: int) -> tuple[np.ndarray, int]:
    rows = [load(item) for item in items[start:start + batch_size]]
    real = len(rows)
    rows += [np.zeros_like(rows[0])] * (batch_size - real)
    return np.stack(rows), real

  with ThreadPoolExecutor(max_workers=workers) as pool:
    pending = None
    for start in starts:
      future = pool.submit(load_batch, start)
      if pending is not None:
        yield pending.result()
      pending = future
    if pending is not None:
      yield pending.result()


def run_batched(fn: Callable, variables: Any, items: Sequence[Any], batch_size: int,
                load: Callable[[Any], np.ndarray], description: str) -> np.ndarray:
  from tqdm import tqdm
  outputs = []
  total = -(-len(items) // batch_size)
  for batch, real in tqdm(padded_batches(items, batch_size, load), total=total, desc=description,
                          unit="batch", file=sys.stderr, disable=None):
    outputs.append(np.asarray(fn(variables, batch), np.float32)[:real])
  return np.concatenate(outputs)


def l2_normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

def embed(model_dir: str | Path, images: str | Path, texts_file: str | Path | None,
          batch_size: int = 32) -> dict[str, np.ndarray]:
  """The arrays that `agriclip embed` writes."""
  import jax.numpy as jnp

  model_type, config, variables = model_io.load_model_dir(model_dir)
  has_text = model_type == "clip"
  if texts_file is not None and not has_text:
    raise ValueError(f"{model_dir}: model_type {model_type!r} has no text tower; omit --texts")
  # Check every input before the slow part, so that a typo fails in a second, not after the images.
  paths = list_images(images)
  texts = read_texts(texts_file) if texts_file is not None else None
  tokens = None
  if texts is not None:
    from agriclip_jax.tokenizer import load_tokenizer
    tokens = load_tokenizer(model_dir).encode(texts, config["text"]["context_length"])
  if model_type not in model_io.IMAGE_MODEL_TYPES:
    raise ValueError(f"{model_dir}: model_type {model_type!r} does not read images")
  spec = model_io.read_preprocess(model_dir)
  forward = image_feature_fn(model_type, config, spec.pooling, str(model_dir))
  image_features = run_batched(forward, variables, paths, batch_size,
                               lambda p: load_pixels(p, spec), "images")
  result = {"image_paths": np.array([str(p) for p in paths]), "image_features": image_features,
            "image_embeddings": l2_normalise(image_features)}
  if has_text:
    result["logit_scale"] = np.float32(jnp.exp(variables["params"]["logit_scale"]))
  if tokens is not None:
    text_features = run_batched(text_feature_fn(config), variables, list(tokens), batch_size,
                                lambda row: row, "texts")
    result["texts"] = np.array(texts)
    result["text_embeddings"] = l2_normalise(text_features)
  return result


def run(args: argparse.Namespace) -> int:
  result = embed(args.model, args.images, args.texts, args.batch_size)
  out = Path(args.out)

  def write(tmp: Path) -> None:
    with open(tmp, "wb") as handle:  # a handle, so numpy does not append another .npz
      np.savez(handle, **result)

  model_io.atomic_file(out, write)
  shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in result.items())
  print(f"wrote {out}: {shapes}")
  return 0
