"""Downstream zero-shot tasks: names, class names, prompt templates, and suite files.

`TASKS` is a plain dict filled right here (no registration side effects). Three kinds of task:
- "reference": the AgriCLIP paper's downstream datasets, with the one template per dataset used by
  the reference evaluation (`AgriCLIP_alignment/prompts.py` in umair1221/AgriCLIP, checked Nov 2026).
  Their images are distributed by the authors as ImageFolder trees, so the class names come from the
  folder names (sorted, as torchvision's ImageFolder does); we do not list them here because the
  reference does not publish them. Datasets without a reference template fall back to 'a photo of {}'.
- "tfds": agriculture datasets in TensorFlow Datasets, with the class names of their ClassLabel
  feature (checked against the tensorflow-datasets 4.9.10 builders) and templates of ours.
- "imagefolder": any ImageFolder tree given with a template (`imagefolder_task`).

A suite file is JSON: {"tasks": [{"task": NAME, "data": PATH_OR_tfds:NAME, ...}, ...]}; see
`load_suite` for the keys. A pinned suite (`agriclip suite pin`, `agriclip_jax.suite_pin`) holds a
suite and the content hashes of the records each task evaluates; `read_suite` accepts both.
`entry_records` is the one selection of a task's evaluated records (the hashed evaluation split,
then the class subset), shared by zero-shot and the pin.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax.zeroshot import clean_class_name, validate_template

FALLBACK_TEMPLATE = "a photo of {}"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  templates: tuple[str, ...]
  kind: str  # "reference" | "tfds" | "imagefolder" | "captioned" (retrieval only, no classes)
  class_names: tuple[str, ...] | None = None  # label order; None = the ImageFolder's sub-folders
  prompt_names: tuple[str, ...] | None = None  # what goes into the template, if not the cleaned name
  tfds_name: str | None = None
  split: str | None = None
  note: str = ""


def _reference(name: str, template: str) -> Task:
  return Task(name, (template,), "reference",
              note="template from the AgriCLIP reference; class names from the dataset's folders")


# One template per dataset, exactly as in the reference's prompts.py.
_REFERENCE_TASKS = [
    _reference("Acquarium Fish", "a fish type of {} specie"),
    _reference("Animal-2", "a photo with {}"),
    _reference("Banana Deficiency", "a photo contain {} deficiency"),
    _reference("Bean Lesion", "a photo contain {} leaf type"),
    _reference("Chicken Fecus", "a photo contain {}"),
    _reference("CID", "Image of cattle named {}"),
    _reference("Citrus Fruits", "a photo of fruit contain {}"),
    _reference("Citrus Leaves", "a photo contain {} symptoms"),
    _reference("Cow Breed", "a photo contain {} cow"),
    _reference("DeepFish", "a photo contain {} type under acquarium"),
    _reference("Fish Freshness", "a type of fish named {}"),
    _reference("Fish Species", "Image contain {} fish type"),
    _reference("Fruits Diseases", "a photo contain {} leaf"),
    _reference("Horse Breed", "a photo contain {}"),
    _reference("Supermarket Fish", "a fish type with {}"),
]

_PLANT_VILLAGE_LABELS = (
    "Apple___Apple_scab", "Apple___Black_rot", "Apple___Cedar_apple_rust", "Apple___healthy",
    "Blueberry___healthy", "Cherry___healthy", "Cherry___Powdery_mildew",
    "Corn___Cercospora_leaf_spot Gray_leaf_spot", "Corn___Common_rust", "Corn___healthy",
    "Corn___Northern_Leaf_Blight", "Grape___Black_rot", "Grape___Esca_(Black_Measles)",
    "Grape___healthy", "Grape___Leaf_blight_(Isariopsis_Leaf_Spot)",
    "Orange___Haunglongbing_(Citrus_greening)", "Peach___Bacterial_spot", "Peach___healthy",
    "Pepper,_bell___Bacterial_spot", "Pepper,_bell___healthy", "Potato___Early_blight",
    "Potato___healthy", "Potato___Late_blight", "Raspberry___healthy", "Soybean___healthy",
    "Squash___Powdery_mildew", "Strawberry___healthy", "Strawberry___Leaf_scorch",
    "Tomato___Bacterial_spot", "Tomato___Early_blight", "Tomato___healthy", "Tomato___Late_blight",
    "Tomato___Leaf_Mold", "Tomato___Septoria_leaf_spot",
    "Tomato___Spider_mites Two-spotted_spider_mite", "Tomato___Target_Spot",
    "Tomato___Tomato_mosaic_virus", "Tomato___Tomato_Yellow_Leaf_Curl_Virus")

_PLANT_LEAVES_LABELS = (
    "Mango (P0) healthy", "Arjun (P1) healthy", "Alstonia Scholaris (P2) healthy",
    "Gauva (P3) healthy", "Jamun (P5) healthy", "Jatropha (P6) healthy",
    "Pongamia Pinnata (P7) healthy", "Basil (P8) healthy", "Pomegranate (P9) healthy",
    "Lemon (P10) healthy", "Chinar (P11) healthy", "Mango (P0) diseased", "Arjun (P1) diseased",
    "Alstonia Scholaris (P2) diseased", "Gauva (P3) diseased", "Bael (P4) diseased",
    "Jamun (P5) diseased", "Jatropha (P6) diseased", "Pongamia Pinnata (P7) diseased",
    "Pomegranate (P9) diseased", "Lemon (P10) diseased", "Chinar (P11) diseased")

_PLANTAE_K_LABELS = tuple(sorted((
    "APPLE DISEASED", "APPLE HEALTHY", "APRICOT DISEASED", "APRICOT HEALTHY", "CHERRY DISEASED",
    "CHERRY HEALTHY", "CRANBERRY DISEASED", "CRANBERRY HEALTHY", "GRAPES DISEASED", "GRAPES HEALTHY",
    "PEACH DISEASED", "PEACH HEALTHY", "PEAR DISEASED", "PEAR HEALTHY", "WALNUT DISEASED",
    "WALNUT HEALTHY")))

_TFDS_TASKS = [
    Task("beans", ("a photo of a bean leaf with {}.",), "tfds",
         class_names=("angular_leaf_spot", "bean_rust", "healthy"),
         prompt_names=("angular leaf spot", "bean rust", "no disease, healthy"),
         tfds_name="beans", split="test"),
    Task("cassava", ("a photo of a cassava leaf with {}.",), "tfds",
         class_names=("cbb", "cbsd", "cgm", "cmd", "healthy"),
         # The labels are abbreviations; CLIP needs the disease names they stand for.
         prompt_names=("cassava bacterial blight", "cassava brown streak disease", "cassava green mite",
                       "cassava mosaic disease", "no disease, healthy"),
         tfds_name="cassava", split="test"),
    Task("plant_village", ("a photo of a {} leaf.",), "tfds", class_names=_PLANT_VILLAGE_LABELS,
         tfds_name="plant_village", split="train",
         note="one split only; evaluate on the deterministic held-out part"),
    Task("deep_weeds", ("a photo of {}, a weed.", "a photo of {} in a pasture."), "tfds",
         class_names=("Chinee apple", "Lantana", "Parkinsonia", "Parthenium", "Prickly acacia",
                      "Rubber vine", "Siam weed", "Snake weed", "Negative"),
         prompt_names=("chinee apple", "lantana", "parkinsonia", "parthenium", "prickly acacia",
                       "rubber vine", "siam weed", "snake weed", "native grass without weeds"),
         tfds_name="deep_weeds", split="train",
         note="class names from the DeepWeeds labels.csv (Species column, by Label id)"),
    Task("plant_leaves", ("a photo of a {} leaf.",), "tfds", class_names=_PLANT_LEAVES_LABELS,
         tfds_name="plant_leaves", split="train"),
    Task("plantae_k", ("a photo of a {} leaf.",), "tfds", class_names=_PLANTAE_K_LABELS,
         tfds_name="plantae_k", split="train"),
    Task("citrus_leaves", ("a photo of a citrus leaf with {}.",), "tfds",
         class_names=("Black spot", "canker", "greening", "healthy"),
         prompt_names=("black spot", "citrus canker", "citrus greening", "no disease, healthy"),
         tfds_name="citrus_leaves", split="train"),
]

TASKS: dict[str, Task] = {task.name: task for task in (*_REFERENCE_TASKS, *_TFDS_TASKS)}


def _normalise_key(name: str) -> str:
  return re.sub(r"[\s_\-]+", "", name).lower()


def get_task(name: str) -> Task:
  """Looks a task up by name, ignoring case, spaces, '-' and '_'; unknown names list close ones."""
  wanted = _normalise_key(name)
  for task_name, task in TASKS.items():
    if _normalise_key(task_name) == wanted:
      return task
  close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.5)
  close += [t for t in TASKS if wanted and wanted in _normalise_key(t) and t not in close]
  hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  raise KeyError(f"unknown task {name!r}{hint} (known tasks: {', '.join(TASKS)}; or give an "
                 f"ImageFolder with --data and a --template)")


def prompt_names(task: Task, class_names: list[str] | tuple[str, ...]) -> list[str]:
  if task.prompt_names is not None and tuple(class_names) == task.class_names:
    return list(task.prompt_names)
  return [clean_class_name(c) for c in class_names]


def imagefolder_classes(root: str | os.PathLike) -> list[str]:
  """Sorted class folder names of an ImageFolder tree (`sources.list_image_folder`, the one reading
  of such a tree); every class folder must hold an image."""
  from input_pipeline.sources import list_image_folder
  root = Path(root)
  if root.is_file():
    raise ValueError(f"{root} is a file, not an ImageFolder: a task given by --template reads its "
                     f"class names from the class folders of a directory (DIR/<class>/<image>); "
                     f"for a manifest with labels, list it in a --suite with its class names")
  return list_image_folder(root)[0]


def with_metadata_names(task: Task, root: str | os.PathLike, metadata_path: str | os.PathLike) -> Task:
  """The task with its class folders' readable names from caption metadata
  (`prompts.load_metadata`, the schema the captions use) as what goes into the templates:
  "Blight" -> "northern leaf blight". Every class folder must have a metadata entry."""
  from agriclip_jax import prompts
  metadata = prompts.load_metadata(metadata_path)
  folders = tuple(task.class_names or imagefolder_classes(root))
  known = {c.name: c for c in metadata.classes}
  missing = [f for f in folders if f not in known]
  if missing:
    raise ValueError(f"--metadata {metadata_path}: class folder(s) {missing} of {root} have no "
                     f"entry (its classes: {sorted(known)})")
  return dataclasses.replace(task, class_names=folders,
                             prompt_names=tuple(known[f].readable for f in folders))


def imagefolder_task(root: str | os.PathLike, templates: list[str] | tuple[str, ...] | str | None = None,
                     name: str | None = None) -> Task:
  """A task for any ImageFolder tree: class names from its folders, the given template(s)."""
  if isinstance(templates, str):
    templates = (templates,)
  templates = tuple(validate_template(t) for t in (templates or (FALLBACK_TEMPLATE,)))
  classes = tuple(imagefolder_classes(root))
  return Task(name or Path(root).name, templates, "imagefolder", class_names=classes)


def resolve_task(name: str | None, templates: list[str] | None = None, data: str | None = None) -> Task:
  """Registry task (templates overridable), or an ImageFolder task when only a template is given."""
  if name is not None:
    task = get_task(name)
    if templates:
      task = dataclasses.replace(task, templates=tuple(validate_template(t) for t in templates))
    return task
  if data is None:
    raise ValueError("give a task name, or an ImageFolder (--data) with a template")
  return imagefolder_task(data, templates)


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
  task: Task
  data: str | None  # ImageFolder path, or "tfds:NAME"; None for TFDS tasks (use the registry's name)
  split: str | None = None
  eval_fraction: float | None = None  # None: the whole data is evaluation data (a disjoint set)
  class_names: tuple[str, ...] | None = None  # the classes evaluated, in label order; None: all
  pin: dict[str, Any] | None = None  # the task's pinned records (a pinned suite's entries only)


@dataclasses.dataclass(frozen=True)
class Suite:
  path: Path
  entries: list[SuiteEntry]
  hash: str | None  # a pinned suite's hash (`suite_pin.suite_hash`); None for a plain suite file
  spec: dict[str, Any]  # the suite file's {"tasks": [...]} as written (data paths as given)


_SUITE_KEYS = {"task", "name", "data", "template", "templates", "split", "eval_fraction",
               "class_names"}


def _entry_class_names(value: Any, where: str) -> tuple[str, ...] | None:
  if value is None:
    return None
  if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
    raise ValueError(f"{where}: 'class_names' must be a non-empty list of class names, got {value!r}")
  repeated = sorted({v for v in value if value.count(v) > 1})
  if repeated:
    raise ValueError(f"{where}: 'class_names' lists {repeated} more than once")
  return tuple(value)


def _parse_entry(entry: Any, where: str, base: Path) -> SuiteEntry:
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected an object, got {entry!r}")
  unknown = set(entry) - _SUITE_KEYS
  if unknown:
    raise ValueError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_SUITE_KEYS)})")
  templates = entry.get("templates") or ([entry["template"]] if "template" in entry else None)
  class_names = _entry_class_names(entry.get("class_names"), where)
  data = entry.get("data")
  if data is not None and not str(data).startswith("tfds:") and not os.path.isabs(data):
    data = str((base / data).resolve())
  try:
    if "task" in entry:
      task = resolve_task(entry["task"], templates)
    elif data and class_names and Path(data).is_file():
      # a manifest with integer labels: its class names are the suite's, in label order
      task = Task(entry.get("name") or Path(data).stem,
                  tuple(validate_template(t) for t in (templates or (FALLBACK_TEMPLATE,))),
                  "manifest", class_names=class_names)
    elif data:
      task = imagefolder_task(data, templates, name=entry.get("name"))
    else:
      raise ValueError("needs 'task' (a registry name) or 'data' (an ImageFolder) with a template")
  except (KeyError, ValueError, FileNotFoundError) as e:
    raise type(e)(f"{where}: {e.args[0] if e.args else e}") from e
  if task.kind != "tfds" and data is None:
    raise ValueError(f"{where}: task {task.name!r} needs 'data' (the ImageFolder path)")
  if data is not None and task.kind == "reference" and os.path.isdir(data):
    try:
      imagefolder_classes(data)  # an empty class folder is an error before any model loads
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from e
  fraction = entry.get("eval_fraction")
  return SuiteEntry(task, data, entry.get("split", task.split),
                    None if fraction is None else float(fraction), class_names)


def suite_entries(spec: Any, path: Path, base: Path | None = None) -> list[SuiteEntry]:
  """The entries of a suite's {"tasks": [...]} read from `path` (named in every error); relative
  data paths are relative to `base` (default: the file's folder)."""
  entries = spec.get("tasks") if isinstance(spec, dict) else None
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"suite file {path}: expected {{\"tasks\": [ ... ]}} with at least one task")
  base = path.parent if base is None else base
  return [_parse_entry(entry, f"suite file {path}, task #{i}", base)
          for i, entry in enumerate(entries)]


