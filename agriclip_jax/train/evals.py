"""Evaluations during training: `config.evals`, a tuple of dicts, each run every `every` steps on
the current parameters, between steps, its results logged as `eval/<name>/<metric>`.

  dict(name="corn", kind="zeroshot", source="data/corn/test", every=500,
       templates=("a photo of a maize leaf with {}.",))       # CLIP zero-shot; needs a tokenizer
  dict(name="corn_knn", kind="knn", train="data/corn/train", test="data/corn/test", every=500,
       k=20, temperature=0.07)                                # DINO's weighted kNN

Sources are anything `input_pipeline.sources.open_source` reads (an ImageFolder, a manifest with
labels, tfds:NAME:SPLIT); they are opened at each evaluation. Images get the view the trained
model's directory records (`model_io.default_preprocess`, what `export_models` writes), and the
numbers come from the same functions as `agriclip zeroshot` and `agriclip knn`
(`features.encode_source`, `zeroshot.class_embeddings` / `method_scores` /
`classification_metrics`, `evaluation.knn_predict`). kNN uses the CLIP image tower in
contrastive runs and the DINO teacher's backbone in dino and joint runs. Metrics: top1, top5
(top-k with k = min(5, classes)) and images.

An evaluation that fails (a folder gone, an image-less source, anything it raises) is reported in
one line and training goes on: an evaluation never costs a run.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping

import numpy as np

EVAL_KINDS = ("zeroshot", "knn")
COMMON_KEYS = ("name", "kind", "every", "batch_size")
KIND_KEYS = {"zeroshot": ("source", "templates"), "knn": ("train", "test", "k", "temperature")}
REQUIRED_KEYS = {"zeroshot": ("source",), "knn": ("train", "test")}
DEFAULTS = {"batch_size": 64, "templates": ("a photo of {}.",), "k": 20, "temperature": 0.07}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


# ----------------------------------------------------------------------------------------------
# Validation (before anything compiles; called by train/config.validate_config)
# ----------------------------------------------------------------------------------------------

def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _source_spec(item: Mapping[str, Any], key: str, where: str) -> None:
  value = item.get(key)
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}.{key}={value!r}: a {item['kind']} evaluation needs a data source "
                     f"(an ImageFolder path or any source spec) under {key!r}")


def validate_evals(evals: Any, run_kind: str, tokenizer: str | None) -> None:
  """Errors name config.evals[i].KEY. `tokenizer`: the one the run's captions use
  (data.tokenizer or clip.init_from), which zero-shot prompts need too."""
  from agriclip_jax import zeroshot
  if not isinstance(evals, (tuple, list)):
    raise ValueError(f"config.evals={evals!r} must be a tuple of dicts (one per evaluation)")
  names: set[str] = set()
  for index, item in enumerate(evals):
    where = f"config.evals[{index}]"
    if not isinstance(item, Mapping) and not hasattr(item, "keys"):
      raise ValueError(f"{where}={item!r} must be a dict with name, kind, every, ...")
    kind = item.get("kind")
    if kind not in EVAL_KINDS:
      raise ValueError(f"{where}.kind={kind!r}; expected one of {', '.join(EVAL_KINDS)}")
    allowed = COMMON_KEYS + KIND_KEYS[kind]
    unknown = sorted(set(item.keys()) - set(allowed))
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {unknown} for a {kind} evaluation; allowed: "
                       f"{', '.join(allowed)}")
    name = item.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
      raise ValueError(f"{where}.name={name!r} must be a non-empty name of letters, digits, "
                       f"'_', '.' or '-' (it becomes the metric prefix eval/<name>/)")
    if name in names:
      raise ValueError(f"{where}.name={name!r} is used by an earlier evaluation too")
    names.add(name)
    for key in ("every", "batch_size") + (("k",) if kind == "knn" else ()):
      if key in item and not _positive_int(item[key]):
        raise ValueError(f"{where}.{key}={item[key]!r} must be a positive integer")
    if "every" not in item:
      raise ValueError(f"{where}: no 'every' (run it every N steps)")
    for key in REQUIRED_KEYS[kind]:
      _source_spec(item, key, where)
    if kind == "zeroshot":
      if run_kind == "dino":
        raise ValueError(f"{where}: a zeroshot evaluation needs a CLIP model; this run is "
                         f"kind='dino' (use kind='knn')")
      if not tokenizer:
        raise ValueError(f"{where}: a zeroshot evaluation needs a tokenizer for its prompts: "
                         f"set config.data.tokenizer (or clip.init_from with tokenizer files)")
      templates = item.get("templates", DEFAULTS["templates"])
      if isinstance(templates, str) or not isinstance(templates, (tuple, list)) or not templates:
        raise ValueError(f"{where}.templates={templates!r} must be a non-empty tuple of strings")
      for number, template in enumerate(templates):
        try:
          zeroshot.validate_template(template)
        except (TypeError, ValueError) as err:
          raise ValueError(f"{where}.templates[{number}]={template!r}: {err}") from None
    if kind == "knn" and "temperature" in item:
      value = item["temperature"]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}.temperature={value!r} must be a positive number")


def due(evals: Any, step: int) -> list[Mapping[str, Any]]:
  """The evaluations to run after `step`."""
  return [item for item in evals if step % int(item["every"]) == 0]


# ----------------------------------------------------------------------------------------------
# The models being trained, as the evaluation engine's encoders
# ----------------------------------------------------------------------------------------------

def _parameters(tree: Any) -> Any:
  """Arrays the evaluation can place on its devices. One process: the training arrays themselves
  (the encoders copy them onto their own sharding). Several: full host copies, gathered by every
  process (a collective), since each process evaluates on its own devices."""
  import jax
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


class TrainedModels:
  """The models being trained as the evaluation engine's encoders. Their feature functions and
  views are built once per run (`image_features_fn` returns a new function each call, and a new
  function is compiled again: at every evaluation); the parameters come from the state at each
  evaluation."""

  def __init__(self, task: Any, config: Any):
    self.task, self.config = task, config
    self._built: dict[str, Any] = {}

  def _once(self, key: str, build: Any) -> Any:
    if key not in self._built:
      self._built[key] = build()
    return self._built[key]

  def _clip(self) -> tuple[dict, Any, Any]:
    """(config, eval view, feature function) of the CLIP model."""
    from agriclip_jax import features, model_io

    def build():
      config = self.task.clip_model.config.to_dict()
      return (config, model_io.default_preprocess("clip", config),
              features.image_features_fn("clip", config))
    return self._once("clip", build)

  def clip_image(self, params: Any):
    from agriclip_jax import features
    _, spec, apply = self._clip()
    return features.spec_encoder("clip_image", "training", spec, apply, {"params": params})

  def dino_teacher(self, teacher: Any, batch_stats: Any):
    from agriclip_jax import features, model_io

    def build():
      config = self.task.dino_model.config.to_dict()
      spec = model_io.default_preprocess("dino", config)
      pooling = spec.pooling or model_io.DEFAULT_DINO_POOLING
      return spec, pooling, features.image_features_fn("dino", config, pooling, "the teacher")
    spec, pooling, apply = self._once("dino", build)
    variables = {"params": teacher, **({"batch_stats": batch_stats} if batch_stats else {})}
    return features.spec_encoder("dino", "training", spec, apply, variables, pooling)

  def clip_text(self, params: Any, batch_size: int, mesh: Any):
    """texts -> unnormalised text embeddings, through features.encode_texts."""
    from agriclip_jax import features, model_io

    def build():
      config = self._clip()[0]
      module, _ = model_io.build_model("clip", config)
      from agriclip_jax.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(self.config.data.get("tokenizer")
                                 or self.config.clip.get("init_from"))
      length = int(config["text"]["context_length"])
      return (lambda variables, tokens: module.apply(variables, tokens,
                                                     method=type(module).encode_text),
              lambda texts: tokenizer.encode(list(texts), context_length=length))
    apply_text, tokenize = self._once("text", build)
    return lambda texts: features.encode_texts(texts, tokenize, apply_text, batch_size, mesh,
                                               params={"params": params})


# ----------------------------------------------------------------------------------------------
# The evaluations
# ----------------------------------------------------------------------------------------------

def labelled_images(spec: str, encoder: Any, batch_size: int, mesh: Any, what: str
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(features [N, D], labels [N], class names) of a source's decodable images."""
  from agriclip_jax import features
  from input_pipeline.sources import open_source
  source = open_source(spec)
  if len(source) == 0:
    raise ValueError(f"{spec}: no images")
  encoded = features.encode_source(source, np.arange(len(source)), [encoder], batch_size,
                                   mesh=mesh, desc=what)
  if len(encoded.indices) == 0:
    raise ValueError(f"{spec}: none of its {len(source)} images could be decoded "
                     f"({encoded.skipped})")
  labels = np.asarray(encoded.labels, np.int64)
  if labels.min() < 0:
    raise ValueError(f"{spec}: {int((labels < 0).sum())} images have no label")
  names = getattr(source, "class_names", None)
  names = list(names) if names is not None else [str(i) for i in range(int(labels.max()) + 1)]
  return encoded.features[encoder.name], labels, names


