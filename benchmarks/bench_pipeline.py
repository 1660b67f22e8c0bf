"""Input pipeline speed: images/s of the CLIP training view and of the DINO multi-crop view at
224 px, our Grain pipeline against a PyTorch DataLoader doing the same PIL work, same worker count.

Run: .venv/bin/python benchmarks/bench_pipeline.py [--quick]
Both loaders read the real corn photos (../shared/data/corn/lab), decode, augment and normalise
with the same functions (input_pipeline.transforms), batch, and hand batches to the main process;
so the ratio measures the loader machinery (Grain's mp_prefetch vs torch.utils.data workers), not
different image code. Worker start-up is excluded: the clock starts after the first batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from input_pipeline import pipeline, sources, transforms  # noqa: E402

CORN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corn" / "lab"
WORKERS = 2
BATCH = 32
SIZE = 224


def no_tokens(captions: list[str]) -> np.ndarray:
  return np.zeros((len(captions), 77), np.int32)


class TorchPeerDataset:
  """torch.utils.data map-style dataset over the same source with the same per-image work."""

  def __init__(self, source, kind: str):
    self.source, self.kind = source, kind
    self.clip_view = transforms.ClipViewConfig(SIZE)
    self.multicrop = transforms.MultiCropConfig()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    import torch
    record = self.source[index]
    image = transforms.decode_pil(record["image_bytes"])
    # DataLoader workers share no seed scheme with Grain; an index-seeded Generator keeps the work equal.
    rng = np.random.default_rng([0, index])
    if self.kind == "clip":
      view = transforms.normalise(transforms.clip_train_view(image, rng, self.clip_view), "clip")
      return {"images": torch.from_numpy(view), "tokens": torch.from_numpy(no_tokens([record["captions"][0]])[0])}
    global_crops, local_crops = transforms.dino_multicrop(image, rng, self.multicrop)
    return {"global_crops": torch.from_numpy(transforms.normalise(global_crops, "imagenet")),
            "local_crops": torch.from_numpy(transforms.normalise(local_crops, "imagenet"))}


def _rate(iterator, batches: int) -> float:
  next(iterator)  # worker start-up and the first batch are not timed
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * BATCH / (time.perf_counter() - start)


def grain_rate(source, kind: str, batches: int) -> float:
  dataset = pipeline.make_train_dataset(
      source, kind="contrastive" if kind == "clip" else "dino", global_batch_size=BATCH, seed=0,
      tokenize=no_tokens, image_size=SIZE, num_workers=WORKERS)
  return _rate(iter(dataset), batches)


def torch_rate(source, kind: str, batches: int) -> float:
  import torch
  torch.set_num_threads(1)
  loader = torch.utils.data.DataLoader(TorchPeerDataset(source, kind), batch_size=BATCH, shuffle=True,
                                       num_workers=WORKERS, drop_last=True, persistent_workers=False)
  return _rate(iter(loader), batches)


def transform_only_rate(source, kind: str, count: int) -> float:
  """One process, no loader: the per-image cost both loaders spread over their workers."""
  peer = TorchPeerDataset(source, kind)
  peer[0]
  start = time.perf_counter()
  for index in range(1, count + 1):
    peer[index]
  return count / (time.perf_counter() - start)


def main(quick: bool = False) -> None:
  if not CORN.is_dir():
    print(f"pipeline: skipped (no photos at {CORN})")
    return
  source = sources.open_source(CORN)
  batches = {"clip": 4 if quick else 30, "dino": 2 if quick else 12}
  details = f"{SIZE} px, batch {BATCH}, {WORKERS} workers, corn lab photos, {os.cpu_count()} CPUs"
  for kind, label in (("clip", "clip_view"), ("dino", "dino_multicrop_2x224_8x96")):
    single = transform_only_rate(source, kind, 16 if quick else 64)
    ours = grain_rate(source, kind, batches[kind])
    peer = torch_rate(source, kind, batches[kind])
    print(f"pipeline_{label}_one_process_no_loader: {single:.1f} images/s (same PIL work, 1 process)")
    print(f"pipeline_{label}_grain: {ours:.1f} images/s ({details})")
    print(f"pipeline_{label}_torch_dataloader: {peer:.1f} images/s ({details})")
    print(f"pipeline_{label}_grain_over_torch: {ours / peer:.2f} x (same run)", flush=True)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  main(parser.parse_args().quick)
