"""Zero-shot classification and retrieval from text prompts, on plain arrays.

Class embeddings: every class name goes into every template, CLIP's text tower encodes the prompts,
each embedding is L2-normalised, the template embeddings of a class are averaged and the average is
renormalised (the usual template ensemble; with one template it is just that prompt's embedding).
A `Recipe` names the two choices that differ between evaluations: whether class names are cleaned
before they go into the template, and whether prompt embeddings are normalised before averaging.
The AgriCLIP reference's recipe ("reference": folder names as they are, raw average, then
normalised; `AgriCLIP_alignment/TextToConcept.py`) is one of them, not a second pipeline.

`score_task` is the one zero-shot path: a labelled source, its class names and templates, and an
`api.Model` -> per-method scores of every image (`TaskScores`); `task_rows` turns them into the
result rows every caller writes (`agriclip zeroshot`, the demo, the reference recipe's API).

Three ways to score an image against the classes:
- "clip":     the CLIP image embedding, normalised, cosine with the class embeddings;
- "agriclip": the DINO features through the linear aligner, normalised, cosine (the AgriCLIP path);
- "ensemble": weight * softmax(clip logits) + (1 - weight) * softmax(agriclip logits).
Logits are `logit_scale * cosine` (CLIP's trained scale is ~100); the scale changes nothing for the
first two methods and sets how peaked the probabilities of the ensemble are.

Evaluation never runs on images used to train: `is_eval_item` splits a data set deterministically by
a hash of each item's relative path, so the training side can exclude exactly the same items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agriclip_jax import evaluation

METHODS = ("clip", "agriclip", "ensemble")
DEFAULT_LOGIT_SCALE = 100.0
DEFAULT_EVAL_SALT = "agriclip-eval"


# ----------------------------------------------------------------------------------------------
# Class names and templates
# ----------------------------------------------------------------------------------------------

def clean_class_name(name: str) -> str:
  """'Tomato___Early_blight' -> 'tomato early blight'; 'GrayLeafSpot' -> 'gray leaf spot'."""
  import re
  text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)  # split camelCase
  text = text.replace("_", " ")
  text = re.sub(r"\s*,\s*", ", ", text)
  return re.sub(r"\s+", " ", text).strip().lower()


def validate_template(template: str) -> str:
  """A template must have exactly one '{}' slot (where the class name goes) and no other fields."""
  try:
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
  except ValueError as e:
    raise ValueError(f"template {template!r} is not a valid format string: {e}") from e
  if fields != [""]:
    raise ValueError(f"template {template!r} must contain exactly one '{{}}' where the class name "
                     f"goes (found {len(fields)} fields: {fields})")
  return template


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major: all templates of class 0, then class 1, ..."""
  if not class_names:
    raise ValueError("no class names to build prompts from")
  if not templates:
    raise ValueError("no templates given")
  checked = [validate_template(t) for t in templates]
  return [template.format(name) for name in class_names for template in checked]


