"""`agriclip knn`: DINO's weighted kNN evaluation of a model's image features.

  agriclip knn --model CLIP_DIR [--dino DIR_OR_PTH --aligner PATH] --train SOURCE --test SOURCE
               [--features clip|dino|agriclip|concat [MORE ...]] [--k 10 20 100 200]
               [--temperature 0.07] --out results.json
  agriclip knn ... --suite PINNED.json --train-task NAME --test-task NAME --out results.json

Features: clip (the CLIP image embedding), dino (the DINO backbone's features), agriclip (DINO ->
aligner, the AgriCLIP path), concat (clip and agriclip, each L2-normalised, side by side). With
several kinds the first is reported in full and every other one under "compared", with the paired
bootstrap interval of (first - other) on the same test images. Test classes are matched to the
training classes by name. Every accuracy carries its 95 % bootstrap interval. With --suite the
two sides are tasks of a suite (their split and class subset as `tasks.entry_records` selects);
a pinned suite's data is checked against the pins before any model loads, and the results record
{"suite": {"path", "hash"}} and each side's task and files hash.

This module also holds what `agriclip probe` shares with it: the feature flags and the labelled
features of --train and --test.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax import fileio

FEATURE_KINDS = ("clip", "dino", "agriclip", "concat")


# ----------------------------------------------------------------------------------------------
# Shared with `agriclip probe`: flags, models, labelled features
# ----------------------------------------------------------------------------------------------

def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", type=fileio.input_path,
                      help="CLIP model directory (for clip, agriclip, concat)")
  parser.add_argument("--dino", type=fileio.input_path, help="DINO backbone: model directory or .pth")
  parser.add_argument("--aligner", type=fileio.input_path,
                      help="aligner: .pth | .safetensors | .npz | model dir")
  parser.add_argument("--dino-pooling", default=None,
                      help="DINO ViT features: 'cls', 'cls+avgpool' or 'lastN' (default: the one "
                           "the DINO model records)")
  parser.add_argument("--train", help="training images: ImageFolder or any labelled source")
  parser.add_argument("--test", help="test images, classes named as in --train")
  parser.add_argument("--suite", type=Path,
                      help="a suite (or pinned suite) whose tasks --train-task and --test-task are "
                           "used instead of --train / --test (split and class subset as the suite "
                           "says); a pinned suite's data is checked against the pin first")
  parser.add_argument("--train-task", help="the suite task of the training images")
  parser.add_argument("--test-task", help="the suite task of the test images")
  parser.add_argument("--features", nargs="+", choices=FEATURE_KINDS, default=["agriclip"],
                      help="which features; several: the first is compared with each other one")
  parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
  parser.add_argument("--bootstrap-seed", type=int, default=0)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--cache", type=Path, help="feature cache folder")
  parser.add_argument("--out", type=Path, required=True, help="results JSON")
  from agriclip_jax.commands import distributed
  distributed.add_arguments(parser)


@dataclasses.dataclass
class LabelledFeatures:
  features: dict[str, np.ndarray]  # feature kind -> [N, D]
  labels: np.ndarray               # [N] indices into the training classes
  summary: dict[str, Any]          # {"source", "images", "classes", "skipped"}


def _needs(kinds) -> tuple[bool, bool]:
  """(CLIP image tower, DINO + aligner) that the feature kinds need."""
  return (any(k in ("clip", "concat") for k in kinds),
          any(k in ("dino", "agriclip", "concat") for k in kinds))


def load_encoders(args: argparse.Namespace):
  """(image encoders for features.encode_source, the aligner or None) through `api.load`, the one
  loader (aligner provenance and widths checked before any image)."""
  from agriclip_jax import api
  need_clip, need_dino = _needs(args.features)
  need_aligner = any(k in ("agriclip", "concat") for k in args.features)
  missing = [flag for flag, wanted, given in (("--model", need_clip, args.model),
                                              ("--dino", need_dino, args.dino),
                                              ("--aligner", need_aligner, args.aligner))
             if wanted and given is None]
  if missing:
    raise ValueError(f"features {list(args.features)} need {' and '.join(missing)}")
  # A CLIP given with an aligner is loaded even for "agriclip" alone: the aligner's record of the
  # CLIP it targets is then checked too.
  model = api.load(clip=args.model if need_clip or need_aligner else None,
                   dino=args.dino if need_dino else None,
                   aligner=args.aligner if need_aligner else None,
                   dino_pooling=args.dino_pooling, batch_size=args.batch_size)
  encoders = ([model.clip.image] if need_clip else []) + ([model.dino] if need_dino else [])
  return encoders, model.aligner


def feature_matrix(kind: str, encoded: dict[str, np.ndarray], aligner) -> np.ndarray:
  """One kind of features [N, D] from the encoders' outputs ("clip_image", "dino")."""
  from agriclip_jax.evaluation import l2_normalise
  if kind == "clip":
    return encoded["clip_image"]
  if kind == "dino":
    return encoded["dino"]
  aligned = aligner.apply(np.asarray(encoded["dino"], np.float32))
  if kind == "agriclip":
    return aligned
  if kind == "concat":  # each half unit-norm: neither model outweighs the other by its scale
    return np.concatenate([l2_normalise(encoded["clip_image"]), l2_normalise(aligned)], axis=1)
  raise ValueError(f"unknown feature kind {kind!r}; choose from {FEATURE_KINDS}")


