"""`agriclip probe`: a linear probe (and few-shot) on a model's image features.

  agriclip probe --model CLIP_DIR [--dino DIR_OR_PTH --aligner PATH] --train SOURCE --test SOURCE
                 [--features clip|dino|agriclip|concat [MORE ...]] [--C C [C ...]]
                 [--shots N [N ...]] [--seeds S] --out results.json

The probe is multinomial logistic regression on L2-normalised features with a bias, fitted by
L-BFGS; its strength C (scikit-learn's: summed loss + ||W||^2 / (2C)) is the one of the sweep that
scores best on a validation split carved from --train, and the probe is then refitted on all of
--train. With --shots, each of --seeds seeds draws N training images per class, and the probe and a
class-centroid classifier (SimpleShot's CL2N) fitted on them are scored on --test: mean and std per
N. Feature flags and the comparison of several kinds are as for `agriclip knn`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from agriclip_jax.commands.knn import (add_feature_arguments, interval_fields, paired_difference,
                                       train_and_test_features)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  add_feature_arguments(parser)
  parser.add_argument("--C", type=float, nargs="+", default=None,
                      help="C values to choose from on the validation split (default: 23 values "
                           "10^-6 .. 10^5); one value fits it without a sweep")
  parser.add_argument("--val-fraction", type=float, default=0.2,
                      help="share of each training class held out to choose C")
  parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split")
  parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations at most")
  parser.add_argument("--shots", type=int, nargs="+", default=None,
                      help="few-shot: training images per class (several values allowed)")
  parser.add_argument("--seeds", type=int, default=5, help="few-shot draws per N")


def probe_correct(train, train_labels, test, test_labels, num_classes: int,
                  args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
  """([M] bool top-1 correctness of the swept, refitted probe, its summary)."""
  from agriclip_jax import evaluation
  Cs = args.C if args.C is not None else evaluation.DEFAULT_C_GRID
  probe, sweep = evaluation.sweep_probe(train, train_labels, num_classes, Cs,
                                        val_fraction=args.val_fraction, seed=args.split_seed,
                                        max_iter=args.max_iter)
  correct = probe.ranked(evaluation.l2_normalise(test))[:, 0] == test_labels
  return correct, {"C": probe.C, "iterations": probe.iterations, "sweep": sweep}


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import evaluation
  from agriclip_jax.fileio import atomic_write_json
  if args.shots is not None and (min(args.shots) < 1 or args.seeds < 1):
    raise ValueError(f"--shots {args.shots} and --seeds {args.seeds} must be positive")
  train, test, class_names, suite = train_and_test_features(args)
  num_classes = len(class_names)
  if args.shots:
    counts = np.bincount(train.labels, minlength=num_classes)
    short = {name: int(count) for name, count in zip(class_names, counts) if count < max(args.shots)}
    if short:
      raise ValueError(f"--shots {max(args.shots)} needs as many training images of every class; "
                       f"{train.summary['source']} has fewer of {short}")
  results = {kind: probe_correct(train.features[kind], train.labels, test.features[kind],
                                 test.labels, num_classes, args) for kind in args.features}

  def section(kind: str) -> dict[str, Any]:
    correct, summary = results[kind]
    out: dict[str, Any] = {"probe": {**interval_fields("top1", correct, args), **summary}}
    if args.shots:
      out["fewshot"] = evaluation.fewshot(
          train.features[kind], train.labels, test.features[kind], test.labels, num_classes,
          args.shots, args.seeds, args.C if args.C is not None else evaluation.DEFAULT_C_GRID,
          args.max_iter)
    return out

  first = args.features[0]
  document: dict[str, Any] = {**section(first), "features": first, "train": train.summary,
                              "test": test.summary, "class_names": class_names}
  if suite is not None:  # equal hashes: measured on the same images
    document["suite"] = suite
  for other in args.features[1:]:
    document.setdefault("compared", {})[other] = {
        **section(other),
        "difference": {"probe": {"top1": paired_difference(results[first][0], results[other][0], args)}}}
  document["config"] = {"model": str(args.model), "dino": str(args.dino), "aligner": str(args.aligner),
                        "dino_pooling": args.dino_pooling, "features": list(args.features),
                        "C": args.C, "val_fraction": args.val_fraction, "split_seed": args.split_seed,
                        "shots": args.shots, "seeds": args.seeds, "resamples": args.resamples,
                        "bootstrap_seed": args.bootstrap_seed}
  from agriclip_jax.commands import distributed
  if not distributed.writes_outputs():
    return 0
  atomic_write_json(args.out, document, indent=2)
  # Every feature kind on the console, each other kind with its paired difference to the first.
  for kind in args.features:
    part = document if kind == first else document["compared"][kind]
    probe = part["probe"]
    interval = probe["top1_interval"]
    line = (f"[probe] {kind}: top-1 {100 * probe['top1']:.2f}% [{100 * interval['low']:.2f}, "
            f"{100 * interval['high']:.2f}] on {test.summary['images']} images, C {probe['C']:g}")
    if kind != first:
      d = part["difference"]["probe"]["top1"]
      line += (f"; {first} - {kind} {100 * d['difference']:+.2f} [{100 * d['low']:+.2f}, "
               f"{100 * d['high']:+.2f}]")
    print(line)
    if probe["iterations"] >= args.max_iter:
      print(f"[probe] warning: the {kind} probe (C {probe['C']:g}) stopped at the --max-iter "
            f"limit of {args.max_iter} L-BFGS iterations before converging; its accuracy may "
            f"change with a larger --max-iter", file=sys.stderr)
    for n, row in part.get("fewshot", {}).items():
      print(f"[probe] {kind} {n}-shot over {row['seeds']} seeds: probe "
            f"{100 * row['probe']['mean']:.2f} +- {100 * row['probe']['std']:.2f}%, centroid "
            f"{100 * row['centroid']['mean']:.2f} +- {100 * row['centroid']['std']:.2f}%")
  print(f"[probe] results -> {args.out}")
  return 0