def l2_normalize(array: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  array = np.asarray(array, np.float32)
  return array / np.maximum(np.linalg.norm(array, axis=axis, keepdims=True), eps)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How class names and templates become class embeddings."""
  name: str
  clean_names: bool  # 'Common_Rust' -> 'common rust' before it goes into the template
  prompt_average: str  # "normalised": unit prompt embeddings averaged (open_clip); "raw": as encoded


RECIPES = {
    "agriclip-jax": Recipe("agriclip-jax", clean_names=True, prompt_average="normalised"),
    # AgriClip_zeroshot.py + TextToConcept.get_zeroshot_weights: ImageFolder names as they are,
    # the mean of the unnormalised text features, normalised.
    "reference": Recipe("reference", clean_names=False, prompt_average="raw"),
}


def get_recipe(name: str) -> Recipe:
  if name not in RECIPES:
    raise ValueError(f"unknown zero-shot recipe {name!r}; choose from {sorted(RECIPES)}")
  return RECIPES[name]


def class_embeddings(class_names: Sequence[str], templates: Sequence[str],
                     encode_text: Callable[[list[str]], Any], batch_size: int = 256,
                     prompt_average: str = "normalised") -> np.ndarray:
  """[num_classes, embed_dim], unit norm: per class the average of its prompt embeddings (each
  normalised first, or as encoded with prompt_average="raw"), renormalised."""
  if prompt_average not in ("normalised", "raw"):
    raise ValueError(f"prompt_average={prompt_average!r}; expected 'normalised' or 'raw'")
  prompts = build_prompts(class_names, templates)
  chunks = [np.asarray(encode_text(prompts[i:i + batch_size]), np.float32)
            for i in range(0, len(prompts), batch_size)]
  embeddings = np.concatenate(chunks, axis=0)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
    raise ValueError(f"encode_text returned shape {embeddings.shape} for {len(prompts)} prompts; "
                     "expected [num_prompts, embed_dim]")
  if prompt_average == "normalised":
    embeddings = l2_normalize(embeddings)
  per_template = embeddings.reshape(len(class_names), len(templates), -1)
  return l2_normalize(per_template.mean(axis=1))


# ----------------------------------------------------------------------------------------------
# Scores for the three methods
# ----------------------------------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)


def cosine_logits(embeddings: np.ndarray, class_emb: np.ndarray,
                  logit_scale: float = DEFAULT_LOGIT_SCALE) -> np.ndarray:
  if embeddings.shape[-1] != class_emb.shape[-1]:
    raise ValueError(f"image embeddings have width {embeddings.shape[-1]} but class embeddings "
                     f"{class_emb.shape[-1]}; are they from the same CLIP model?")
  return logit_scale * (l2_normalize(embeddings) @ l2_normalize(class_emb).T)


def method_scores(class_emb: np.ndarray, clip_image_embeddings: np.ndarray | None = None,
                  dino_features: np.ndarray | None = None, aligner=None,
                  methods: Sequence[str] = METHODS, ensemble_weight: float = 0.5,
                  logit_scale: float = DEFAULT_LOGIT_SCALE,
                  temperatures: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
  """Scores [N, C] per method (logits for clip/agriclip, probabilities for the ensemble).

  The ensemble is weight * softmax(clip cosine / T_clip) + (1 - weight) * softmax(agriclip cosine
  / T_agriclip); `temperatures` = (T_clip, T_agriclip), by default 1 / logit_scale for both."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
  if not 0.0 <= ensemble_weight <= 1.0:
    raise ValueError(f"ensemble weight must be in [0, 1], got {ensemble_weight}")
  need_clip = any(m in ("clip", "ensemble") for m in methods)
  need_agri = any(m in ("agriclip", "ensemble") for m in methods)
  if need_clip and clip_image_embeddings is None:
    raise ValueError(f"methods {list(methods)} need CLIP image embeddings")
  if need_agri and (dino_features is None or aligner is None):
    raise ValueError(f"methods {list(methods)} need DINO features and an aligner")
  if need_clip and need_agri and len(clip_image_embeddings) != len(dino_features):
    raise ValueError(f"row counts differ: {len(clip_image_embeddings)} CLIP image embeddings, "
                     f"{len(dino_features)} DINO feature rows")
  logits = {}
  if need_clip:
    logits["clip"] = cosine_logits(np.asarray(clip_image_embeddings, np.float32), class_emb, logit_scale)
  if need_agri:
    aligned = aligner.apply(np.asarray(dino_features, np.float32))
    logits["agriclip"] = cosine_logits(aligned, class_emb, logit_scale)
  scores = {m: logits[m] for m in methods if m in logits}
  if "ensemble" in methods:
    t_clip, t_agri = temperatures or (1.0 / logit_scale, 1.0 / logit_scale)
    if min(t_clip, t_agri) <= 0:
      raise ValueError(f"ensemble temperatures must be positive, got {(t_clip, t_agri)}")
    scores["ensemble"] = (ensemble_weight * softmax(logits["clip"] / (logit_scale * t_clip))
                          + (1.0 - ensemble_weight)
                          * softmax(logits["agriclip"] / (logit_scale * t_agri)))
  return scores


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def classification_metrics(scores: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """top-1, top-5 (top-k with k = min(5, C)), per-class and balanced accuracy, confusion matrix."""
  scores = np.asarray(scores)
  labels = np.asarray(labels, np.int64)
  if scores.ndim != 2 or labels.shape != (scores.shape[0],):
    raise ValueError(f"scores [N, C] and labels [N] expected, got {scores.shape} and {labels.shape}")
  num_images, num_classes = scores.shape
  if num_images == 0:
    raise ValueError("no images to evaluate")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
  names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} score columns")
  ranking = np.argsort(-scores, axis=1, kind="stable")
  k = min(5, num_classes)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, ranking[:, 0]), 1)
  support = confusion.sum(axis=1)
  per_class = {name: (float(confusion[i, i] / support[i]) if support[i] else None)
               for i, name in enumerate(names)}
  present = [v for v in per_class.values() if v is not None]
  top1_correct = ranking[:, 0] == labels
  top5_correct = np.any(ranking[:, :k] == labels[:, None], axis=1)
  return {
      "num_images": int(num_images),
      "top1": float(np.mean(top1_correct)),
      "top5": float(np.mean(top5_correct)),
      # 95 % percentile-bootstrap intervals over the images (seeded: the same file twice gives the
      # same interval); `agriclip report` shows them.
      "top1_interval": evaluation.bootstrap_interval(top1_correct),
      "top5_interval": evaluation.bootstrap_interval(top5_correct),
      "balanced_accuracy": float(np.mean(present)),
      "per_class": per_class,
      "class_names": names,
      "confusion": confusion.tolist(),
  }