def read_suite(path: str | os.PathLike) -> Suite:
  """A suite file, or a pinned suite (its hash checked against its contents, each entry carrying
  its task's pin)."""
  path = Path(path)
  try:
    spec = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"suite file {path}: {e}") from e
  from agriclip_jax import suite_pin
  if suite_pin.is_pinned(spec):
    return suite_pin.read_pinned(spec, path)
  return Suite(path, suite_entries(spec, path), None, spec)


def load_suite(path: str | os.PathLike) -> list[SuiteEntry]:
  """Reads a suite file: {"tasks": [{"task" | "name", "data", "template(s)", "split",
  "eval_fraction", "class_names"}]}, or a pinned suite. Relative data paths are relative to the
  suite file. "class_names" is the label order and the subset evaluated: records of other classes
  are left out (counted); for a manifest with integer labels and no registry task it names the
  labels 0, 1, ..."""
  return read_suite(path).entries


# ------------------------------------------------------------------------------------------------
# The records a suite entry evaluates
# ------------------------------------------------------------------------------------------------

def open_entry_source(entry: SuiteEntry):
  """(spec, source) of an entry: its data, or the registry's TFDS set."""
  from input_pipeline.sources import open_source
  task = entry.task
  if entry.data is not None:
    return entry.data, open_source(entry.data)
  if task.kind != "tfds":
    raise ValueError(f"task {task.name!r} needs --data (its ImageFolder)")
  spec = f"tfds:{task.tfds_name}:{entry.split or 'train'}"
  return spec, open_source(spec, image_feature="image")


