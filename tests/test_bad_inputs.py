"""A generated corpus of 35 kinds of bad or odd inputs, through every source type: every good
record is read, every bad one counted with its reason, nothing crashes or hangs, and the summary of
`agriclip data inspect --json` matches."""

import json
import threading

import numpy as np
import pytest

from agriclip_jax import cli
from agriclip_jax.commands import data as data_command
from agriclip_jax.testing import bad_corpus
from input_pipeline import pipeline, sources, tfds_builder, writers
from input_pipeline.transforms import MultiCropConfig

# Each format's spec (relative to the corpus root) and the expectation it shares.
FORMATS = {
    "folder": ("folder", {}, "folder"),
    "jsonl": ("manifest.jsonl", {}, "jsonl"),
    "csv": ("manifest_tab.csv", {"label_column": "label", "key_column": "key"}, "csv"),
    "tar": ("shards", {}, "tar"),
    "array_record": ("corpus.array_record", {}, "jsonl"),
    "tfds": ("tfds:bad_corpus:train", None, "jsonl"),
}


@pytest.fixture(scope="module")
def corpus(shared_corn_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_corpus")
  good = sorted((shared_corn_dir / "lab" / "Blight").glob("*.jpg"))[:4]
  expected = bad_corpus.make_bad_corpus(root, good)
  manifest = sources.open_source(root / "manifest.jsonl")
  writers.write_array_record(manifest, root / "corpus.array_record")
  tfds_builder.prepare_tfds_dataset({"train": manifest}, "bad_corpus", root / "tfds")
  return root, expected


def _open(root, name):
  spec, options, _ = FORMATS[name]
  if options is None:
    return sources.open_source(spec, data_dir=root / "tfds")
  return sources.open_source(root / spec, **options)


def _inspect_with_deadline(source, seconds=120):
  """Run the inspection in a thread so a hang fails the test instead of stalling the suite."""
  result = {}
  worker = threading.Thread(target=lambda: result.update(
      data_command.inspect_source(source, pipeline.RecordChecks())), daemon=True)
  worker.start()
  worker.join(seconds)
  assert not worker.is_alive(), "reading the bad corpus hung"
  return result


def test_corpus_covers_at_least_25_kinds(corpus):
  _, expected = corpus
  kinds = len(bad_corpus.byte_cases()) + len(bad_corpus.FILESYSTEM_CASES)
  kinds += 4  # captions: non-UTF-8, empty, blank, 10,000 characters
  kinds += 8  # missing path, duplicated key, non-JSON line, bad label, tab CSV, missing column, cut tar, tar without image
  assert kinds >= 25
  assert len(expected["jsonl"].skipped) >= 14  # distinct reasons, all counted separately


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_good_record_read_every_bad_one_counted(corpus, name):
  root, expected = corpus
  report = _inspect_with_deadline(_open(root, name))
  assert {"read": report["read"], "skipped": report["skipped"]} == expected[FORMATS[name][2]].as_summary()
  assert report["read"] + sum(report["skipped"].values()) == report["records"]
  for reason, paths in report["examples"].items():
    assert paths, reason  # every reason comes with at least one example path


def test_data_inspect_json_summary_matches(corpus, capsys):
  root, expected = corpus
  for name in ("folder", "csv", "tar"):
    spec, options, key = FORMATS[name]
    argv = ["data", "inspect", str(root / spec), "--json"]
    if "label_column" in options:
      argv += ["--label-column", "label", "--key-column", "key"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"read": summary["read"], "skipped": summary["skipped"]} == expected[key].as_summary()
    assert summary["images_per_sec"] > 0


def test_data_inspect_tfds_and_text_output(corpus, capsys):
  root, expected = corpus
  assert cli.main(["data", "inspect", "tfds:bad_corpus:train", "--data-dir", str(root / "tfds"), "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["skipped"] == expected["jsonl"].skipped
  assert cli.main(["data", "inspect", str(root / "folder")]) == 0
  text = capsys.readouterr().out
  assert f"read: {expected['folder'].read}" in text
  assert "too_many_pixels: 1  e.g. " in text and "bomb.png" in text and "images/s:" in text


def test_data_inspect_missing_column_is_a_clear_error(corpus, capsys):
  root, _ = corpus
  assert cli.main(["data", "inspect", str(root / "missing_column.csv")]) == 2
  assert "missing column 'title'" in capsys.readouterr().err


def test_odd_but_valid_images_decode_correctly(corpus):
  root, _ = corpus
  folder = sources.open_source(root / "folder")
  decoded = {}
  for index in range(len(folder)):
    record = folder[index]
    try:
      image, _ = pipeline.check_and_decode(record, pipeline.RecordChecks())
    except pipeline.BadRecord:
      continue
    decoded[record["key"].split("/")[-1]] = np.asarray(image)
  assert decoded["rotated"].shape == (80, 48, 3)  # stored 80 x 48 landscape, EXIF says portrait
  assert decoded["sixteen_bit"].max() > 200  # scaled, not clipped to white or cut to dark
  for name in ("cmyk", "palette_alpha", "rgba", "gray", "gray_alpha", "webp_inside", "png_inside",
               "tiff_inside", "gif_inside", "progressive"):
    assert decoded[name].shape == (64, 64, 3) and decoded[name].dtype == np.uint8, name


def test_training_pipeline_over_bad_folder_yields_every_good_record(corpus):
  root, expected = corpus
  folder = sources.open_source(root / "folder")
  dataset = pipeline.make_train_dataset(
      folder, kind="dino", global_batch_size=1, seed=0, num_epochs=1, shuffle=False, max_bad_fraction=None,
      multicrop=MultiCropConfig(global_size=16, local_size=8, num_local=1))
  iterator = iter(dataset)
  count = sum(1 for _ in iterator)
  assert count == expected["folder"].read
  assert dict(iterator.bad_records.counts) == expected["folder"].skipped
  # With the default limit (1 %) the same folder stops the run, naming examples.
  strict = pipeline.make_train_dataset(folder, kind="dino", global_batch_size=1, seed=0, num_epochs=1,
                                       multicrop=MultiCropConfig(global_size=16, local_size=8, num_local=1))
  with pytest.raises(pipeline.BadDataError, match="e.g. .*odd/"):
    list(strict)