def retrieval_recall(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                     text_image_index: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k both ways for captioned images; text j describes image text_image_index[j].

  image->text: an image counts at k if any of its captions is among its k most similar texts;
  text->image: a caption counts if its image is among its k most similar images.
  """
  text_image_index = np.asarray(text_image_index, np.int64)
  num_images = image_embeddings.shape[0]
  if text_image_index.shape != (text_embeddings.shape[0],):
    raise ValueError(f"{text_embeddings.shape[0]} texts but {text_image_index.shape} image indices")
  if text_image_index.min() < 0 or text_image_index.max() >= num_images:
    raise ValueError(f"text->image indices must lie in [0, {num_images})")
  similarity = l2_normalize(image_embeddings) @ l2_normalize(text_embeddings).T  # [N, M]
  owns = text_image_index[None, :] == np.arange(num_images)[:, None]
  if not owns.any(axis=1).all():
    raise ValueError(f"images without any caption: {np.flatnonzero(~owns.any(axis=1))[:10].tolist()}")
  best_own = np.where(owns, similarity, -np.inf).max(axis=1)
  image_rank = (np.where(owns, -np.inf, similarity) > best_own[:, None]).sum(axis=1)
  own_score = similarity[text_image_index, np.arange(len(text_image_index))]
  text_rank = (similarity > own_score[None, :]).sum(axis=0)
  metrics = {}
  for k in ks:
    metrics[f"image_to_text_R@{k}"] = float(np.mean(image_rank < k))
    metrics[f"text_to_image_R@{k}"] = float(np.mean(text_rank < k))
  return metrics


# ----------------------------------------------------------------------------------------------
# Deterministic evaluation split
# ----------------------------------------------------------------------------------------------

def is_eval_item(relative_path: str, eval_fraction: float, salt: str = DEFAULT_EVAL_SALT) -> bool:
  """True when the item belongs to the evaluation split: a hash of its relative path, so that it
  does not change with machines, orderings or the other files in the folder."""
  if not 0.0 < eval_fraction <= 1.0:
    raise ValueError(f"evaluation fraction must be in (0, 1], got {eval_fraction}")
  normalised = str(relative_path).replace("\\", "/")
  while normalised.startswith("./"):
    normalised = normalised[2:]
  digest = hashlib.sha256(f"{salt}\0{normalised}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < eval_fraction


def eval_indices(relative_paths: Sequence[str], eval_fraction: float,
                 salt: str = DEFAULT_EVAL_SALT) -> np.ndarray:
  return np.array([i for i, path in enumerate(relative_paths)
                   if is_eval_item(path, eval_fraction, salt)], np.int64)


# ----------------------------------------------------------------------------------------------
# One task, all methods
# ----------------------------------------------------------------------------------------------

def evaluate(class_emb: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
             clip_image_embeddings: np.ndarray | None = None, dino_features: np.ndarray | None = None,
             aligner=None, methods: Sequence[str] = METHODS, ensemble_weight: float = 0.5,
             logit_scale: float = DEFAULT_LOGIT_SCALE
             ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
  """({method: classification metrics}, paired differences) for one task.

  The differences compare each method with CLIP on the same images (`method_differences`)."""
  scores = method_scores(class_emb, clip_image_embeddings, dino_features, aligner, methods,
                         ensemble_weight, logit_scale)
  metrics = {method: classification_metrics(s, labels, class_names) for method, s in scores.items()}
  return metrics, method_differences(scores, labels)


def method_differences(scores: dict[str, np.ndarray], labels: np.ndarray,
                       baseline: str = "clip") -> list[dict[str, Any]]:
  """Top-1 of every other method minus the baseline's, on the same images, with the paired
  bootstrap interval of the difference: [{"methods": [m, baseline], "top1": {...}}]."""
  if baseline not in scores:
    return []
  labels = np.asarray(labels, np.int64)
  correct = {m: np.argmax(s, axis=1) == labels for m, s in scores.items()}
  return [{"methods": [method, baseline],
           "top1": evaluation.paired_bootstrap_difference(correct[method], correct[baseline])}
          for method in scores if method != baseline]


def suite_means(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean top-1 / balanced accuracy per method over tasks, as the paper averages its 20 tasks."""
  by_method: dict[str, list[dict[str, Any]]] = {}
  for result in results:
    by_method.setdefault(result["method"], []).append(result)
  return {method: {"tasks": len(rows),
                   "top1": float(np.mean([r["top1"] for r in rows])),
                   "balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in rows]))}
          for method, rows in by_method.items()}


# ----------------------------------------------------------------------------------------------
# The ensemble's weight and temperatures, chosen on the aligner's own data
# ----------------------------------------------------------------------------------------------

DEFAULT_TEMPERATURE_GRID = tuple(float(t) for t in np.geomspace(0.005, 0.5, 31))
DEFAULT_WEIGHT_GRID = tuple(float(w) for w in np.linspace(0.0, 1.0, 21))


def _caption_nll(probabilities: np.ndarray, owns: np.ndarray) -> float:
  """Mean negative log-probability that an image's caption is one of its own."""
  own = np.where(owns, probabilities, 0.0).sum(axis=1)
  return float(-np.mean(np.log(np.maximum(own, 1e-30))))


def _caption_top1(scores: np.ndarray, owns: np.ndarray) -> float:
  return float(np.mean(owns[np.arange(len(scores)), np.argmax(scores, axis=1)]))


def calibrate_ensemble(clip_image: np.ndarray, aligned: np.ndarray, text: np.ndarray,
                       text_owner: np.ndarray, temperatures: Sequence[float] = DEFAULT_TEMPERATURE_GRID,
                       weights: Sequence[float] = DEFAULT_WEIGHT_GRID) -> dict[str, Any]:
  """The ensemble's choice on captioned validation images (text j describes image text_owner[j]).

  Each image is classified among all the validation captions (image -> text retrieval): first each
  member's temperature is the one of the grid with the lowest negative log-likelihood of the right
  caption (temperature scaling), then the weight of the CLIP member is the one of the grid whose
  mixture has the lowest. Returns {"weight", "clip_temperature", "agriclip_temperature",
  "validation": {"images", "texts", "nll" and "caption_top1" per member and for the ensemble}}."""
  text_owner = np.asarray(text_owner, np.int64)
  images = len(clip_image)
  if images < 2 or len(aligned) != images or len(text) != len(text_owner):
    raise ValueError(f"calibration needs >= 2 paired images with captions, got {images} CLIP / "
                     f"{len(aligned)} aligned rows and {len(text)} texts for {len(text_owner)} owners")
  owns = text_owner[None, :] == np.arange(images)[:, None]
  text = l2_normalize(text)
  cosines = {"clip": l2_normalize(clip_image) @ text.T, "agriclip": l2_normalize(aligned) @ text.T}
  chosen, validation = {}, {"images": int(images), "texts": int(len(text))}
  for member, cosine in cosines.items():
    losses = [_caption_nll(softmax(cosine / t), owns) for t in temperatures]
    chosen[member] = float(temperatures[int(np.argmin(losses))])
    validation[member] = {"nll": float(min(losses)), "caption_top1": _caption_top1(cosine, owns)}
  members = {m: softmax(c / chosen[m]) for m, c in cosines.items()}
  mixtures = [w * members["clip"] + (1.0 - w) * members["agriclip"] for w in weights]
  losses = [_caption_nll(mixture, owns) for mixture in mixtures]
  best = int(np.argmin(losses))
  validation["ensemble"] = {"nll": float(losses[best]),
                            "caption_top1": _caption_top1(mixtures[best], owns)}
  return {"weight": float(weights[best]), "clip_temperature": chosen["clip"],
          "agriclip_temperature": chosen["agriclip"], "validation": validation}


def calibrate_on_source(source, source_indices: Sequence[int], clip_image: np.ndarray,
                        aligned: np.ndarray, encode_text: Callable[[list[str]], Any],
                        max_images: int = 1000, seed: int = 0) -> dict[str, Any] | None:
  """`calibrate_ensemble` on validation rows of the aligner's data: row r is record
  source_indices[r], with its captions as the texts; at most `max_images` rows (a seeded draw).
  None when fewer than two rows have a caption (then nothing is chosen)."""
  def captions(index: int) -> list[str]:
    record = source.entry(index) if callable(getattr(source, "entry", None)) else source[index]
    return [str(c) for c in record.get("captions") or [] if str(c).strip()]

  rows = np.arange(len(source_indices))
  if len(rows) > max_images:
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
  texts, owner, kept = [], [], []
  for row in rows:
    found = captions(int(source_indices[row]))
    if found:
      texts.extend(found)
      owner.extend([len(kept)] * len(found))
      kept.append(int(row))
  if len(kept) < 2:
    return None
  text = np.asarray(encode_text(texts), np.float32)
  return calibrate_ensemble(np.asarray(clip_image)[kept], np.asarray(aligned)[kept], text,
                            np.asarray(owner))


def ensemble_choice(model, ensemble_weight: float | None = None) -> dict[str, Any]:
  """What the ensemble uses: an explicit weight (temperatures 1 / logit_scale), else the choice
  the aligner records from its calibration, else the uncalibrated default 0.5."""
  if ensemble_weight is not None:
    return {"weight": float(ensemble_weight), "clip_temperature": None,
            "agriclip_temperature": None, "source": "given weight (temperatures 1 / logit_scale)",
            "validation": None}
  recorded = getattr(model, "ensemble", None)
  if recorded:
    return {"weight": float(recorded["weight"]),
            "clip_temperature": float(recorded["clip_temperature"]),
            "agriclip_temperature": float(recorded["agriclip_temperature"]),
            "source": f"the aligner's calibration on {recorded['validation']['images']} "
                      "validation images of its own data",
            "validation": recorded["validation"]}
  return {"weight": 0.5, "clip_temperature": None, "agriclip_temperature": None,
          "source": "default 0.5 (uncalibrated: the aligner records no calibration)",
          "validation": None}


def ensemble_temperatures(choice: dict[str, Any]) -> tuple[float, float] | None:
  if choice["clip_temperature"] is None:
    return None
  return choice["clip_temperature"], choice["agriclip_temperature"]


# ----------------------------------------------------------------------------------------------
# One task end to end: the one zero-shot path
# ----------------------------------------------------------------------------------------------

def methods_need(methods: Sequence[str]) -> tuple[bool, bool]:
  """(needs CLIP image embeddings, needs DINO features + aligner)."""
  return (any(m in ("clip", "ensemble") for m in methods),
          any(m in ("agriclip", "ensemble") for m in methods))


@dataclasses.dataclass
class TaskScores:
  """Every evaluated image of one task, scored by every method."""
  task: str
  class_names: list[str]
  prompt_names: list[str]
  templates: list[str]
  recipe: str
  scores: dict[str, np.ndarray]  # method -> [N, C] (logits; probabilities for the ensemble)
  labels: np.ndarray  # [N]
  encoded: Any  # features.EncodedImages: indices, features, skipped records
  logit_scale: float
  ensemble: dict[str, Any] | None = None  # `ensemble_choice`, when the ensemble was scored


def score_task(task: str, source, indices: Sequence[int], class_names: Sequence[str],
               templates: Sequence[str], model, methods: Sequence[str] = METHODS, *,
               recipe: str = "agriclip-jax", prompt_names: Sequence[str] | None = None,
               ensemble_weight: float | None = None, batch_size: int = 128, cache=None,
               data_fingerprint: str | None = None, mesh=None) -> TaskScores:
  """Scores of `source[indices]` against the classes under every method, with `model` an
  `api.Model` (its CLIP's text tower embeds the prompts; each image model sees its own view).

  `prompt_names` are what goes into the templates (default: the class names, cleaned when the
  recipe says so). The ensemble uses `ensemble_choice(model, ensemble_weight)`: never anything
  from this task's images. Images that cannot be decoded are counted and listed in `encoded`."""
  from agriclip_jax import features
  chosen = get_recipe(recipe)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
  need_clip, need_dino = methods_need(methods)
  missing = [what for what, needed, part in (("a CLIP model", True, model.clip),
                                             ("a DINO model", need_dino, model.dino),
                                             ("an aligner", need_dino, model.aligner))
             if needed and part is None]
  if missing:
    raise ValueError(f"task {task!r}: methods {list(methods)} need {' and '.join(missing)}")
  encoders = ([model.clip.image] if need_clip else []) + ([model.dino] if need_dino else [])
  encoded = features.encode_source(source, indices, encoders, batch_size, mesh=mesh, cache=cache,
                                   data_fingerprint=data_fingerprint, desc=task)
  if len(encoded.indices) == 0:
    raise ValueError(f"task {task!r}: none of the {len(indices)} images could be decoded "
                     f"({encoded.skipped})")
  labels = encoded.labels
  if labels.min() < 0 or labels.max() >= len(class_names):
    raise ValueError(f"task {task!r}: labels {labels.min()}..{labels.max()} do not index its "
                     f"{len(class_names)} classes (-1 = a record without a label)")
  if prompt_names is None:
    prompt_names = [clean_class_name(c) if chosen.clean_names else c for c in class_names]
  class_emb = class_embeddings(prompt_names, templates, model.clip.encode_text,
                               prompt_average=chosen.prompt_average)
  ensemble = ensemble_choice(model, ensemble_weight) if "ensemble" in methods else None
  scores = method_scores(class_emb, encoded.features.get("clip_image"),
                         encoded.features.get("dino"), model.aligner, methods,
                         ensemble["weight"] if ensemble else 0.5, model.clip.logit_scale,
                         ensemble_temperatures(ensemble) if ensemble else None)
  return TaskScores(task, list(class_names), list(prompt_names), list(templates), chosen.name,
                    scores, labels, encoded, model.clip.logit_scale, ensemble)


def task_rows(scored: TaskScores, **common: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(result rows, one per method; paired differences from CLIP) in the one row schema:
  task, method, recipe, templates, prompt_names, num_classes, chance, skipped, the
  classification metrics (`classification_metrics`) and top1_minus_clip, plus `common`."""
  differences = method_differences(scored.scores, scored.labels)
  from_clip = {d["methods"][0]: d["top1"] for d in differences}
  rows = []
  for method, method_scores_ in scored.scores.items():
    rows.append({"task": scored.task, "method": method, "recipe": scored.recipe,
                 "templates": scored.templates, "prompt_names": scored.prompt_names,
                 "num_classes": len(scored.class_names),
                 "chance": 1.0 / len(scored.class_names),  # a uniform guess, in expectation
                 "skipped": scored.encoded.skipped, **common,
                 **classification_metrics(method_scores_, scored.labels, scored.class_names),
                 **({"top1_minus_clip": from_clip[method]} if method in from_clip else {}),
                 **({"ensemble": scored.ensemble} if method == "ensemble" else {})})
  return rows, [{"task": scored.task, **d} for d in differences]


def task_predictions(scored: TaskScores, names: Sequence[str]) -> list[dict[str, Any]]:
  """Per image and method: {"task", "method", "image", "label", "prediction"}; `names` are the
  evaluated records' names (`features.record_names` of `scored.encoded.indices`)."""
  return [{"task": scored.task, "method": method, "image": name,
           "label": scored.class_names[int(label)], "prediction": scored.class_names[int(best)]}
          for method, s in scored.scores.items()
          for name, label, best in zip(names, scored.labels, np.argmax(s, axis=1))]
