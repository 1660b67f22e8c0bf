"""Generated, structured image-caption records for tiny runs: no files, fully deterministic.

Each record shows a coloured square (4 colours) in one of 4 quadrants over a background with one
of 4 textures; its caption is the three tokens naming colour, quadrant and texture (64 distinct
captions). The content of an image determines its caption, so a contrastive model can learn to
retrieve the right caption, and DINO crops of one image share colour and texture.

Records are random-access (`ToyRecords[i]`), so Grain drives them like any other source: shuffle,
per-record random crops, batching, per-process slicing, and an iterator whose state can be saved.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

N_COLOURS, N_QUADRANTS, N_TEXTURES = 4, 4, 4
N_CAPTIONS = N_COLOURS * N_QUADRANTS * N_TEXTURES
PAD, BOS = 0, 1
TOY_VOCAB_SIZE = 16
EOT = TOY_VOCAB_SIZE - 1  # the largest id, where the text tower pools
TOY_CONTEXT_LENGTH = 8
_COLOURS = np.array([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]],
                    np.float32)


def caption_tokens(label: int) -> np.ndarray:
  colour, quadrant, texture = label // 16, (label // 4) % 4, label % 4
  tokens = np.full((TOY_CONTEXT_LENGTH,), PAD, np.int32)
  tokens[:5] = [BOS, 2 + colour, 6 + quadrant, 10 + texture, EOT]
  return tokens


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """[size, size, 3] float32 around 0 (already 'normalised')."""
  colour, quadrant, texture = label // 16, (label // 4) % 4, label % 4
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
  patterns = [np.sin(12 * np.pi * ys), np.sin(12 * np.pi * xs),
              np.sign(np.sin(8 * np.pi * xs) * np.sin(8 * np.pi * ys)), np.zeros_like(xs)]
  image = np.repeat((0.5 * patterns[texture])[..., None], 3, axis=-1)
  half = size // 2
  top, left = (quadrant // 2) * half, (quadrant % 2) * half
  margin = size // 8
  image[top + margin:top + half - margin, left + margin:left + half - margin] = _COLOURS[colour]
  image += rng.normal(scale=0.1, size=image.shape).astype(np.float32)
  return image.astype(np.float32)


class ToyRecords:
  """Random-access source of {'image', 'tokens', 'label'} records."""

  def __init__(self, n_records: int, image_size: int, seed: int = 0):
    if n_records < 1:
      raise ValueError(f"data.toy_records={n_records} must be positive")
    self._n, self._size, self._seed = n_records, image_size, seed

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._n:
      raise IndexError(f"toy record {index} out of range [0, {self._n})")
    rng = np.random.default_rng([self._seed, index])
    label = int(rng.integers(N_CAPTIONS))
    return {"image": render(label, self._size, rng), "tokens": caption_tokens(label),
            "label": np.int32(label)}


def sample_crop_box(full: int, scale: tuple[float, float],
                    rng: np.random.Generator) -> tuple[int, int, int]:
  """(top, left, side) of a square crop covering a random fraction in `scale` of the area."""
  # Round to whole pixels but stay inside the range the pixel grid allows, so that the realised
  # area fraction side^2 / full^2 lies in `scale` whenever some whole side can.
  smallest = min(max(int(np.ceil(full * np.sqrt(scale[0]) - 1e-9)), 2), full)
  largest = max(int(np.floor(full * np.sqrt(scale[1]) + 1e-9)), smallest)
  side = int(np.clip(round(full * np.sqrt(rng.uniform(*scale))), smallest, min(largest, full)))
  top, left = rng.integers(0, full - side + 1, size=2)
  return int(top), int(left), side


def random_resized_crop(image: np.ndarray, size: int, scale: tuple[float, float],
                        rng: np.random.Generator) -> np.ndarray:
  """A square crop of a random fraction of the area, resized (nearest) to size, random flip."""
  top, left, side = sample_crop_box(image.shape[0], scale, rng)
  index = top + (np.arange(size) * side // size)
  cols = left + (np.arange(size) * side // size)
  crop = image[index][:, cols]
  return crop[:, ::-1] if rng.random() < 0.5 else crop


class ToyViews(grain.transforms.RandomMap):
  """Record -> training views for `kind`: CLIP image + tokens and/or DINO multi-crop."""

  def __init__(self, kind: str, global_size: int, local_size: int, n_local: int,
               global_scale: tuple[float, float] = (0.4, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.4)):
    self._kind, self._global, self._local, self._n_local = kind, global_size, local_size, n_local
    self._global_scale, self._local_scale = tuple(global_scale), tuple(local_scale)

  def random_map(self, record: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if self._kind in ("contrastive", "joint"):
      out["images"], out["tokens"] = record["image"], record["tokens"]
    if self._kind in ("dino", "joint"):
      image = record["image"]
      out["global_crops"] = np.stack(
          [random_resized_crop(image, self._global, self._global_scale, rng) for _ in range(2)])
      local = [random_resized_crop(image, self._local, self._local_scale, rng)
               for _ in range(self._n_local)]
      out["local_crops"] = (np.stack(local) if local else
                            np.zeros((0, self._local, self._local, 3), np.float32))
    return out


def make_toy_dataset(kind: str, *, global_batch_size: int, seed: int, n_records: int,
                     image_size: int, global_crop_size: int, local_crop_size: int,
                     n_local_crops: int, process_index: int = 0, process_count: int = 1,
                     global_crop_scale: tuple[float, float] = (0.4, 1.0),
                     local_crop_scale: tuple[float, float] = (0.05, 0.4)) -> grain.IterDataset:
  """Per-process batches whose concatenation over processes is the single-process global batch.

  Records are batched in chunks of global_batch / process_count and process p takes chunks
  p, p + P, ...: global batch g is chunks g*P .. g*P + P - 1 in process order, exactly the rows a
  single process would see, so any process count trains on the same global batches.
  """
  if global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by {process_count} processes")
  local_batch = global_batch_size // process_count
  source = ToyRecords(n_records, max(image_size, global_crop_size), seed)
  views = ToyViews(kind, global_crop_size, local_crop_size, n_local_crops, global_crop_scale,
                   local_crop_scale)
  dataset = (grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
             .random_map(views).batch(local_batch, drop_remainder=True))
  return dataset[process_index::process_count].to_iter_dataset()
