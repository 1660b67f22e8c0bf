"""ALive-style captions: the metadata schema, base captions, the offline paraphrase bank and the
`agriclip captions` command on real corn photos (manifest read back through the pipeline)."""

import json
import shutil

import pytest

from agriclip_jax import cli, prompts
from input_pipeline import sources

CORN_METADATA = {
    "name": "corn", "domain": "crop", "task": "disease", "subject": "corn leaf",
    "classes": {
        "Blight": {"readable": "northern leaf blight",
                   "attributes": ["long elliptical grey-green lesions", "tan cigar-shaped spots"]},
        "Common_Rust": {"readable": "common rust", "attributes": ["small powdery cinnamon-brown pustules"]},
        "Gray_Leaf_Spot": {"readable": "gray leaf spot",
                           "attributes": ["narrow rectangular grey lesions bounded by the veins"]},
        "Healthy": {"readable": "healthy", "healthy": True, "attributes": ["a uniformly green surface"]},
    },
}


@pytest.fixture()
def metadata() -> prompts.DatasetMetadata:
  return prompts.parse_metadata(CORN_METADATA)


def test_base_caption_follows_the_paper_pattern(metadata):
  blight = metadata.class_by_name("Blight")
  assert prompts.base_caption(metadata, blight) == (
      "a photo of a corn leaf with northern leaf blight, characterized by long elliptical grey-green "
      "lesions and tan cigar-shaped spots")
  assert prompts.base_caption(metadata, metadata.class_by_name("Healthy")) == (
      "a photo of a healthy corn leaf, characterized by a uniformly green surface")


def test_variants_are_deterministic_distinct_and_keep_the_class(metadata):
  for cls in metadata.classes:
    variants = prompts.template_variants(metadata, cls, 6, seed=0, image_key="Blight/x_0001")
    assert variants == prompts.template_variants(metadata, cls, 6, seed=0, image_key="Blight/x_0001")
    assert len(variants) == len(set(variants)) == 6
    assert variants[0] == prompts.base_caption(metadata, cls)
    assert all(cls.readable in v for v in variants)
    assert all(attribute in v for v in variants for attribute in cls.attributes)
  blight = metadata.class_by_name("Blight")
  per_image = {tuple(prompts.template_variants(metadata, blight, 4, 0, f"k{i}")) for i in range(20)}
  assert len(per_image) > 10  # different images get different paraphrases
  assert prompts.template_variants(metadata, blight, 4, 1, "k0") != prompts.template_variants(metadata, blight, 4, 0, "k0")


def test_domain_aware_openings():
  fish = prompts.parse_metadata({"name": "fish", "domain": "fish", "task": "species", "subject": "fish",
                                 "classes": [{"name": "tilapia", "readable": "Nile tilapia"}]})
  captions = {c for i in range(40) for c in prompts.template_variants(fish, fish.classes[0], 3, 0, str(i))}
  assert any(c.startswith(("an underwater photo", "a fish market photo", "a photo taken at a fish farm"))
             for c in captions)
  assert not any("field photo" in c or "farm photo of" in c for c in captions)


@pytest.mark.parametrize("change, message", [
    ({"domain": "space"}, "field 'domain' is 'space'"),
    ({"task": None}, "field 'task' must be str"),
    ({"classes": {}}, "field 'classes' is empty"),
    ({"classes": {"A": {"attributes": "red"}}}, "class 'A' field 'attributes'"),
    ({"classes": [{"readable": "x"}]}, r"classes\[0\] needs a string field 'name'"),
])
def test_metadata_errors_name_the_field(change, message):
  raw = {**CORN_METADATA, **change}
  if change.get("task", 1) is None:
    raw.pop("task")
    message = "missing field 'task'"
  with pytest.raises(ValueError, match=message):
    prompts.parse_metadata(raw, "meta.json")


@pytest.fixture()
def tiny_corn(shared_corn_dir, tmp_path):
  images = tmp_path / "images"
  for class_dir in sorted((shared_corn_dir / "lab").iterdir()):
    (images / class_dir.name).mkdir(parents=True)
    for path in sorted(class_dir.glob("*.jpg"))[:3]:
      shutil.copy(path, images / class_dir.name / path.name)
  meta = tmp_path / "meta.json"
  meta.write_text(json.dumps(CORN_METADATA))
  return images, meta


def test_captions_command_writes_a_manifest_the_pipeline_reads(tiny_corn, tmp_path, capsys):
  images, meta = tiny_corn
  out = tmp_path / "out" / "manifest.jsonl"
  argv = ["captions", "--images", str(images), "--metadata", str(meta), "--out", str(out), "--variants", "3"]
  assert cli.main(argv) == 0
  assert "wrote 12 images x 3 captions" in capsys.readouterr().out
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(lines) == 12
  metadata = prompts.parse_metadata(CORN_METADATA)
  for line in lines:
    cls = metadata.class_by_name(line["class_name"])
    assert len(line["captions"]) == 3 and all(cls.readable in c for c in line["captions"])
    assert line["captions"][0] == prompts.base_caption(metadata, cls)
  manifest = sources.open_source(out)
  folder = sources.open_source(images)
  assert len(manifest) == 12
  for index in range(12):
    assert manifest[index]["image_bytes"] == folder[index]["image_bytes"]
    assert manifest[index]["label"] == folder[index]["label"] and manifest[index]["key"] == folder[index]["key"]
  first = out.read_text()
  assert cli.main(argv) == 0 and out.read_text() == first  # deterministic
  assert cli.main(argv + ["--seed", "5"]) == 0 and out.read_text() != first


def test_captions_command_rejects_unknown_class_folders(tiny_corn, tmp_path, capsys):
  images, meta = tiny_corn
  (images / "Mystery").mkdir()
  # a photo in it: an empty class folder is refused earlier, by the ImageFolder reading itself
  photo = next(images.glob("*/*.jpg"))
  (images / "Mystery" / photo.name).write_bytes(photo.read_bytes())
  out = tmp_path / "m.jsonl"
  assert cli.main(["captions", "--images", str(images), "--metadata", str(meta), "--out", str(out)]) == 2
  assert "['Mystery']" in capsys.readouterr().err and not out.exists()
