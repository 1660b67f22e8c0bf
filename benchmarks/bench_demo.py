"""The main job, measured: `agriclip demo` wall time per stage, zero-shot accuracy per method with
chance, and the corn runs on real photographs.

Figures:
- demo_<stage>_s, demo_total_s: wall time of each stage of the default demo (ALive-synth).
- demo_mean_<method>_top1 and demo_mean_chance: mean top-1 over the downstream tasks.
- demo_<task>_<method>_top1: per task, with chance in the details.
- corn_field_<method>_top1: trained on corn/lab (captions from configs/corn_metadata.json),
  zero-shot on corn/field (a domain shift: lab photos -> field photos).
- corn_lab_half_<method>_top1: trained on a random half of corn/lab, zero-shot on the other half.
  `--quick` runs the quick / real_quick configs (a smoke run; its accuracies mean little).

  python -m benchmarks.bench_demo [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CORN_DIR = REPO_ROOT.parent / "shared" / "data" / "corn"
METHODS = ("clip", "agriclip", "ensemble")


def _run(workdir: Path, config_arg: str, **options) -> tuple[dict, dict]:
  import json
  from agriclip_jax import demo
  config = demo.load_config(demo.DEFAULT_CONFIG, config_arg)
  document = demo.run_demo(demo.DemoOptions(workdir, **options), config)
  timings = json.loads((workdir / "timings.json").read_text())
  return document, timings


def _print_accuracy(prefix: str, document: dict, details: str) -> None:
  for name, task in document["tasks"].items():
    for method in METHODS:
      print(f"{prefix}{name}_{method}_top1: {100 * task['accuracy'][method]:.1f} % "
            f"(chance {100 * task['chance']:.1f} %, {task['num_classes']} classes, "
            f"{task['num_images']} images; {details})", flush=True)


def bench_synthetic(root: Path, quick: bool) -> None:
  arg = "quick" if quick else "default"
  cpu = time.process_time()
  document, timings = _run(root / "synthetic", arg)
  details = f"configs/demo.py:{arg}, {os.cpu_count()} CPUs"
  for stage, seconds in timings.items():
    print(f"demo_{stage}_s: {seconds:.1f} s (wall; {details})", flush=True)
  print(f"demo_process_cpu_s: {time.process_time() - cpu:.1f} s (CPU time of all threads)")
  mean = document["mean"]
  for method in METHODS:
    print(f"demo_mean_{method}_top1: {100 * mean[method]:.1f} % (chance {100 * mean['chance']:.1f} %, "
          f"{len(document['tasks'])} tasks; {100 * mean[method] / max(mean['chance'], 1e-9):.0f} % "
          f"of chance x100)", flush=True)
  print(f"demo_mean_chance: {100 * mean['chance']:.1f} %")
  _print_accuracy("demo_", document, details)


def bench_corn(root: Path, quick: bool) -> None:
  if not CORN_DIR.is_dir():
    print(f"corn: skipped, {CORN_DIR} not found")
    return
  arg = "real_quick" if quick else "real"
  metadata = str(REPO_ROOT / "configs" / "corn_metadata.json")
  details = f"configs/demo.py:{arg}, captions from configs/corn_metadata.json"
  document, timings = _run(root / "corn_field", arg, data=str(CORN_DIR / "lab"),
                           metadata=metadata, evals=(str(CORN_DIR / "field"),), export=False)
  print(f"corn_field_total_s: {timings['total']:.1f} s (train on lab/, zero-shot on field/)")
  for method in METHODS:
    task = document["tasks"]["field"]
    print(f"corn_field_{method}_top1: {100 * task['accuracy'][method]:.1f} % (chance "
          f"{100 * task['chance']:.1f} %, {task['num_images']} field images; {details})", flush=True)
  document, timings = _run(root / "corn_half", arg, data=str(CORN_DIR / "lab"), metadata=metadata,
                           holdout=0.5, export=False)
  print(f"corn_lab_half_total_s: {timings['total']:.1f} s (train on half of lab/, zero-shot on "
        f"the other half)")
  for method in METHODS:
    task = document["tasks"]["lab_heldout"]
    print(f"corn_lab_half_{method}_top1: {100 * task['accuracy'][method]:.1f} % (chance "
          f"{100 * task['chance']:.1f} %, {task['num_images']} held-out lab images; {details})",
          flush=True)


def main(quick: bool = False, only: str | None = None) -> None:
  with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
    root = Path(tmp)
    if only in (None, "synthetic"):
      bench_synthetic(root, quick)
    if only in (None, "corn"):
      bench_corn(root, quick)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", choices=("synthetic", "corn"), default=None)
  args = parser.parse_args()
  main(args.quick, args.only)
