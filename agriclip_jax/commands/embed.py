"""`agriclip embed`: image (and text) embeddings of a model, saved as an .npz.

  agriclip embed --model models/clip --images photos/ --texts prompts.txt --out embeddings.npz

The .npz holds `image_paths` (sorted), `image_features` (the image tower's output before
normalisation: for DINO models the backbone's features with the pooling the model records),
`image_embeddings` (L2-normalised) and, for models with a text tower, `texts`, `text_embeddings`
(L2-normalised, one per line of --texts) and `logit_scale`.
Images get the evaluation view the model directory records (`model_io.read_preprocess`: e.g.
open_clip's for CLIP, the AgriCLIP reference's ImageNet view for DINO). The model may be any that
`agriclip convert` reads; the work is the Python API's (`agriclip_jax.api`): one jitted forward
with a fixed batch shape (the last batch is padded), so that XLA compiles once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from agriclip_jax import fileio, model_io



def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True, type=fileio.input_path,
                      help="a model directory, or any CLIP / DINO file `agriclip convert` reads")
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
  """Sorted image paths from a folder (recursive, by suffix) or a list file; errors name the path.
  A folder or list file on a URL (gs://...) is read through its local copy (`fileio.local_input`);
  so are a URL list file's relative entries and any URL entry. `fileio.display_name` gives a
  path's name as the user gave it."""
  from agriclip_jax import fileio
  given = str(spec)
  if fileio.is_url(given) and not fileio.resolve_path(given).exists():
    raise FileNotFoundError(f"--images {given}: no such folder or list file")
  spec = fileio.local_input(given)
  if spec.is_dir():
    from input_pipeline.sources import list_image_files
    return list_image_files(spec)
  if not spec.is_file():
    raise FileNotFoundError(f"--images {given}: no such folder or list file")
  base = given.rsplit("/", 1)[0] if fileio.is_url(given) else None
  paths = []
  for number, line in enumerate(spec.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    entry = line.strip()
    if fileio.is_url(entry) or (base is not None and not Path(entry).is_absolute()):
      url = entry if fileio.is_url(entry) else f"{base}/{entry}"
      if not fileio.resolve_path(url).is_file():
        raise FileNotFoundError(f"{given}:{number}: image {url} not found")
      paths.append(fileio.local_input(url))
      continue
    path = Path(entry)
    path = path if path.is_absolute() else spec.parent / path
    if not path.is_file():
      raise FileNotFoundError(f"{given}:{number}: image {path} not found")
    paths.append(path)
  if not paths:
    raise ValueError(f"{given}: the list holds no image paths")
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


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

def embed(model_dir: str | Path, images: str | Path, texts_file: str | Path | None,
          batch_size: int = 32) -> dict[str, np.ndarray]:
  """The arrays that `agriclip embed` writes, through the Python API (`agriclip_jax.api`)."""
  from agriclip_jax import api
  from agriclip_jax.zeroshot import l2_normalize
  model = api.load(model_dir, batch_size=batch_size)
  if texts_file is not None and model.clip is None:
    raise ValueError(f"{model_dir}: this model has no text tower; omit --texts")
  # Check every input before the slow part, so that a typo fails in a second, not after the images.
  paths = list_images(images)
  texts = read_texts(texts_file) if texts_file is not None else None
  space = "clip" if model.clip is not None else "dino"
  image_features = model.image_features(paths, space)
  from agriclip_jax.fileio import display_name
  result = {"image_paths": np.array([display_name(p) for p in paths]), "image_features": image_features,
            "image_embeddings": l2_normalize(image_features)}
  if model.clip is not None:
    result["logit_scale"] = np.float32(model.clip.logit_scale)
  if texts is not None:
    result["texts"] = np.array(texts)
    result["text_embeddings"] = model.embed_texts(texts)
  return result


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import fileio
  out = fileio.check_writable(args.out)  # before the compute, not after it
  result = embed(args.model, args.images, args.texts, args.batch_size)

  def write(tmp: Path) -> None:
    with open(tmp, "wb") as handle:  # a handle, so numpy does not append another .npz
      np.savez(handle, **result)

  model_io.atomic_file(out, write)
  shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in result.items())
  print(f"wrote {out}: {shapes}")
  return 0
