"""Zero-shot images/s of the released-bundle recipe: the one path vs the old one vs PyTorch.

The three classify the same corn field photos (at their own sizes) with the same random-weight
files of the released bundle (a torchvision ResNet-50 `dino_pretrain.pth`, an aligner `.pth`, a
small OpenAI-layout CLIP `.pt`):
- one path: `reference_bundle.run_reference_zeroshot` over `zeroshot.score_task` (Grain reads and
  decodes in threads; fixed-shape batches on the mesh);
- old path: the project's previous `reference_bundle.py` (its own loop: decode, view and batch in
  the main thread), read from git at OLD_COMMIT, the commit before the merge;
- PyTorch: the reference script as tests/torch_reference_script.py writes it (torchvision
  ImageFolder + transforms, DataLoader in the main process, torch's CPU kernels).
Each runs twice; the second run is timed (compilation and file loading excluded as far as each
allows: model loading is inside every run, as a user sees it). Predictions are compared too.

  python -m benchmarks.bench_zeroshot [--images 96] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "a0f8c99"


def make_bundle(root: Path) -> None:
  import open_clip
  import torch
  import torchvision
  torch.manual_seed(0)
  resnet = torchvision.models.resnet50()
  resnet.fc = torch.nn.Identity()
  torch.save(resnet.eval().state_dict(), root / "dino_pretrain.pth")
  clip = open_clip.model.CLIP(
      embed_dim=32, quick_gelu=True,
      vision_cfg={"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 64},
      text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2})
  torch.save(clip.state_dict(), root / "ViT-tiny.pt")
  generator = torch.Generator().manual_seed(1)
  torch.save({"W": 0.02 * torch.randn(32, 2048, generator=generator),
              "b": 0.1 * torch.randn(32, generator=generator)}, root / "aligner.pth")


def photo_subset(field: Path, count: int, out: Path) -> int:
  """The first photos of each class, round robin, `count` in all."""
  folders = sorted(p for p in field.iterdir() if p.is_dir())
  lists = [sorted(f.glob("*.jpg")) for f in folders]
  taken = 0
  for index in range(max(len(x) for x in lists)):
    for folder, photos in zip(folders, lists):
      if taken < count and index < len(photos):
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photos[index], out / folder.name / photos[index].name)
        taken += 1
  return taken


def old_module(scratch: Path):
  text = subprocess.run(["git", "show", f"{OLD_COMMIT}:agriclip_jax/reference_bundle.py"],
                        cwd=REPO, capture_output=True, text=True, check=True).stdout
  path = scratch / "old_reference_bundle.py"
  path.write_text(text)
  spec = importlib.util.spec_from_file_location("old_reference_bundle", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def timed(fn, repeats: int = 2):
  """(result of the last run, wall seconds of the fastest run after the first)."""
  result, times = None, []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return result, min(times[1:] or times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--field", type=Path, default=REPO.parent / "shared" / "data" / "corn" / "field")
  args = parser.parse_args()
  sys.path.insert(0, str(REPO / "tests"))
  import torch
  import torch_reference_script

  from agriclip_jax import reference_bundle
  template = "a photo of a corn leaf with {}"
  with tempfile.TemporaryDirectory() as scratch_name:
    scratch = Path(scratch_name)
    make_bundle(scratch)
    count = photo_subset(args.field, args.images, scratch / "data")
    files = (scratch / "dino_pretrain.pth", scratch / "aligner.pth", scratch / "ViT-tiny.pt")
    dino, aligner, clip = files
    data = scratch / "data"
    old = old_module(scratch)
    rows = []
    one, seconds = timed(lambda: reference_bundle.run_reference_zeroshot(
        dino, aligner, clip, data, template, batch_size=args.batch_size))
    rows.append(("one path (zeroshot.score_task)", seconds, one.predictions))
    before, seconds = timed(lambda: old.run_reference_zeroshot(
        dino, aligner, clip, data, template, batch_size=args.batch_size))
    rows.append((f"old path ({OLD_COMMIT} reference_bundle)", seconds, before.predictions))
    reference, seconds = timed(lambda: torch_reference_script.run(
        dino, aligner, clip, data, [template], batch_size=args.batch_size))
    rows.append(("PyTorch reference script", seconds, reference["predictions"]))
  print(f"{count} corn field photos at their own sizes, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}")
  print("| path | images/s | vs PyTorch | predictions equal to PyTorch |")
  print("| --- | --- | --- | --- |")
  torch_rate = count / rows[-1][1]
  for name, seconds, predictions in rows:
    rate = count / seconds
    agree = float(np.mean(np.asarray(predictions) == reference["predictions"]))
    print(f"| {name} | {rate:.1f} | {rate / torch_rate:.2f}x | {100 * agree:.1f} % |")


if __name__ == "__main__":
  main()