def data_class_names(entry: SuiteEntry, source) -> list[str] | None:
  """The label order of the data: an ImageFolder's class folders (which must equal a registry
  task's names), else the task's class names; None when neither has them."""
  task = entry.task
  folder_names = getattr(source, "class_names", None)
  if folder_names is not None and task.class_names is not None and \
      list(folder_names) != list(task.class_names):
    raise ValueError(f"task {task.name!r}: the data's classes {list(folder_names)} differ from the "
                     f"registry's {list(task.class_names)}")
  names = folder_names if folder_names is not None else task.class_names
  return list(names) if names else None


def evaluation_split(source, eval_fraction: float | None) -> np.ndarray:
  """Indices of the records in the hashed evaluation split (`zeroshot.is_eval_item`), or all."""
  from agriclip_jax import features
  from agriclip_jax.zeroshot import is_eval_item
  indices = np.arange(len(source))
  if eval_fraction is not None:
    keys = features.record_keys(source)
    indices = np.array([i for i in indices if is_eval_item(keys[i], eval_fraction)], np.int64)
  if len(indices) == 0:
    raise ValueError("no items to evaluate (empty data, or the evaluation split is empty)")
  return indices


def record_labels(source, indices) -> np.ndarray:
  """The labels of `source[indices]`, from the listing where the source has one (no image read)."""
  if callable(getattr(source, "entry", None)):
    return np.array([int(source.entry(int(i))["label"]) for i in indices], np.int64)
  return np.array([int(source[int(i)]["label"]) for i in indices], np.int64)


