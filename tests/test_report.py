"""Reports: markdown tables hold the numbers; PNG plots are written, non-empty and are images."""

import json

import numpy as np
import pytest
from PIL import Image

from agriclip_jax import report, zeroshot


def _results():
  rng = np.random.default_rng(0)
  rows = []
  for task, classes in (("corn field", ["Blight", "Rust", "Spot"]), ("beans", ["a", "b"])):
    labels = rng.integers(0, len(classes), size=30)
    for method in ("clip", "agriclip", "ensemble"):
      metrics = zeroshot.classification_metrics(rng.normal(size=(30, len(classes))), labels, classes)
      rows.append({"task": task, "method": method, **metrics})
  return {"results": rows, "mean": zeroshot.suite_means(rows)}


def test_report_files_and_table(tmp_path):
  document = _results()
  path = tmp_path / "results.json"
  path.write_text(json.dumps(document))
  written = report.write_report(report.load_results(path), tmp_path / "out")
  pngs = [p for p in written if p.suffix == ".png"]
  assert len(pngs) == 1 + 6  # accuracy + one confusion matrix per task and method
  for png in pngs:
    assert png.stat().st_size > 1000
    with Image.open(png) as image:
      assert image.size[0] > 100 and image.getextrema() != ((255, 255),) * len(image.getbands())
  text = (tmp_path / "out" / "report.md").read_text()
  row = next(r for r in document["results"] if r["task"] == "beans" and r["method"] == "agriclip")
  assert f"| beans | agriclip | 30 | {100 * row['top1']:.1f} |" in text
  mean_clip = np.mean([r["top1"] for r in document["results"] if r["method"] == "clip"])
  assert f"**{100 * mean_clip:.1f}**" in text
  assert document["mean"]["clip"]["top1"] == pytest.approx(mean_clip)


def test_bad_results_file(tmp_path):
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"results": [{"task": "x", "method": "clip"}]}))
  with pytest.raises(ValueError, match="entry #0 lacks"):
    report.load_results(path)
  path.write_text("{not json")
  with pytest.raises(ValueError, match="results.json"):
    report.load_results(path)
