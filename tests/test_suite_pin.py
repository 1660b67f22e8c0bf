"""Pinned suites through the commands on real corn photos: `agriclip suite pin` records each
task's evaluated files by the sha256 of their bytes (compared with hashlib on the files), honours a
suite's class subset (counts), and `agriclip zeroshot --suite PINNED` checks the data before any
model loads (a rewritten, deleted or added photo is a one-line error naming the task and the
file) and writes the suite's hash into its results."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from agriclip_jax import cli, tasks

VENDORED_CORN = Path(__file__).resolve().parent / "data" / "corn"
TEMPLATE = "a photo of a corn leaf with {}"


def _copy_photos(root: Path) -> Path:
  """lab: every vendored lab photo (4 classes); field: the vendored field photos (3 classes)."""
  for split in ("lab", "field"):
    for folder in sorted((VENDORED_CORN / split).iterdir()):
      (root / split / folder.name).mkdir(parents=True)
      for photo in sorted(folder.glob("*.jpg")):
        shutil.copyfile(photo, root / split / folder.name / photo.name)
  return root


def _write_suite(root: Path, *more: dict) -> Path:
  suite = root / "suite.json"
  suite.write_text(json.dumps({"tasks": [
      # the subset, in an order of its own: Healthy is label 0
      {"name": "lab", "data": "lab", "template": TEMPLATE, "class_names": ["Healthy", "Blight"]},
      {"name": "field", "data": "field", "template": TEMPLATE}, *more]}))
  return suite


def _pin(suite: Path, out: Path) -> dict:
  assert cli.main(["suite", "pin", str(suite), "--out", str(out)]) == 0
  return json.loads(out.read_text())


def _expected_files(folder: Path, classes: list[str]) -> list[list]:
  """The pin's file list computed here: hashlib over each file's bytes."""
  return sorted([f"{c}/{p.name}", c, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
                for c in classes for p in (folder / c).glob("*.jpg"))


def test_pin_then_zeroshot_records_the_suite_hash(tmp_path, capsys):
  from test_zeroshot import _tiny_models
  data = _copy_photos(tmp_path / "data")
  pinned_path = tmp_path / "pins" / "pinned.json"
  pinned = _pin(_write_suite(data, {"name": "lab_all", "data": "lab", "template": TEMPLATE}),
                pinned_path)
  lab, field, lab_all = pinned["pins"]
  assert lab["files"] == _expected_files(data / "lab", ["Healthy", "Blight"])
  assert lab["images"] == 4 and lab["classes"] == {"Healthy": 3, "Blight": 1}
  assert lab["excluded"] == {"Common_Rust": 1, "Gray_Leaf_Spot": 2}  # left out, counted
  assert field["files"] == _expected_files(data / "field", ["Blight", "Common_Rust", "Gray_Leaf_Spot"])
  assert field["classes"] == {"Blight": 2, "Common_Rust": 2, "Gray_Leaf_Spot": 1}
  assert pinned["suite"]["tasks"][0]["data"] == "../data/lab"  # found from the pinned file

  # the same images elsewhere: the same hash (it leaves out where the data lies)
  moved = tmp_path / "elsewhere"
  shutil.copytree(data, moved)
  assert _pin(moved / "suite.json", tmp_path / "moved.json")["hash"] == pinned["hash"]

  clip_dir, _ = _tiny_models(tmp_path)
  results = tmp_path / "results.json"
  assert cli.main(["zeroshot", "--model", str(clip_dir), "--suite", str(pinned_path), "--method",
                   "clip", "--batch-size", "8", "--out", str(results)]) == 0
  document = json.loads(results.read_text())
  assert document["suite"] == {"path": str(pinned_path), "hash": pinned["hash"]}
  lab_row, field_row, _ = document["results"]
  assert lab_row["class_names"] == ["Healthy", "Blight"] and lab_row["num_images"] == 4
  assert lab_row["excluded_images"] == {"Common_Rust": 1, "Gray_Leaf_Spot": 2}
  assert lab_row["files_hash"] == lab["files_hash"] and field_row["files_hash"] == field["files_hash"]
  assert field_row["num_images"] == 5 and field_row["num_classes"] == 3
  assert "data equal to the pinned suite" in capsys.readouterr().out

  # kNN on two tasks of the pinned suite: test = the subset of the training images (by name onto
  # the training classes), so with k=1 every test image finds itself
  knn_out = tmp_path / "knn.json"
  assert cli.main(["knn", "--model", str(clip_dir), "--features", "clip", "--suite", str(pinned_path),
                   "--train-task", "lab_all", "--test-task", "lab", "--k", "1", "--batch-size", "8",
                   "--out", str(knn_out)]) == 0
  knn = json.loads(knn_out.read_text())
  assert knn["suite"] == {"path": str(pinned_path), "hash": pinned["hash"]}
  assert knn["train"]["task"] == "lab_all" and knn["train"]["files_hash"] == lab_all["files_hash"]
  assert knn["train"]["images"] == 7 and knn["test"]["images"] == 4
  assert knn["test"]["excluded_images"] == {"Common_Rust": 1, "Gray_Leaf_Spot": 2}
  assert knn["knn"]["1"]["top1"] == 1.0


def _rewrite_same_size(photo: Path) -> None:
  stat = photo.stat()
  data = bytearray(photo.read_bytes())
  data[len(data) // 2] ^= 0xFF
  photo.write_bytes(bytes(data))
  os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the bytes tell


@pytest.mark.parametrize("change, file, says", [
    ("rewrite", "Healthy/healthy_0001.jpg", "changed (sha256"),
    ("delete", "Healthy/healthy_0002.jpg", "is missing"),
    ("add", "Healthy/healthy_0009.jpg", "was added"),
])
def test_a_changed_missing_or_added_photo_is_an_error_naming_task_and_file(
    tmp_path, capsys, change, file, says):
  data = _copy_photos(tmp_path / "data")
  pinned_path = tmp_path / "pinned.json"
  _pin(_write_suite(data), pinned_path)
  photo = data / "lab" / file
  if change == "rewrite":
    _rewrite_same_size(photo)
  elif change == "delete":
    photo.unlink()
  else:
    shutil.copyfile(data / "lab" / "Blight" / "blight_0000.jpg", photo)
  # a photo of a class outside the subset is not evaluated: not a difference
  shutil.copyfile(data / "lab" / "Healthy" / "healthy_0000.jpg",
                  data / "lab" / "Common_Rust" / "extra.jpg")
  capsys.readouterr()
  # --model names no model: the check must fail first, before anything is loaded
  assert cli.main(["zeroshot", "--model", str(tmp_path / "no_model"), "--suite", str(pinned_path),
                   "--method", "clip", "--out", str(tmp_path / "results.json")]) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1
  assert "task 'lab'" in error and f"{file} {says}" in error and "1 record(s) differ" in error
  assert "Common_Rust" not in error
  assert not (tmp_path / "results.json").exists()
  assert cli.main(["suite", "check", str(pinned_path)]) == 2
  assert f"{file} {says}" in capsys.readouterr().err
  assert cli.main(["knn", "--model", str(tmp_path / "no_model"), "--features", "clip", "--suite",
                   str(pinned_path), "--train-task", "field", "--test-task", "lab",
                   "--out", str(tmp_path / "knn.json")]) == 2
  error = capsys.readouterr().err
  assert "task 'lab'" in error and f"{file} {says}" in error


def test_suite_file_errors_name_the_file_the_task_and_the_value(tmp_path):
  data = _copy_photos(tmp_path / "data")
  suite = data / "suite.json"

  def fails(entry, match):
    suite.write_text(json.dumps({"tasks": [{"name": "ok", "data": "field", "template": TEMPLATE},
                                           entry]}))
    with pytest.raises(ValueError, match=match):
      tasks.load_suite(suite)

  fails({"data": "lab", "template": TEMPLATE, "class_names": "Blight"},
        rf"suite file {suite}, task #1: 'class_names' must be a non-empty list")
  fails({"data": "lab", "template": TEMPLATE, "class_names": ["Blight", "Blight"]},
        r"task #1: 'class_names' lists \['Blight'\] more than once")
  with pytest.raises(ValueError, match=r"task 'lab': class_names \['Rust'\] are not classes of"):
    suite.write_text(json.dumps({"tasks": [{"data": "lab", "template": TEMPLATE,
                                            "class_names": ["Blight", "Rust"]}]}))
    tasks.entry_records(tasks.load_suite(suite)[0])
  fails({"data": "lab", "template": TEMPLATE, "classes": ["Blight"]}, r"task #1: unknown keys \['classes'\]")

  # a pinned file edited by hand no longer matches its hash
  pinned_path = tmp_path / "pinned.json"
  pinned = _pin(_write_suite(data), pinned_path)
  pinned["pins"][0]["classes"]["Healthy"] = 2
  pinned_path.write_text(json.dumps(pinned))
  with pytest.raises(ValueError, match=rf"pinned suite {pinned_path}: its contents do not match"):
    tasks.load_suite(pinned_path)


def test_a_manifest_task_pins_each_record_with_its_class_and_catches_a_relabel(tmp_path, capsys):
  data = _copy_photos(tmp_path / "data")
  photos = ["lab/Blight/blight_0000.jpg", "lab/Healthy/healthy_0000.jpg", "field/Blight/blight_0005.jpg"]
  manifest = data / "manifest.jsonl"

  def write(labels):
    manifest.write_text("".join(json.dumps({"image": p, "caption": "a maize leaf", "label": label}) + "\n"
                                for p, label in zip(photos, labels)))
  write([0, 1, 0])
  suite = data / "manifest_suite.json"
  # a manifest's labels are integers: the suite names them, in label order
  suite.write_text(json.dumps({"tasks": [{"name": "manifest", "data": "manifest.jsonl",
                                          "template": TEMPLATE, "class_names": ["Blight", "Healthy"]}]}))
  pinned_path = tmp_path / "pinned.json"
  pin = _pin(suite, pinned_path)["pins"][0]
  assert [row[:2] for row in pin["files"]] == [["field/Blight/blight_0005.jpg", "Blight"],
                                              ["lab/Blight/blight_0000.jpg", "Blight"],
                                              ["lab/Healthy/healthy_0000.jpg", "Healthy"]]
  assert pin["classes"] == {"Blight": 2, "Healthy": 1}
  write([0, 1, 1])  # the same files, one relabelled
  capsys.readouterr()
  assert cli.main(["suite", "check", str(pinned_path)]) == 2
  assert ("task 'manifest'" in (error := capsys.readouterr().err)
          and "field/Blight/blight_0005.jpg changed (class 'Blight' -> 'Healthy')" in error)
