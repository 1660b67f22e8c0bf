"""ALive-style captions: dataset/class metadata -> a base caption per class -> K variants per image.

The paper captions each image from its dataset's metadata ("a photo of a leaf with boron
deficiency, characterized by yellow patches and curled edges") and has an LLM paraphrase it. Here the
variants come offline from a built-in, domain-aware paraphrase bank: captions are assembled from
parts (an opening, a task-specific phrase naming the class, an attribute clause) so every variant is
grammatical and keeps the class name. The choice is deterministic in (seed, image key).
`agriclip_jax.llm_paraphrase` optionally replaces the bank with an LLM and falls back to it.

Metadata file (JSON):
    {"name": "corn", "domain": "crop", "task": "disease", "subject": "corn leaf",
     "classes": {"Blight": {"readable": "northern leaf blight",
                            "attributes": ["long grey-green cigar-shaped lesions"]},
                 "Healthy": {"readable": "healthy", "healthy": true}}}
`classes` may also be a list of objects with a "name" (the folder name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DOMAINS = ("crop", "livestock", "fish")
TASKS = ("disease", "deficiency", "pest", "weed", "breed", "species", "freshness", "growth_stage", "other")


@dataclasses.dataclass(frozen=True)
class ClassMetadata:
  name: str  # the folder / label name
  readable: str  # the words that must appear in every caption
  attributes: tuple[str, ...] = ()
  healthy: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  name: str
  domain: str
  task: str
  subject: str  # what is photographed: "corn leaf", "cow", "fish"
  classes: tuple[ClassMetadata, ...]

  def class_by_name(self, name: str) -> ClassMetadata:
    for cls in self.classes:
      if cls.name == name:
        return cls
    raise KeyError(f"dataset {self.name!r} metadata has no class {name!r}; "
                   f"known: {[c.name for c in self.classes]}")


def _require(mapping: dict[str, Any], field: str, kind: type, where: str) -> Any:
  if field not in mapping:
    raise ValueError(f"{where}: missing field {field!r}")
  value = mapping[field]
  if not isinstance(value, kind):
    raise ValueError(f"{where}: field {field!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
  return value


def _parse_class(name: str, info: Any, where: str) -> ClassMetadata:
  if not isinstance(info, dict):
    raise ValueError(f"{where}: class {name!r} must be an object, got {info!r}")
  readable = info.get("readable", name.replace("_", " "))
  if not isinstance(readable, str) or not readable.strip():
    raise ValueError(f"{where}: class {name!r} field 'readable' must be a non-empty string, got {readable!r}")
  attributes = info.get("attributes", [])
  if not isinstance(attributes, list) or not all(isinstance(a, str) and a.strip() for a in attributes):
    raise ValueError(f"{where}: class {name!r} field 'attributes' must be a list of non-empty strings")
  healthy = info.get("healthy", False)
  if not isinstance(healthy, bool):
    raise ValueError(f"{where}: class {name!r} field 'healthy' must be true or false, got {healthy!r}")
  return ClassMetadata(name, readable.strip(), tuple(a.strip() for a in attributes), healthy)


def parse_metadata(raw: dict[str, Any], where: str = "metadata") -> DatasetMetadata:
  if not isinstance(raw, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
  name = _require(raw, "name", str, where)
  domain = _require(raw, "domain", str, where)
  if domain not in DOMAINS:
    raise ValueError(f"{where}: field 'domain' is {domain!r}; choose one of {DOMAINS}")
  task = _require(raw, "task", str, where)
  if task not in TASKS:
    raise ValueError(f"{where}: field 'task' is {task!r}; choose one of {TASKS}")
  subject = raw.get("subject", {"crop": "plant", "livestock": "animal", "fish": "fish"}[domain])
  if not isinstance(subject, str) or not subject.strip():
    raise ValueError(f"{where}: field 'subject' must be a non-empty string, got {subject!r}")
  classes_raw = raw.get("classes")
  if isinstance(classes_raw, dict):
    classes = [_parse_class(n, info, where) for n, info in classes_raw.items()]
  elif isinstance(classes_raw, list):
    classes = []
    for index, info in enumerate(classes_raw):
      if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        raise ValueError(f"{where}: classes[{index}] needs a string field 'name'")
      classes.append(_parse_class(info["name"], info, where))
  else:
    raise ValueError(f"{where}: field 'classes' must be an object or a list, got {classes_raw!r}")
  if not classes:
    raise ValueError(f"{where}: field 'classes' is empty")
  names = [c.name for c in classes]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise ValueError(f"{where}: class names repeated: {duplicated}")
  return DatasetMetadata(name, domain, task, subject.strip(), tuple(classes))


def load_metadata(path: str | Path) -> DatasetMetadata:
  path = Path(path)
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f"cannot read metadata {path}: {error}") from None
  return parse_metadata(raw, str(path))


def simple_caption(class_name: str) -> str:
  """The caption for a class without metadata: its folder name in words."""
  return f"a photo of {class_name.replace('_', ' ').strip()}"


# ------------------------------------------------------------------------------------------------
# Templates and the paraphrase bank
# ------------------------------------------------------------------------------------------------

# Phrases naming the class, per task; {s} = subject, {c} = readable class name.
_CLASS_PHRASES: dict[str, tuple[str, ...]] = {
    "disease": ("a {s} with {c}", "a {s} affected by {c}", "a {s} showing symptoms of {c}",
                "{c} on a {s}", "a {s} infected with {c}"),
    "deficiency": ("a {s} with {c} deficiency", "a {s} suffering from {c} deficiency",
                   "a {s} showing signs of {c} deficiency", "{c} deficiency in a {s}"),
    "pest": ("a {s} damaged by {c}", "a {s} infested with {c}", "{c} on a {s}"),
    "weed": ("{c}, a weed", "a {c} weed plant", "the weed {c} growing in a field"),
    "breed": ("a {c} {s}", "a {s} of the {c} breed", "a {c}, a breed of {s}"),
    "species": ("a {c}", "a {c}, a species of {s}", "a {s} of the species {c}"),
    "freshness": ("a {c} {s}", "a {s} that is {c}", "a {s} in {c} condition"),
    "growth_stage": ("a {s} at the {c} stage", "a {s} in its {c} stage", "the {c} stage of a {s}"),
    "other": ("a {s}: {c}", "{c}", "a {c} {s}"),
}
_HEALTHY_PHRASES = ("a {c} {s}", "a {s} that is {c}", "a {c} {s} without any symptoms",
                    "a {s} in {c} condition")
_OPENINGS: dict[str, tuple[str, ...]] = {
    "any": ("a photo of", "an image of", "a close-up photo of", "a picture showing", "a photograph of"),
    "crop": ("a field photo of", "an agricultural image of", "a close-up of the leaf surface of"),
    "livestock": ("a farm photo of", "a barn photograph of", "a picture taken on a farm of"),
    "fish": ("an underwater photo of", "a fish market photo of", "a photo taken at a fish farm of"),
}
_CONNECTORS = ("characterized by", "showing", "with visible", "marked by", "displaying")


def _class_phrase(template: str, metadata: DatasetMetadata, cls: ClassMetadata) -> str:
  return template.format(s=metadata.subject, c=cls.readable)


def _attribute_clause(connector: str, attributes: Sequence[str]) -> str:
  if not attributes:
    return ""
  joined = attributes[0] if len(attributes) == 1 else ", ".join(attributes[:-1]) + " and " + attributes[-1]
  return f", {connector} {joined}"


def base_caption(metadata: DatasetMetadata, cls: ClassMetadata) -> str:
  """The canonical caption: first opening, first class phrase, attributes in their given order."""
  phrases = _HEALTHY_PHRASES if cls.healthy else _CLASS_PHRASES[metadata.task]
  return (f"{_OPENINGS['any'][0]} {_class_phrase(phrases[0], metadata, cls)}"
          f"{_attribute_clause(_CONNECTORS[0], cls.attributes)}")


def stable_hash(text: str) -> int:
  """A process-independent 64-bit hash (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")


def template_variants(metadata: DatasetMetadata, cls: ClassMetadata, k: int, seed: int,
                      image_key: str) -> list[str]:
  """The base caption followed by k - 1 distinct bank paraphrases, chosen from (seed, image key)."""
  if k < 1:
    raise ValueError(f"number of caption variants must be >= 1, got {k}")
  rng = np.random.default_rng([seed, stable_hash(image_key)])
  openings = _OPENINGS["any"] + _OPENINGS[metadata.domain]
  phrases = _HEALTHY_PHRASES if cls.healthy else _CLASS_PHRASES[metadata.task]
  base = base_caption(metadata, cls)
  variants = [base]
  seen = {base}
  for _ in range(50 * k):  # the bank holds far more combinations than any sensible k
    if len(variants) == k:
      break
    attributes = list(cls.attributes)
    rng.shuffle(attributes)
    caption = (f"{openings[rng.integers(len(openings))]} "
               f"{_class_phrase(phrases[rng.integers(len(phrases))], metadata, cls)}"
               f"{_attribute_clause(_CONNECTORS[rng.integers(len(_CONNECTORS))], attributes)}")
    if caption not in seen:
      seen.add(caption)
      variants.append(caption)
  while len(variants) < k:  # tiny banks (no attributes): repeat rather than return fewer than asked
    variants.append(variants[len(variants) % len(seen)])
  return variants
