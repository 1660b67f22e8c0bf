"""Input pipeline speed: images/s of the CLIP training view and of the DINO multi-crop view at
224 px, our Grain pipeline against a PyTorch DataLoader doing the same PIL work, same worker count.

Run: .venv/bin/python benchmarks/bench_pipeline.py [--quick]
Both loaders read the real corn photos (../shared/data/corn/lab), decode, augment and normalise
with the same functions (input_pipeline.transforms), batch, and hand batches to the main process;
so the ratio measures the loader machinery (Grain's mp_prefetch vs torch.utils.data workers), not
different image code. Worker start-up is excluded: the clock starts after the first batch.

Host CPU per image, by view and placement (`--cpu-only` runs just this part): time.process_time
around the host work of one process -- "host": decode + PIL view + normalise; "device": the
reduced decode + plans of input_pipeline/host_decode.py (the rendering is the accelerator's) --
on the corn photos as they are (144 px shorter side) and enlarged to 1024 px JPEGs (camera size,
where draft-mode decoding matters). Then the device renderer's own time on this CPU as a fraction
of the tiny DINO train step (bench_dino_step's QUICK sizes), both jitted, same batch, same run.
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


def _enlarged(records: list[dict], short_side: int = 1024) -> list[dict]:
  """The photos as camera-sized JPEGs: shorter side `short_side`, quality 90."""
  import io
  from PIL import Image
  out = []
  for record in records:
    image = transforms.decode_pil(record["image_bytes"])
    scale = short_side / min(image.size)
    big = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    out.append({**record, "image_bytes": buffer.getvalue()})
  return out


def host_cpu(source, count: int) -> None:
  """Host CPU-ms per image for each view and placement, same run, same photos and seeds."""
  from input_pipeline import host_decode
  records = [source[i] for i in range(count)]
  clip_view = transforms.ClipViewConfig(SIZE)
  for label, batch in (("corn", records), ("corn_1024px", _enlarged(records[:max(count // 2, 4)]))):
    for view in ("clip", "dino"):
      ms = {placement: host_decode.host_cpu_ms_per_image(batch, view, placement, clip_view)
            for placement in ("host", "device")}
      what = "CLIP view" if view == "clip" else "DINO multi-crop 2x224 + 8x96"
      for placement, value in ms.items():
        print(f"pipeline_host_cpu_ms_per_image_{view}_{placement}_{label}: {value:.2f} ms ({what}, "
              f"augment on {placement}, {len(batch)} {label} photos, process_time, 1 process)")
      print(f"pipeline_host_cpu_{view}_{label}_host_over_device: {ms['host'] / ms['device']:.1f} x "
            f"(host CPU per image, same run)", flush=True)


def device_share_of_tiny_dino_step(source, rounds: int = 5) -> None:
  """The device renderer's time on this CPU as a fraction of the tiny DINO step, same batch."""
  import statistics
  import jax
  from benchmarks import bench_dino_step
  from input_pipeline import device_augment, host_decode
  bench = bench_dino_step.QUICK
  multicrop = transforms.MultiCropConfig(global_size=bench.global_size, local_size=bench.local_size,
                                         num_local=bench.n_local)
  short = round(bench.global_size * 256 / 224)  # the 256-for-224 rule at the tiny size
  decode = host_decode.HostDecodeConfig(short_side=short, canvas=round(short * 1.5))
  taps = host_decode.blur_taps(multicrop.blur_radius)
  examples = [host_decode.device_example(host_decode.decode_reduced(source[i]["image_bytes"], decode),
                                         np.random.default_rng([0, i]), "dino", transforms.ClipViewConfig(SIZE),
                                         multicrop, taps) for i in range(bench.batch)]
  host_batch = jax.device_put({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  augment = device_augment.make_device_augment(device_augment.DeviceViews("dino", multicrop=multicrop,
                                                                          blur_taps=taps))
  crops = augment(host_batch)
  _, step, state = bench_dino_step.project_dino_step(bench)
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step(holder["state"], crops)
    jax.block_until_ready(metrics)

  def timed(run) -> float:
    run()  # compile / warm-up
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  augment_s = timed(lambda: jax.block_until_ready(augment(host_batch)))
  step_s = timed(run_step)
  sizes = f"batch {bench.batch}, 2x{bench.global_size} + {bench.n_local}x{bench.local_size}"
  print(f"pipeline_device_augment_ms: {augment_s * 1e3:.2f} ms per batch ({sizes}, canvas "
        f"{decode.canvas} px, jitted, {jax.default_backend()})")
  print(f"pipeline_tiny_dino_step_ms: {step_s * 1e3:.2f} ms per step ({sizes}, K={bench.out_dim})")
  print(f"pipeline_device_augment_over_tiny_dino_step: {100 * augment_s / step_s:.1f} % "
        f"(median of {rounds}, same run)", flush=True)
  # The full recipe rendered by XLA on this CPU: what augment_on="device" would cost here.
  full = transforms.MultiCropConfig()
  decode = host_decode.decode_config_for("dino", transforms.ClipViewConfig(SIZE), full)
  examples = [host_decode.device_example(host_decode.decode_reduced(source[i]["image_bytes"], decode),
                                         np.random.default_rng([0, i]), "dino", transforms.ClipViewConfig(SIZE),
                                         full, taps) for i in range(bench.batch)]
  host_batch = jax.device_put({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  augment = device_augment.make_device_augment(device_augment.DeviceViews("dino", multicrop=full,
                                                                          blur_taps=taps))
  full_s = timed(lambda: jax.block_until_ready(augment(host_batch)))
  print(f"pipeline_device_augment_full_recipe_ms_per_image: {full_s * 1e3 / bench.batch:.1f} ms "
        f"(2x224 + 8x96, canvas {decode.canvas} px, batch {bench.batch}, XLA on "
        f"{jax.default_backend()}; median of {rounds})", flush=True)


def main(quick: bool = False, cpu_only: bool = False) -> None:
  if not CORN.is_dir():
    print(f"pipeline: skipped (no photos at {CORN})")
    return
  source = sources.open_source(CORN)
  host_cpu(source, 8 if quick else 32)
  device_share_of_tiny_dino_step(source)
  if cpu_only:
    return
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
  parser.add_argument("--cpu-only", action="store_true", help="only the host CPU-ms per image part")
  arguments = parser.parse_args()
  main(arguments.quick, arguments.cpu_only)