def labelled_features(records, encoders, aligner, kinds, batch_size: int, cache=None,
                      class_names: list[str] | None = None) -> tuple[LabelledFeatures, list[str]]:
  """(features of every kind for the decodable images of `records` (`tasks.TaskRecords`), its
  class names). With `class_names` (the training classes) the labels are mapped onto them by
  name."""
  from agriclip_jax import features
  spec, source, indices = records.spec, records.source, records.indices
  if len(indices) == 0:
    raise ValueError(f"{spec}: no images")
  data_print = features.data_fingerprint(spec, source)
  if records.excluded:  # a class subset: the cache holds its labels
    data_print = features.fingerprint(data_print, records.class_names)
  encoded = features.encode_source(source, indices, encoders, batch_size, cache=cache,
                                   data_fingerprint=data_print, desc=str(spec))
  if len(encoded.indices) == 0:
    raise ValueError(f"{spec}: none of its {len(indices)} images could be decoded ({encoded.skipped})")
  labels = np.asarray(encoded.labels, np.int64)
  if labels.min() < 0:
    raise ValueError(f"{spec}: {int((labels < 0).sum())} images have no label; kNN and probes "
                     "need labelled images (an ImageFolder, or a manifest with labels)")
  names = records.class_names  # a suite's or an ImageFolder's; a bare manifest's labels are numbers
  names = list(names) if names is not None else [str(i) for i in range(int(labels.max()) + 1)]
  if class_names is not None:
    unknown = sorted(set(names[i] for i in np.unique(labels)) - set(class_names))
    if unknown:
      raise ValueError(f"{spec}: classes {unknown} are not among the training classes {class_names}")
    position = {name: i for i, name in enumerate(class_names)}
    labels = np.array([position[names[i]] for i in labels], np.int64)
  matrices = {kind: np.asarray(feature_matrix(kind, encoded.features, aligner), np.float32)
              for kind in kinds}
  summary = {"source": str(spec), "images": int(len(labels)),
             "classes": int(len(np.unique(labels))), "skipped": encoded.skipped}
  if records.excluded:
    summary["excluded_images"] = records.excluded
  return LabelledFeatures(matrices, labels, summary), names


def _sides(args: argparse.Namespace):
  """(train records, test records, {"path", "hash"} of --suite or None, the two suite entries or
  None): from --train / --test, or from the suite's --train-task / --test-task, checked against
  their pins (a pinned suite) before any model loads."""
  from agriclip_jax import suite_pin, tasks
  from input_pipeline.sources import open_source
  if args.suite is None:
    missing = [flag for flag, value in (("--train", args.train), ("--test", args.test)) if not value]
    if missing or args.train_task or args.test_task:
      raise ValueError(f"give --train and --test (sources), or --suite with --train-task and "
                       f"--test-task; missing {missing}" if missing else
                       "--train-task / --test-task name tasks of a --suite")

    def whole(spec):
      source = open_source(spec)
      return tasks.TaskRecords(str(spec), source, np.arange(len(source)),
                               getattr(source, "class_names", None), {})
    return whole(args.train), whole(args.test), None, None
  if args.train or args.test or not args.train_task or not args.test_task:
    raise ValueError("--suite takes its images from --train-task and --test-task (both needed); "
                     "drop --train / --test")
  suite = tasks.read_suite(args.suite)
  by_name = {entry.task.name: entry for entry in suite.entries}
  sides = []
  for flag, name in (("--train-task", args.train_task), ("--test-task", args.test_task)):
    if name not in by_name:
      raise ValueError(f"{flag} {name!r} is not a task of suite {args.suite} (its tasks: "
                       f"{list(by_name)})")
    entry = by_name[name]
    if entry.pin is not None:
      suite_pin.check_entry(entry, f"pinned suite {args.suite}")
    sides.append(entry)
  train, test = (tasks.entry_records(entry) for entry in sides)
  return train, test, {"path": str(args.suite), "hash": suite.hash}, sides