def relabel(labels: np.ndarray, names: list[str], onto: list[str], spec: str) -> np.ndarray:
  """Labels of classes `names` as indices into `onto` (test classes matched by name)."""
  unknown = sorted({names[i] for i in np.unique(labels)} - set(onto))
  if unknown:
    raise ValueError(f"{spec}: classes {unknown} are not among the training classes {onto}")
  index = {name: i for i, name in enumerate(onto)}
  return np.asarray([index[names[i]] for i in labels], np.int64)


def zeroshot_metrics(item: Mapping[str, Any], image_encoder: Any, encode_text: Any,
                     mesh: Any) -> dict[str, float]:
  from agriclip_jax import zeroshot
  batch_size = int(item.get("batch_size", DEFAULTS["batch_size"]))
  images, labels, names = labelled_images(item["source"], image_encoder, batch_size, mesh,
                                          f"eval {item['name']}")
  templates = list(item.get("templates", DEFAULTS["templates"]))
  class_emb = zeroshot.class_embeddings([zeroshot.clean_class_name(n) for n in names], templates,
                                        encode_text)
  scores = zeroshot.method_scores(class_emb, clip_image_embeddings=images, methods=("clip",))
  metrics = zeroshot.classification_metrics(scores["clip"], labels, names)
  return {"top1": metrics["top1"], "top5": metrics["top5"], "images": metrics["num_images"]}


