"""Task registry, ImageFolder tasks and suite files."""

import json

import pytest

from agriclip_jax import tasks


def test_reference_templates_as_published():
  # The reference's prompts.py (umair1221/AgriCLIP), one template per downstream dataset.
  assert tasks.get_task("Banana Deficiency").templates == ("a photo contain {} deficiency",)
  assert tasks.get_task("CID").templates == ("Image of cattle named {}",)
  assert tasks.get_task("Acquarium Fish").templates == ("a fish type of {} specie",)
  reference = [t for t in tasks.TASKS.values() if t.kind == "reference"]
  assert len(reference) == 15 and all(t.class_names is None for t in reference)


def test_lookup_ignores_case_and_separators_and_unknown_names_suggest():
  assert tasks.get_task("banana-deficiency").name == "Banana Deficiency"
  assert tasks.get_task("PLANT VILLAGE").name == "plant_village"
  with pytest.raises(KeyError, match="unknown task 'Banana Defficiency'.*did you mean 'Banana Deficiency'"):
    tasks.get_task("Banana Defficiency")
  with pytest.raises(KeyError, match="'beans'"):
    tasks.get_task("bean")


def test_tfds_tasks_match_their_builders():
  """Class names equal the ClassLabel names of the installed tensorflow-datasets builders."""
  tfds = pytest.importorskip("tensorflow_datasets")
  for name in ("beans", "cassava", "plant_village", "plant_leaves", "plantae_k"):
    task = tasks.get_task(name)
    builder = tfds.builder_cls(task.tfds_name)
    label = builder(data_dir="/nonexistent-agriclip").info.features["label"]
    assert tuple(label.names) == task.class_names, name
    assert task.prompt_names is None or len(task.prompt_names) == len(task.class_names)


def test_every_registered_template_is_valid():
  for task in tasks.TASKS.values():
    for template in task.templates:
      tasks.validate_template(template)


def test_imagefolder_task_and_errors(tmp_path):
  (tmp_path / "Healthy").mkdir()
  (tmp_path / "Healthy" / "a.jpg").write_bytes(b"x")
  (tmp_path / "Common_Rust").mkdir()
  (tmp_path / "Common_Rust" / "b.png").write_bytes(b"x")
  task = tasks.imagefolder_task(tmp_path, "a photo of a corn leaf with {}")
  assert task.class_names == ("Common_Rust", "Healthy")
  assert tasks.prompt_names(task, task.class_names) == ["common rust", "healthy"]
  with pytest.raises(ValueError, match="must contain exactly one"):
    tasks.imagefolder_task(tmp_path, "a photo of a corn leaf")
  (tmp_path / "Blight").mkdir()
  (tmp_path / "Blight" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"class folder .*Blight holds no images"):
    tasks.imagefolder_task(tmp_path, "a photo of {}")
  with pytest.raises(FileNotFoundError, match="not found"):
    tasks.imagefolder_classes(tmp_path / "missing")


def test_load_suite(tmp_path):
  folder = tmp_path / "data" / "corn"
  (folder / "Rust").mkdir(parents=True)
  (folder / "Rust" / "1.jpg").write_bytes(b"x")
  suite_path = tmp_path / "suite.json"
  suite_path.write_text(json.dumps({"tasks": [
      {"task": "beans"},
      {"task": "Banana Deficiency", "data": "data/corn", "eval_fraction": 0.5},
      {"name": "corn", "data": "data/corn", "template": "a corn leaf with {}"},
  ]}))
  suite = tasks.load_suite(suite_path)
  assert [e.task.name for e in suite] == ["beans", "Banana Deficiency", "corn"]
  assert suite[0].split == "test" and suite[0].data is None
  assert suite[1].data == str(folder.resolve()) and suite[1].eval_fraction == 0.5
  assert suite[2].task.templates == ("a corn leaf with {}",)

  suite_path.write_text(json.dumps({"tasks": [{"task": "Banana Deficiency"}]}))
  with pytest.raises(ValueError, match="task #0.*needs 'data'"):
    tasks.load_suite(suite_path)
  suite_path.write_text(json.dumps({"tasks": [{"task": "nope", "data": "x"}]}))
  with pytest.raises(KeyError, match="task #0.*unknown task 'nope'"):
    tasks.load_suite(suite_path)
  suite_path.write_text(json.dumps({"tasks": [{"task": "beans", "colour": "red"}]}))
  with pytest.raises(ValueError, match="unknown keys"):
    tasks.load_suite(suite_path)
