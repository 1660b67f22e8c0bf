"""`agriclip align`: fit the linear DINO -> CLIP aligner.

Inputs, either
  --dino-features X.npy --clip-features Y.npy   paired feature rows (read memory-mapped, in chunks), or
  --dino PATH --model DIR --data SRC            a DINO backbone (model directory or .pth), a CLIP model
                                                directory and a data source of the input pipeline;
                                                features are extracted (and cached with --cache).
Output --out PATH: `.pth` writes the reference format {'W', 'b'}, `.safetensors` / `.npz` ours; the
metrics (MSE, R^2 on the fitting and held-out splits) are printed and saved next to it as JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from agriclip_jax import fileio


def _ridge(text: str) -> float | str:
  if text == "auto":
    return text
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--ridge takes 'auto' or a number >= 0, got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"--ridge must be >= 0, got {value}")
  return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
  features = parser.add_argument_group("precomputed features")
  features.add_argument("--dino-features", type=Path, help=".npy [N, dino_dim]")
  features.add_argument("--clip-features", type=Path, help=".npy [N, clip_dim], same rows")
  models = parser.add_argument_group("models + data")
  models.add_argument("--dino", type=fileio.input_path, help="DINO backbone: model directory or .pth")
  models.add_argument("--dino-pooling", default=None,
                      help="DINO ViT features: 'cls' (the reference's), 'cls+avgpool' or 'lastN' "
                           "(DINO's linear-evaluation choices); default: the one the DINO model "
                           "records. The aligner file records it for zero-shot")
  models.add_argument("--model", type=fileio.input_path, help="CLIP model directory")
  models.add_argument("--data", help="data source: ImageFolder, manifest, shards, tfds:NAME[:SPLIT]")
  models.add_argument("--reserve-eval", type=float, default=0.0, metavar="FRACTION",
                      help="leave out the items that `agriclip zeroshot --eval-fraction FRACTION` "
                           "evaluates on (same hash of the item key)")
  models.add_argument("--cache", type=Path, help="feature cache folder (reruns skip extraction)")
  models.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--out", type=Path, required=True, help=".pth | .safetensors | .npz")
  parser.add_argument("--method", choices=("exact", "sgd"), default="exact",
                      help="exact least squares (default) or the reference SGD recipe")
  parser.add_argument("--ridge", type=_ridge, default="auto",
                      help="exact only: 'auto' (default: the strength of a log-spaced sweep with "
                           "the best held-out R^2, then refitted on all rows) or a strength "
                           "relative to the mean feature variance, fitted on the fitting split")
  parser.add_argument("--holdout", type=float, default=0.1, help="held-out fraction for metrics")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chunk-rows", type=int, default=8192, help="exact only: rows per chunk")
  parser.add_argument("--epochs", type=int, default=70, help="sgd only")
  parser.add_argument("--reproduce-bias-defect", action="store_true",
                      help="sgd only: un-scale the bias by c1/c2 as the reference does (not 1/c2)")
  parser.add_argument("--metrics-out", type=Path, help="JSON metrics (default: OUT + .metrics.json)")


def _load_npy(path: Path, flag: str) -> np.ndarray:
  if not path.is_file():
    raise FileNotFoundError(f"{flag} {path}: file not found")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"{flag} {path}: not a plain .npy array ({e})") from e
  if array.ndim != 2:
    raise ValueError(f"{flag} {path}: expected a 2-D [rows, dim] array, got shape {array.shape}")
  return array


def _features_from_models(args: argparse.Namespace):
  """(DINO features, CLIP image features, what the aligner file records about the models, and a
  function of the fitted aligner giving the ensemble's calibration on the held-out rows)."""
  from agriclip_jax import features, zeroshot
  from input_pipeline.sources import open_source
  source = open_source(args.data)
  indices = np.arange(len(source))
  if args.reserve_eval > 0:
    keys = features.record_keys(source)
    indices = np.array([i for i in indices if not zeroshot.is_eval_item(keys[i], args.reserve_eval)],
                       np.int64)
    print(f"[align] reserved {len(source) - len(indices)} of {len(source)} items for evaluation")
  clip = features.clip_model_encoders(args.model, args.batch_size)
  dino = features.dino_model_encoder(args.dino, pooling=args.dino_pooling)
  cache = features.FeatureCache(args.cache) if args.cache else None
  data_print = features.data_fingerprint(args.data, source)
  encoded = features.encode_source(source, indices, [dino, clip.image], args.batch_size,
                                   cache=cache, data_fingerprint=data_print, desc="align features")
  provenance = {"dino_pooling": dino.pooling, "dino_model": str(args.dino),
                "dino_fingerprint": dino.model_id, "clip_model": str(args.model),
                "clip_fingerprint": clip.image.model_id,
                "fingerprint": "model_io.content_fingerprint: sha256 of model type, config, eval "
                               "view and weights"}
  dino_rows, clip_rows = encoded.features["dino"], encoded.features["clip_image"]

  def calibrate(aligner):
    from agriclip_jax import align
    held = align.holdout_mask(np.arange(len(dino_rows)), args.holdout, args.seed)
    if not held.any():
      return None
    return zeroshot.calibrate_on_source(source, encoded.indices[held], clip_rows[held],
                                        aligner.apply(np.asarray(dino_rows[held], np.float32)),
                                        clip.encode_text, seed=args.seed)

  return dino_rows, clip_rows, provenance, calibrate


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import align, fileio
  # Both outputs checked before any feature is computed: a read-only folder fails now.
  fileio.check_writable(args.out)
  metrics_path = fileio.check_writable(
      args.metrics_out or args.out.with_name(args.out.name + ".metrics.json"))

  have_arrays = args.dino_features is not None or args.clip_features is not None
  have_models = any(v is not None for v in (args.dino, args.model, args.data))
  if have_arrays == have_models:
    raise ValueError("give either --dino-features X.npy --clip-features Y.npy, "
                     "or --dino PATH --model DIR --data SOURCE")
  if have_arrays:
    if args.dino_features is None or args.clip_features is None:
      raise ValueError("--dino-features and --clip-features go together")
    x = _load_npy(args.dino_features, "--dino-features")
    y = _load_npy(args.clip_features, "--clip-features")
    align.check_paired(x, y, (f"--dino-features {args.dino_features}",
                              f"--clip-features {args.clip_features}"))
  else:
    if None in (args.dino, args.model, args.data):
      raise ValueError("--dino, --model and --data go together")
    x, y, provenance, calibrate = _features_from_models(args)

  start = time.perf_counter()
  if args.method == "exact":
    result = align.fit_exact(align.iterate_chunks(x, y, args.chunk_rows), args.ridge, args.holdout,
                             args.seed)
  else:
    if args.ridge not in (0.0, "auto"):
      print("[align] note: --ridge applies to the exact method only; ignored for sgd")
    result = align.fit_sgd(x, y, args.holdout, args.seed, epochs=args.epochs,
                           reproduce_bias_defect=args.reproduce_bias_defect)
  seconds = time.perf_counter() - start

  summary = {**result.summary(), "rows": int(x.shape[0]), "seconds": seconds,
             "holdout_fraction": args.holdout, "seed": args.seed}
  metadata = {"method": result.method, "metrics": result.metrics, "ridge": result.ridge}
  if not have_arrays:
    metadata.update(provenance)  # zero-shot checks its models and pooling against these
    # The ensemble's weight and temperatures, chosen on the held-out rows' captions (never on a
    # task that zero-shot scores later); zero-shot uses them unless --ensemble-weight is given.
    ensemble = calibrate(result.aligner)
    if ensemble is not None:
      metadata["ensemble"] = ensemble
      summary["ensemble"] = ensemble
      print(f"[align] ensemble calibrated on {ensemble['validation']['images']} held-out images: "
            f"CLIP weight {ensemble['weight']:.2f}, temperatures CLIP "
            f"{ensemble['clip_temperature']:.3g} / AgriCLIP {ensemble['agriclip_temperature']:.3g}")
    else:
      print("[align] no held-out rows with captions: the ensemble is not calibrated (zero-shot "
            "then uses weight 0.5)")
  align.save_aligner(result.aligner, args.out, metadata=metadata)
  fileio.atomic_write_json(metrics_path, summary, indent=2)
  print(f"[align] {result.method}: {x.shape[1]} -> {y.shape[1]} on {x.shape[0]} rows in {seconds:.2f}s"
        + (f", ridge {result.ridge:g}" if result.method == "exact" else ""))
  for split, values in result.metrics.items():
    print(f"[align]   {split:8s} rows {values['rows']:8d}  MSE {values['mse']:.6g}  R^2 {values['r2']:.4f}")
  print(f"[align] aligner -> {args.out}; metrics -> {metrics_path}")
  return 0