def knn_metrics(item: Mapping[str, Any], image_encoder: Any, mesh: Any) -> dict[str, float]:
  from agriclip_jax import evaluation
  batch_size = int(item.get("batch_size", DEFAULTS["batch_size"]))
  what = f"eval {item['name']}"
  train, train_labels, train_names = labelled_images(item["train"], image_encoder, batch_size,
                                                     mesh, f"{what} (train)")
  test, test_labels, test_names = labelled_images(item["test"], image_encoder, batch_size, mesh,
                                                  f"{what} (test)")
  test_labels = relabel(test_labels, test_names, train_names, item["test"])
  k = int(item.get("k", DEFAULTS["k"]))
  ranked = evaluation.knn_predict(train, train_labels, test, len(train_names), ks=(k,),
                                  temperature=float(item.get("temperature",
                                                             DEFAULTS["temperature"])),
                                  mesh=mesh)[k]
  return {"top1": float(evaluation.topk_correct(ranked, test_labels, 1).mean()),
          "top5": float(evaluation.topk_correct(ranked, test_labels, evaluation.TOP_RANKS).mean()),
          "images": int(len(test_labels))}


def run_due(items: list[Mapping[str, Any]], step: int, state: dict, models: TrainedModels,
            mesh: Any, report: Any = None) -> dict[str, float]:
  """{"eval/<name>/<metric>": value} of the evaluations due at `step` that succeeded. Every
  process calls it (the gather of parameters is collective); a failure is `report`ed in one line
  (default: stderr) and leaves its metrics out."""
  import jax

  from agriclip_jax import features
  report = report or (lambda line: print(line, file=sys.stderr, flush=True))
  # Each process evaluates on its own devices of the mesh.
  eval_mesh = features.data_mesh([d for d in mesh.devices.flat
                                  if d.process_index == jax.process_index()])
  cache: dict[str, Any] = {}  # this step's encoders, shared by the evaluations

  def encoder(kind: str):
    if kind not in cache:
      if kind == "dino":
        stats = state.get("teacher_batch_stats", {}).get("dino")
        cache[kind] = models.dino_teacher(_parameters(state["teacher"]["dino"]),
                                          _parameters(stats) if stats else None)
      else:
        if "clip_params" not in cache:
          cache["clip_params"] = _parameters(state["params"]["clip"])
        cache[kind] = (models.clip_image(cache["clip_params"]) if kind == "clip_image" else
                       models.clip_text(cache["clip_params"], DEFAULTS["batch_size"], eval_mesh))
    return cache[kind]

  results: dict[str, float] = {}
  for item in items:
    try:
      if item["kind"] == "zeroshot":
        metrics = zeroshot_metrics(item, encoder("clip_image"), encoder("clip_text"), eval_mesh)
      else:
        tower = "dino" if models.task.dino_model is not None else "clip_image"
        metrics = knn_metrics(item, encoder(tower), eval_mesh)
    except Exception as err:  # noqa: BLE001 -- an evaluation never stops the run
      report(f"warning: evaluation {item['name']!r} ({item['kind']}) at step {step} failed and "
             f"was skipped; training goes on: {type(err).__name__}: {err}")
      continue
    results.update({f"eval/{item['name']}/{key}": value for key, value in metrics.items()})
  return results