def train_and_test_features(args: argparse.Namespace):
  """(train LabelledFeatures, test LabelledFeatures, training class names, the suite's
  {"path", "hash"} or None) for the args; --out is checked to be writable first and a pinned
  suite's data against its pins, so that no encoding is lost to a bad destination or data."""
  from agriclip_jax import features
  from agriclip_jax.commands import distributed
  from agriclip_jax.fileio import check_writable
  distributed.initialize(args)
  check_writable(args.out)
  train_records, test_records, suite, entries = _sides(args)
  encoders, aligner = load_encoders(args)
  cache = features.FeatureCache(args.cache) if args.cache else None
  train, class_names = labelled_features(train_records, encoders, aligner, args.features,
                                         args.batch_size, cache)
  test, _ = labelled_features(test_records, encoders, aligner, args.features, args.batch_size,
                              cache, class_names)
  for side, entry in zip((train, test), entries or ()):  # which task, which pinned images
    side.summary["task"] = entry.task.name
    if entry.pin is not None:
      side.summary["files_hash"] = entry.pin["files_hash"]
  return train, test, class_names, suite


def interval_fields(name: str, correct: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
  """{name: accuracy, name + "_interval": bootstrap interval} of per-image correctness."""
  from agriclip_jax.evaluation import bootstrap_interval
  interval = bootstrap_interval(correct, args.resamples, args.bootstrap_seed)
  return {name: interval["accuracy"], f"{name}_interval": interval}


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray,
                      args: argparse.Namespace) -> dict[str, Any]:
  from agriclip_jax.evaluation import paired_bootstrap_difference
  return paired_bootstrap_difference(correct_a, correct_b, args.resamples, args.bootstrap_seed)




# ----------------------------------------------------------------------------------------------
# kNN
# ----------------------------------------------------------------------------------------------

def knn_correct(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                test_labels: np.ndarray, num_classes: int, ks, temperature: float
                ) -> dict[int, dict[str, np.ndarray]]:
  """{k: {"top1": [M] bool, "top5": [M] bool}}."""
  from agriclip_jax import evaluation
  ranked = evaluation.knn_predict(train, train_labels, test, num_classes, ks, temperature)
  return {k: {"top1": evaluation.topk_correct(r, test_labels, 1),
              "top5": evaluation.topk_correct(r, test_labels, evaluation.TOP_RANKS)}
          for k, r in ranked.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from agriclip_jax.evaluation import DINO_KS, DINO_TEMPERATURE
  add_feature_arguments(parser)
  parser.add_argument("--k", type=int, nargs="+", default=list(DINO_KS), help="neighbours")
  parser.add_argument("--temperature", type=float, default=DINO_TEMPERATURE,
                      help="vote weights exp(similarity / T)")


def run(args: argparse.Namespace) -> int:
  from agriclip_jax.fileio import atomic_write_json
  train, test, class_names, suite = train_and_test_features(args)
  too_many = [k for k in args.k if k > train.summary["images"]]
  if too_many:
    raise ValueError(f"--k {too_many} exceeds the {train.summary['images']} training images of "
                     f"{train.summary['source']}; choose k <= {train.summary['images']}")
  correct = {kind: knn_correct(train.features[kind], train.labels, test.features[kind], test.labels,
                               len(class_names), args.k, args.temperature)
             for kind in args.features}

  def section(kind: str) -> dict[str, Any]:
    return {str(k): {**interval_fields("top1", c["top1"], args), **interval_fields("top5", c["top5"], args)}
            for k, c in correct[kind].items()}

  first = args.features[0]
  document: dict[str, Any] = {
      "knn": section(first), "features": first, "temperature": args.temperature,
      "train": train.summary, "test": test.summary, "class_names": class_names}
  if suite is not None:  # equal hashes: measured on the same images
    document["suite"] = suite
  for other in args.features[1:]:
    document.setdefault("compared", {})[other] = {
        "knn": section(other),
        "difference": {str(k): {rank: paired_difference(correct[first][k][rank], correct[other][k][rank], args)
                                for rank in ("top1", "top5")} for k in args.k}}
  document["config"] = {"model": str(args.model), "dino": str(args.dino), "aligner": str(args.aligner),
                        "dino_pooling": args.dino_pooling, "features": list(args.features),
                        "k": list(args.k), "resamples": args.resamples,
                        "bootstrap_seed": args.bootstrap_seed}
  from agriclip_jax.commands import distributed
  if not distributed.writes_outputs():
    return 0
  atomic_write_json(args.out, document, indent=2)
  # Every feature kind on the console, each other kind with its paired difference to the first.
  for kind in args.features:
    rows = document["knn"] if kind == first else document["compared"][kind]["knn"]
    for k, row in rows.items():
      interval = row["top1_interval"]
      line = (f"[knn] {kind} k={k}: top-1 {100 * row['top1']:.2f}% [{100 * interval['low']:.2f}, "
              f"{100 * interval['high']:.2f}], top-5 {100 * row['top5']:.2f}% on "
              f"{test.summary['images']} images")
      if kind != first:
        d = document["compared"][kind]["difference"][k]["top1"]
        line += (f"; {first} - {kind} {100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, "
                 f"{100 * d['high']:+.2f}]")
      print(line)
  print(f"[knn] results -> {args.out}")
  return 0
