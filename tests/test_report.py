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
  interval = row["top1_interval"]  # zero-shot rows carry their bootstrap interval
  assert (f"| beans | agriclip | 30 | {100 * row['top1']:.1f} [{100 * interval['low']:.1f}, "
          f"{100 * interval['high']:.1f}] |") in text
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


def _intervals(correct, **options):
  from agriclip_jax import evaluation
  interval = evaluation.bootstrap_interval(correct, **options)
  return interval["accuracy"], interval


def test_zero_shot_tables_show_intervals_and_plots_draw_error_bars(tmp_path):
  from agriclip_jax import evaluation
  document = _results()
  plain = report.write_report(document, tmp_path / "plain")
  rng = np.random.default_rng(1)
  for row in document["results"]:
    row["top1"], row["top1_interval"] = _intervals(rng.random(30) < 0.6, resamples=200)
  agriclip, clip = rng.random(30) < 0.7, rng.random(30) < 0.5
  paired = evaluation.paired_bootstrap_difference(agriclip, clip, resamples=200)
  document["differences"] = [{"task": "beans", "methods": ["agriclip", "clip"], "top1": paired}]
  written = report.write_report(document, tmp_path / "ci")
  text = (tmp_path / "ci" / "report.md").read_text()
  row = next(r for r in document["results"] if r["task"] == "beans" and r["method"] == "clip")
  interval = row["top1_interval"]
  assert interval["low"] < row["top1"] < interval["high"]
  cell = f"{100 * row['top1']:.1f} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"
  top5 = row["top5_interval"]  # classification_metrics gives top-5 its interval too
  top5_cell = f"{100 * row['top5']:.1f} [{100 * top5['low']:.1f}, {100 * top5['high']:.1f}]"
  assert f"| beans | clip | 30 | {cell} | {top5_cell} |" in text
  assert (f"| beans | agriclip − clip | 30 | {100 * paired['difference']:+.1f} "
          f"[{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}] |") in text
  # the same accuracies drawn with error bars make another picture; without, the plain bars
  with Image.open(plain[1]) as a, Image.open(written[1]) as b:
    assert written[1].name == "accuracy.png" and a.size == b.size
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() > 0


def _knn_probe_document():
  from agriclip_jax import evaluation
  rng = np.random.default_rng(2)
  correct = {kind: {k: rng.random(80) < p for k, p in ((10, 0.7), (20, 0.75))}
             for kind in ("agriclip", "clip")}

  def section(kind):
    knn = {}
    for k, c in correct[kind].items():
      top1, top1_interval = _intervals(c, resamples=300)
      top5, top5_interval = _intervals(c | (rng.random(80) < 0.5), resamples=300)
      knn[str(k)] = {"top1": top1, "top1_interval": top1_interval, "top5": top5,
                     "top5_interval": top5_interval}
    top1, interval = _intervals(correct[kind][20], resamples=300)
    return {"knn": knn, "probe": {"top1": top1, "top1_interval": interval, "C": 3.16},
            "fewshot": {"1": {"probe": {"mean": 0.4, "std": 0.05}, "centroid": {"mean": 0.45, "std": 0.04},
                              "seeds": 5}}}

  difference = {"knn": {str(k): {"top1": evaluation.paired_bootstrap_difference(
      correct["agriclip"][k], correct["clip"][k], resamples=300)} for k in (10, 20)}}
  return {**section("agriclip"), "features": "agriclip",
          "train": {"source": "lab", "images": 400, "classes": 4},
          "test": {"source": "field", "images": 80, "classes": 3},
          "compared": {"clip": {**section("clip"), "difference": difference}}}


def test_knn_probe_fewshot_report_tables_and_plots(tmp_path):
  document = _knn_probe_document()
  path = tmp_path / "knn.json"
  path.write_text(json.dumps(document))
  written = report.write_report(report.load_results(path), tmp_path / "out")
  assert sorted(p.name for p in written) == ["fewshot.png", "knn.png", "probe.png", "report.md"]
  for png in written[1:]:
    with Image.open(png) as image:
      assert image.size[0] > 100 and image.getextrema() != ((255, 255),) * len(image.getbands())
  text = written[0].read_text()
  row = document["compared"]["clip"]["knn"]["20"]
  low, high = row["top1_interval"]["low"], row["top1_interval"]["high"]
  assert f"| clip | 20 | {100 * row['top1']:.1f} [{100 * low:.1f}, {100 * high:.1f}] |" in text
  paired = document["compared"]["clip"]["difference"]["knn"]["10"]["top1"]
  assert (f"| clip | kNN k=10 | {100 * paired['difference']:+.1f} [{100 * paired['low']:+.1f}, "
          f"{100 * paired['high']:+.1f}] | – |") in text
  assert "| agriclip | 1 | 5 | 40.0 ± 5.0 | 45.0 ± 4.0 |" in text
  assert f"| agriclip | {100 * document['probe']['top1']:.1f} [" in text and "| 3.16 |" in text


def test_knn_report_without_intervals_and_bad_sections(tmp_path):
  document = {"knn": {"10": {"top1": 0.5, "top5": 0.9}}, "features": "dino"}
  written = report.write_report(document, tmp_path / "out")
  assert "| dino | 10 | 50.0 | 90.0 |" in written[0].read_text()
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"knn": {"10": {"top1": 0.5}}, "features": "dino"}))
  with pytest.raises(ValueError, match=r"bad\.json: knn\.10 lacks \['top5'\]"):
    report.load_results(path)
  path.write_text(json.dumps({"fewshot": {"2": {"probe": {"mean": 0.5}}}}))
  with pytest.raises(ValueError, match=r"fewshot\.2 lacks \['probe\.std', 'centroid\.mean'"):
    report.load_results(path)
