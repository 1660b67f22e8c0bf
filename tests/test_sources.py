"""Sources: the real corn photos read as ImageFolder, CSV, JSONL, tar shards, ArrayRecord and TFDS
give the same records; separator detection, spec parsing and clear errors."""

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from input_pipeline import sources, tfds_builder, writers

FORMATS = ["imagefolder", "jsonl", "csv_tab", "csv_comma", "tar_dir", "tar_braces", "array_record", "tfds"]


def _signature(source) -> list[tuple]:
  """Everything a record carries except its storage path, with image bytes by digest."""
  rows = []
  for index in range(len(source)):
    record = source[index]
    digest = hashlib.sha256(record["image_bytes"]).hexdigest() if record["image_bytes"] is not None else None
    rows.append((record["key"], digest, tuple(record["captions"]), record["label"], record["error"]))
  return sorted(rows)


@pytest.fixture(scope="module")
def corn_formats(shared_corn_dir, tmp_path_factory):
  """corn/field (333 real photos, 3 classes) written once in every format."""
  out = tmp_path_factory.mktemp("corn_formats")
  folder = sources.open_source(shared_corn_dir / "field")
  writers.write_jsonl(folder, out / "manifest.jsonl")
  writers.write_csv(folder, out / "manifest.tsv", separator="\t")
  writers.write_csv(folder, out / "manifest.csv", separator=",")
  shards = writers.write_tar_shards(folder, out / "shards", records_per_shard=100)
  writers.write_array_record(folder, out / "corn.array_record")
  tfds_builder.prepare_tfds_dataset({"train": folder}, "corn_field", out / "tfds")
  csv_options = {"label_column": "label", "key_column": "key"}
  specs = {
      "imagefolder": (shared_corn_dir / "field", {}),
      "jsonl": (out / "manifest.jsonl", {}),
      "csv_tab": (out / "manifest.tsv", csv_options),
      "csv_comma": (out / "manifest.csv", csv_options),
      "tar_dir": (out / "shards", {}),
      "tar_braces": (str(out / "shards" / f"shard-{{000000..{len(shards['paths']) - 1:06d}}}.tar"), {}),
      "array_record": (out / "corn.array_record", {}),
      "tfds": ("tfds:corn_field:train", {"data_dir": out / "tfds"}),
  }
  return folder, specs


@pytest.mark.parametrize("name", FORMATS)
def test_corn_reads_the_same_in_every_format(corn_formats, name):
  folder, specs = corn_formats
  spec, options = specs[name]
  source = sources.open_source(spec, **options)
  assert len(source) == len(folder) == 333
  assert _signature(source) == _signature(folder)


def test_imagefolder_labels_follow_sorted_class_folders(shared_corn_dir):
  folder = sources.open_source(shared_corn_dir / "lab")
  assert folder.class_names == ["Blight", "Common_Rust", "Gray_Leaf_Spot", "Healthy"]
  counts = {name: 0 for name in folder.class_names}
  for index in range(len(folder)):
    entry = folder.entry(index)
    counts[folder.class_names[entry["label"]]] += 1
    assert entry["key"].split("/")[0] == folder.class_names[entry["label"]]
  # The numbers in the dataset's README.
  assert counts == {"Blight": 985, "Common_Rust": 1192, "Gray_Leaf_Spot": 513, "Healthy": 1162}
  record = folder[0]
  assert record["image_bytes"][:3] == b"\xff\xd8\xff" and record["captions"] == ["a photo of Blight"]


def test_imagefolder_captions_from_mapping_and_missing_class_error(corn_dir):
  captions = {"Blight": ["b"], "Common_Rust": ["r"], "Gray_Leaf_Spot": ["g"]}
  folder = sources.ImageFolderSource(corn_dir / "field", captions_for_class=captions)
  assert {tuple(folder.entry(i)["captions"]) for i in range(len(folder))} == {("b",), ("r",), ("g",)}
  with pytest.raises(ValueError, match="Gray_Leaf_Spot"):
    sources.ImageFolderSource(corn_dir / "field", captions_for_class={"Blight": ["b"], "Common_Rust": ["r"]})


@pytest.mark.parametrize("separator", ["\t", ",", ";"])
def test_csv_separator_is_detected(tmp_path, separator):
  image = tmp_path / "a.jpg"
  image.write_bytes(b"\xff\xd8\xff fake")
  manifest = tmp_path / "m.csv"
  manifest.write_text(separator.join(["filepath", "title"]) + "\n" + separator.join(["a.jpg", "a, b; c"]) + "\n"
                      if separator == "\t" else separator.join(["filepath", "title"]) + f"\na.jpg{separator}\"a b\"\n")
  source = sources.open_source(manifest)
  record = source[0]
  assert record["path"] == str(image) and record["image_bytes"] == b"\xff\xd8\xff fake"
  assert record["captions"] == (["a, b; c"] if separator == "\t" else ["a b"])