class RelabelledSource:
  """A source whose labels are mapped (`mapping[label]`, -1 for a label outside it): the view of a
  class subset, labels indexing the subset."""

  def __init__(self, source, mapping: np.ndarray, class_names: list[str]):
    self._source = source
    self._mapping = np.asarray(mapping, np.int64)
    self.class_names = list(class_names)

  def __len__(self) -> int:
    return len(self._source)

  def _relabel(self, record: dict[str, Any]) -> dict[str, Any]:
    label = int(record.get("label", -1))
    inside = 0 <= label < len(self._mapping)
    return {**record, "label": int(self._mapping[label]) if inside else -1}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._relabel(self._source[index])

  @property
  def entry(self):  # only where the source has a listing (an AttributeError otherwise)
    listing = self._source.entry
    return lambda index: self._relabel(listing(index))

  @property
  def keys(self):
    return self._source.keys


@dataclasses.dataclass
class TaskRecords:
  spec: str                     # the data source's spec
  source: Any                   # the source, relabelled onto `class_names` for a class subset
  indices: np.ndarray           # the evaluated records
  class_names: list[str] | None  # label order of the evaluated records; None: the data has none
  excluded: dict[str, int]      # records left out by the class subset, per class


def entry_records(entry: SuiteEntry, eval_fraction: float | None = None) -> TaskRecords:
  """The records `entry` evaluates: its evaluation split (the entry's eval_fraction, else the one
  given), then its class subset: records of other classes are left out and counted."""
  spec, source = open_entry_source(entry)
  fraction = entry.eval_fraction if entry.eval_fraction is not None else eval_fraction
  try:
    indices = evaluation_split(source, fraction)
  except ValueError as e:
    raise ValueError(f"task {entry.task.name!r} ({spec}): {e}") from e
  names = None if entry.task.kind == "captioned" else data_class_names(entry, source)
  if names is None or entry.class_names is None or list(entry.class_names) == names:
    if names is None and entry.class_names is not None:
      raise ValueError(f"task {entry.task.name!r}: 'class_names' needs data with classes")
    return TaskRecords(spec, source, indices, names, {})
  unknown = [c for c in entry.class_names if c not in names]
  if unknown:
    raise ValueError(f"task {entry.task.name!r}: class_names {unknown} are not classes of {spec} "
                     f"(its classes: {names})")
  position = {c: i for i, c in enumerate(entry.class_names)}
  mapping = np.array([position.get(c, -1) for c in names], np.int64)
  labels = record_labels(source, indices)
  # a record without a valid label stays in (labelled -1): the scorer names it, nothing is hidden
  keep = np.array([not (0 <= label < len(names)) or mapping[label] >= 0 for label in labels], bool)
  excluded_labels = labels[~keep]
  excluded = {names[i]: int(n) for i, n in enumerate(np.bincount(excluded_labels, minlength=len(names)))
              if n}
  if not keep.any():
    raise ValueError(f"task {entry.task.name!r}: no record of {spec} belongs to class_names "
                     f"{list(entry.class_names)}")
  return TaskRecords(spec, RelabelledSource(source, mapping, list(entry.class_names)),
                     indices[keep], list(entry.class_names), excluded)


def task_summary(task: Task) -> dict[str, Any]:
  return {"name": task.name, "kind": task.kind, "templates": list(task.templates),
          "num_classes": None if task.class_names is None else len(task.class_names)}
