"""Evaluation on several processes: two processes on 127.0.0.1 (gloo CPU collectives) each encode
their own slice of the images, the slices are gathered, and `agriclip zeroshot` writes the same
results as one process (one unreadable photo included: it is listed the same way)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from test_eval_commands import corn_split, models  # noqa: F401  (module fixtures)
from test_multihost import REPO, _env, _finish_all, _start_two


def _zeroshot(models, data, out):  # noqa: F811
  return [sys.executable, "-m", "agriclip_jax", "zeroshot", "--model", str(models / "clip"),
          "--dino", str(models / "dino"), "--aligner", str(models / "aligner.npz"),
          "--data", str(data), "--template", "a photo of a corn leaf with {}.", "--method", "all",
          "--predictions", "--batch-size", "4", "--out", str(out)]


def test_two_processes_give_the_zeroshot_results_of_one(models, corn_split, tmp_path):  # noqa: F811
  data = tmp_path / "data"
  shutil.copytree(corn_split[0], data)
  (data / "Common_Rust" / "a_broken.jpg").write_bytes(b"not a jpeg")
  single = subprocess.run(_zeroshot(models, data, tmp_path / "single.json"), cwd=REPO,
                          env=_env(2), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  processes = _start_two(_zeroshot(models, data, tmp_path / "multi.json"), devices=1)
  outputs = _finish_all(processes)
  for process, out in zip(processes, outputs):
    assert process.returncode == 0, out[-3000:]
  assert "results ->" in outputs[0] and "results ->" not in outputs[1]  # process 0 writes
  total = len(list(data.rglob("*.jpg")))
  assert f" {total}/{total} [" in single.stderr
  for out, share in zip(outputs, (-(-total // 2), total // 2)):  # each encoded its own half
    assert f" {share}/{share} [" in out and f" {total}/{total} [" not in out

  one, two = (json.loads((tmp_path / name).read_text()) for name in ("single.json", "multi.json"))
  readable = len(list(data.rglob("*.jpg"))) - 1
  assert one["predictions"] == two["predictions"] and len(one["predictions"]) == 3 * readable
  for a, b in zip(one["results"], two["results"]):
    assert a["skipped_images"] == b["skipped_images"] == [
        {"image": str(data / "Common_Rust" / "a_broken.jpg"), "reason": "not_an_image"}]
    for key in ("method", "num_images", "top1", "top5", "confusion", "top1_interval"):
      assert a[key] == b[key], key