def test_csv_missing_column_names_it(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("filepath,caption\na.jpg,hello\n")
  with pytest.raises(ValueError, match=r"m\.csv: missing column 'title'.*'caption'"):
    sources.open_source(manifest)
  with pytest.raises(ValueError, match="missing column 'label'"):
    sources.open_source(manifest, caption_column="caption", label_column="label")


def test_brace_expansion():
  assert sources.expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
  assert sources.expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]
  assert sources.expand_braces("plain.tar") == ["plain.tar"]


def test_keys_follow_webdataset_convention():
  assert sources.key_from_path("Blight/blight_0001.jpg") == "Blight/blight_0001"
  assert sources.key_from_path("a/b/c.tar.gz") == "a/b/c"
  assert sources.key_from_path("x.png") == "x"


def test_open_source_errors_name_the_spec(tmp_path):
  (tmp_path / "data.parquet").write_bytes(b"x")
  with pytest.raises(ValueError, match="data.parquet"):
    sources.open_source(tmp_path / "data.parquet")
  with pytest.raises(ValueError, match="does not exist"):
    sources.open_source(tmp_path / "nothing.csv")
  with pytest.raises(ValueError, match="no class folders"):
    sources.open_source(tmp_path)
  with pytest.raises(ValueError, match=r"shard\(s\) do not exist"):
    sources.open_source(str(tmp_path / "s-{0..3}.tar"))
  with pytest.raises(ValueError, match="bad TFDS spec"):
    sources.open_source("tfds:")
  (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n')
  with pytest.raises(ValueError, match=r"\['image_column'\] do not apply to JSONL"):
    sources.open_source(tmp_path / "m.jsonl", image_column="path")


def test_jsonl_records_keep_several_captions_and_fields(tmp_path):
  (tmp_path / "m.jsonl").write_text(
      '{"image": "a.jpg", "captions": ["one", "two"], "label": 3, "key": "k1"}\n\n'
      '{"image": "b.jpg", "caption": "only"}\n')
  source = sources.open_source(tmp_path / "m.jsonl")
  first, second = source[0], source[1]
  assert (first["captions"], first["label"], first["key"], first["error"]) == (["one", "two"], 3, "k1", "missing_file")
  assert (second["captions"], second["label"], second["key"]) == (["only"], -1, "b")


def test_tar_reader_groups_members_and_reads_json_captions(tmp_path):
  shard = tmp_path / "s.tar"
  with tarfile.open(shard, "w") as archive:
    for name, data in [("x/k1.jpg", b"\xff\xd8\xffAAA"), ("x/k1.json", b'{"captions": ["c1", "c2"]}'),
                       ("x/k1.cls", b"2"), ("k2.png", b"\x89PNGBBB"), ("k2.txt", b"  caption two \n")]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  source = sources.open_source(shard)
  assert len(source) == 2
  assert {k: source[0][k] for k in ("key", "image_bytes", "captions", "label", "error")} == {
      "key": "x/k1", "image_bytes": b"\xff\xd8\xffAAA", "captions": ["c1", "c2"], "label": 2, "error": None}
  assert (source[1]["key"], source[1]["captions"], source[1]["label"]) == ("k2", ["caption two"], -1)


def test_serialized_record_round_trip_keeps_odd_captions():
  record = sources.make_record(image_bytes=b"\x00\x01", path="p", captions=["ok", "bad \udcff byte"],
                               label=4, key="k", error=None)
  assert sources.deserialize_record(sources.serialize_record(record), "w") == record
  missing = dict(record, image_bytes=None, error="missing_file")
  assert sources.deserialize_record(sources.serialize_record(missing), "w") == missing
  assert sources.deserialize_record(b"garbage!", "where")["error"] == "bad_serialized_record"


def test_sources_pickle_for_worker_processes(corn_formats):
  import pickle
  _, specs = corn_formats
  for name in ("array_record", "tfds", "tar_dir", "jsonl"):
    spec, options = specs[name]
    source = sources.open_source(spec, **options)
    clone = pickle.loads(pickle.dumps(source))
    assert _signature(clone)[:5] == _signature(source)[:5]


def test_tfds_decoded_image_arrays_become_lossless_bytes():
  """Standard TFDS image features arrive as uint8 arrays; they must decode to the same pixels."""
  from input_pipeline import transforms
  pixels = np.random.default_rng(0).integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
  source = object.__new__(sources.TfdsSource)  # the item list stands in for tfds.data_source
  source.name, source.split, source.data_dir = "beans", "test", None
  source.image_feature, source.captions_for_label = "image", None
  source._source = [{"image": pixels, "label": np.int64(2)}]
  record = source[0]
  assert record["label"] == 2 and record["key"] == "tfds:beans:test[0]"
  np.testing.assert_array_equal(transforms.decode_image(record["image_bytes"]), pixels)
