"""`agriclip predict`: labels for your photos, no dataset needed.

  agriclip predict --model CLIP [--dino D --aligner A] --labels "rust,blight,healthy" leaf.jpg photos/
  agriclip predict --model CLIP --labels-file labels.txt --template "a photo of a corn leaf with {}." ...
  agriclip predict --model CLIP --task "Corn Leaf Diseases" --json photos/

Per image the top-k labels with their probabilities (a table; with --json one JSON object per line:
{"image": PATH, "top": [{"label": L, "probability": p}, ...]}). Scores are `agriclip zeroshot`'s for
the same model, labels and templates (the Python API's `Model.classify` computes both), so the top
label equals zeroshot's prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agriclip_jax import fileio, zeroshot


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
  parser.add_argument("--model", required=True, type=fileio.input_path,
                      help="a CLIP in any format `agriclip convert` reads (our model directory, an HF "
                           "directory, an open_clip / OpenAI file)")
  parser.add_argument("--dino", type=fileio.input_path,
                      help="DINO backbone (model directory or .pth), with --aligner")
  parser.add_argument("--aligner", type=fileio.input_path,
                      help="aligner file (.safetensors / .pth / .npz) or directory")
  parser.add_argument("--dino-pooling", default=None, help="as for `agriclip zeroshot`")
  labels = parser.add_mutually_exclusive_group(required=True)
  labels.add_argument("--labels", help="comma-separated labels, e.g. 'rust,blight,healthy'")
  labels.add_argument("--labels-file", type=Path, help="a UTF-8 file, one label per line")
  labels.add_argument("--task", help="a registered task: its class names and templates")
  parser.add_argument("--template", action="append", default=None,
                      help="prompt template with '{}' (repeatable; default 'a photo of {}.', or the "
                           "task's templates)")
  parser.add_argument("--method", choices=zeroshot.METHODS, default=None,
                      help="default: agriclip with --dino and --aligner, else clip")
  parser.add_argument("--ensemble-weight", type=float, default=None,
                      help="as for `agriclip zeroshot` (default: the aligner's calibration)")
  parser.add_argument("--top-k", type=int, default=3)
  parser.add_argument("--json", action="store_true", help="one JSON object per image and line")
  parser.add_argument("--batch-size", type=int, default=32)
  from agriclip_jax.commands.zeroshot import add_clip_load_arguments
  add_clip_load_arguments(parser)


def read_labels(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
  """(labels, templates or None for the default) from --labels / --labels-file / --task."""
  from agriclip_jax import tasks
  if args.task:
    task = tasks.resolve_task(args.task, args.template, None)
    if not task.class_names:
      raise ValueError(f"task {args.task!r} does not list its class names; give --labels")
    return list(tasks.prompt_names(task, list(task.class_names))), list(task.templates)
  if args.labels_file is not None:
    if not args.labels_file.is_file():
      raise FileNotFoundError(f"--labels-file {args.labels_file} not found")
    labels = [line.strip() for line in args.labels_file.read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label]
  else:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
  if len(labels) < 2:
    raise ValueError(f"give at least two labels to choose between, got {labels}")
  if len(set(labels)) != len(labels):
    raise ValueError(f"labels repeat: {labels}")
  return labels, args.template


def image_paths(specs: list[str]) -> list[Path]:
  """Files as given, folders searched recursively for images (`commands.embed.list_images`);
  a file or folder on a URL (gs://...) through its local copy (`fileio.local_input`)."""
  from agriclip_jax.commands.embed import list_images
  paths: list[Path] = []
  for spec in specs:
    if fileio.is_url(spec) and not fileio.resolve_path(spec).exists():
      raise FileNotFoundError(f"image or folder not found: {spec}")
    path = fileio.local_input(spec)
    if path.is_dir():
      paths.extend(list_images(path))
    elif path.is_file():
      paths.append(path)
    else:
      raise FileNotFoundError(f"image or folder not found: {path}")
  return paths


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import api
  from agriclip_jax.commands.zeroshot import clip_load_options
  if args.top_k < 1:
    raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
  labels, templates = read_labels(args)
  paths = image_paths(args.images)
  model = api.load(clip=args.model, dino=args.dino, aligner=args.aligner,
                   dino_pooling=args.dino_pooling, batch_size=args.batch_size,
                   **clip_load_options(args))
  predictions = model.classify(paths, labels, templates, args.method, args.ensemble_weight)
  from agriclip_jax.fileio import display_name
  for prediction in predictions:  # photos from a URL are named by it, not by their local copy
    prediction.image = display_name(prediction.image)
  k = min(args.top_k, len(labels))
  if args.json:
    for prediction in predictions:
      print(json.dumps({"image": prediction.image, "top": prediction.top(k)}))
    return 0
  width = max(len(p.image) for p in predictions)
  for prediction in predictions:
    shown = "  ".join(f"{label} {100 * p:5.1f}%" for label, p in
                      zip(prediction.labels[:k], prediction.probabilities[:k]))
    print(f"{prediction.image:<{width}}  {shown}")
  return 0
