"""ALive-synth speed: render rate per domain at 64 px on one core, and the demo-sized writers.

Run: .venv/bin/python benchmarks/bench_synthetic.py [--quick]
Figures: render rate (wall and process CPU time, so a shared machine still gives the per-core rate),
the ratio to the 500 images/s target, the rate of decoding the written PNGs (a peer measured in the
same run: rendering should not be slower than reading the images back), and the wall time of
writing the default demo set (3000 pretraining images + the downstream tasks at 64 px).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core (numpy's element-wise ops are serial)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agriclip_jax.testing import synthetic as syn  # noqa: E402

TARGET_IMAGES_PER_S = 500.0


def _specs(domain: str) -> list[syn.SampleSpec]:
  return [syn.SampleSpec(s, c, style) for style in (syn.PRETRAIN_STYLE, syn.SHIFTED_STYLE)
          for s in syn.SUBJECTS[domain] for c in syn.CONDITIONS[domain]]


def _render_rate(specs: list[syn.SampleSpec], count: int, size: int,
                 repeats: int = 5) -> tuple[float, float]:
  """(images per wall second, images per CPU second), each the best of `repeats` runs of `count`.

  The best run is the one least disturbed by other processes on a shared machine.
  """
  for i in range(10):  # warm caches (frame grid, imports)
    syn.render(specs[i % len(specs)], size, np.random.default_rng(i))
  best_wall = best_cpu = 0.0
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
      syn.render(specs[i % len(specs)], size, np.random.default_rng(i))
    best_wall = max(best_wall, count / (time.perf_counter() - wall))
    best_cpu = max(best_cpu, count / max(time.process_time() - cpu, 1e-9))
  return best_wall, best_cpu


def main(quick: bool) -> None:
  size, count = 64, (150 if quick else 600)
  all_specs = []
  for domain in syn.DOMAINS:
    specs = _specs(domain)
    all_specs.extend(specs)
    wall_rate, cpu_rate = _render_rate(specs, count // 3, size)
    print(f"render_rate_{domain}: {wall_rate:.0f} images/s ({cpu_rate:.0f} per CPU-second, "
          f"{size} px, one core, best of 5 x {count // 3} images)")
  wall_rate, cpu_rate = _render_rate(all_specs, count, size)
  print(f"render_rate_all: {wall_rate:.0f} images/s ({cpu_rate:.0f} per CPU-second, {size} px, "
        f"one core, best of 5 x {count} images over all subjects, conditions and both styles)")
  print(f"render_rate_vs_target: {cpu_rate / TARGET_IMAGES_PER_S:.2f} x "
        f"(CPU-time rate / {TARGET_IMAGES_PER_S:.0f} images/s)")

  num_pretrain, per_class = (600, 4) if quick else (3000, 20)
  with tempfile.TemporaryDirectory() as tmp:
    start, cpu = time.perf_counter(), time.process_time()
    root = syn.write_pretraining_set(Path(tmp) / "pretrain", num_pretrain, size, seed=0)
    pretrain_s, pretrain_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    tasks = syn.write_downstream_tasks(Path(tmp) / "tasks", size, seed=0,
                                       images_per_class=per_class)
    tasks_s, tasks_cpu = time.perf_counter() - start, time.process_time() - cpu
    task_images = sum(t.num_images for t in tasks)
    files = sorted(root.rglob("*.png"))
    megabytes = sum(p.stat().st_size for p in files) / 2 ** 20
    start = time.perf_counter()
    for p in files:
      np.asarray(Image.open(p).convert("RGB"))
    decode_rate = len(files) / (time.perf_counter() - start)
  print(f"write_pretraining_set: {pretrain_s:.2f} s ({pretrain_cpu:.2f} CPU-s; {num_pretrain} "
        f"images, {size} px, {megabytes:.1f} MiB PNG, rendering + encoding + writing)")
  print(f"write_downstream_tasks: {tasks_s:.2f} s ({tasks_cpu:.2f} CPU-s; {len(tasks)} tasks, "
        f"{task_images} images, {per_class} per class)")
  print(f"png_decode_rate: {decode_rate:.0f} images/s (peer: PIL reading the written PNGs; "
        f"render/decode = {wall_rate / decode_rate:.2f} x)")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  main(parser.parse_args().quick)
