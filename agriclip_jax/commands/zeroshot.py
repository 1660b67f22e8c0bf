"""`agriclip zeroshot`: zero-shot classification on downstream tasks, one or a suite.

  agriclip zeroshot --model CLIP_DIR [--dino DIR_OR_PTH --aligner PATH]
                    (--data DIR --task NAME | --data DIR --template T [--template T2 ...] | --suite FILE)
                    [--method clip|agriclip|ensemble|all] [--eval-fraction F] --out results.json

Methods: clip (CLIP image tower), agriclip (DINO -> aligner, the AgriCLIP path), ensemble (weighted
probabilities of both), all. With --eval-fraction F only the items whose key hashes into the
evaluation split are scored (`agriclip align --reserve-eval F` leaves exactly those out); without it
the whole data set is evaluation data, as for the paper's downstream sets, disjoint from ALive.
The results JSON feeds `agriclip report`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax import fileio, zeroshot


@dataclasses.dataclass
class Models:
  """What the evaluation needs, as callables (model loading stays at the edge)."""
  encode_text: Callable[[list[str]], np.ndarray]
  clip_image: Any = None   # features.ImageEncoder
  dino: Any = None         # features.ImageEncoder
  aligner: Any = None      # align.LinearAligner
  logit_scale: float = zeroshot.DEFAULT_LOGIT_SCALE


def methods_from_flag(flag: str) -> tuple[str, ...]:
  return zeroshot.METHODS if flag == "all" else (flag,)


def _open_entry_source(entry):
  from input_pipeline.sources import open_source
  task = entry.task
  if entry.data is not None:
    return entry.data, open_source(entry.data)
  if task.kind != "tfds":
    raise ValueError(f"task {task.name!r} needs --data (its ImageFolder)")
  spec = f"tfds:{task.tfds_name}:{entry.split or 'train'}"
  return spec, open_source(spec, image_feature="image")


def _class_names(entry, source) -> list[str]:
  task = entry.task
  folder_names = getattr(source, "class_names", None)
  if folder_names is not None and task.class_names is not None and \
      list(folder_names) != list(task.class_names):
    raise ValueError(f"task {task.name!r}: the data's classes {list(folder_names)} differ from the "
                     f"registry's {list(task.class_names)}")
  names = list(folder_names if folder_names is not None else task.class_names or [])
  if not names:
    raise ValueError(f"task {task.name!r}: no class names (neither the registry nor the data has them)")
  return names


def evaluation_indices(source, eval_fraction: float | None, limit: int | None, seed: int = 0) -> np.ndarray:
  from agriclip_jax import features
  indices = np.arange(len(source))
  if eval_fraction is not None:
    keys = features.record_keys(source)
    indices = np.array([i for i in indices if zeroshot.is_eval_item(keys[i], eval_fraction)], np.int64)
  if limit is not None and len(indices) > limit:  # a random subset keeps every class represented
    indices = np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
  if len(indices) == 0:
    raise ValueError("no items to evaluate (empty data, or the evaluation split is empty)")
  return indices


def _retrieval_rows(entry, source, encoded, models: Models, methods: Sequence[str]) -> list[dict[str, Any]]:
  """Image <-> caption recall@1/5/10 for the evaluated images, per method with an image embedding."""
  captions = [list(source[int(i)]["captions"]) for i in encoded.indices]
  keep = [row for row, texts in enumerate(captions) if texts]
  if not keep:
    raise ValueError(f"task {entry.task.name!r}: --retrieval needs captions, and no evaluated image has one")
  texts = [t for row in keep for t in captions[row]]
  owner = np.array([new for new, row in enumerate(keep) for _ in captions[row]], np.int64)
  text_emb = np.asarray(models.encode_text(texts), np.float32)
  embeddings = {}
  if "clip_image" in encoded.features and any(m in ("clip", "ensemble") for m in methods):
    embeddings["clip"] = encoded.features["clip_image"][keep]
  if "dino" in encoded.features and models.aligner is not None:
    embeddings["agriclip"] = models.aligner.apply(encoded.features["dino"][keep])
  return [{"task": entry.task.name, "method": method, "num_images": len(keep), "num_texts": len(texts),
           "images_without_captions": len(captions) - len(keep),
           **zeroshot.retrieval_recall(image_emb, text_emb, owner)}
          for method, image_emb in embeddings.items()]


def evaluate_entry(entry, models: Models, methods: Sequence[str], ensemble_weight: float = 0.5,
                   batch_size: int = 128, cache=None, limit: int | None = None,
                   eval_fraction: float | None = None,
                   retrieval: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(classification rows, one per method; paired differences of each method from CLIP;
  retrieval rows) for one suite entry."""
  from agriclip_jax import features, tasks
  spec, source = _open_entry_source(entry)
  fraction = entry.eval_fraction if entry.eval_fraction is not None else eval_fraction
  indices = evaluation_indices(source, fraction, limit)
  need_clip = any(m in ("clip", "ensemble") for m in methods)
  need_dino = any(m in ("agriclip", "ensemble") for m in methods)
  encoders = [e for e, needed in ((models.clip_image, need_clip), (models.dino, need_dino)) if needed]
  if None in encoders:
    raise ValueError(f"methods {list(methods)} need " + " and ".join(
        n for n, e, needed in (("a CLIP model (--model)", models.clip_image, need_clip),
                               ("a DINO model (--dino)", models.dino, need_dino)) if needed and e is None))
  encoded = features.encode_source(source, indices, encoders, batch_size, cache=cache,
                                   data_fingerprint=features.data_fingerprint(spec, source),
                                   desc=entry.task.name)
  if len(encoded.indices) == 0:
    raise ValueError(f"task {entry.task.name!r}: none of the {len(indices)} images could be decoded "
                     f"({encoded.skipped})")
  retrieval_rows = _retrieval_rows(entry, source, encoded, models, methods) if retrieval else []
  if entry.task.kind == "captioned" or (retrieval and encoded.labels.max() < 0):
    return [], [], retrieval_rows  # captions without class labels: retrieval only
  class_names = _class_names(entry, source)
  if encoded.labels.min() < 0 or encoded.labels.max() >= len(class_names):
    raise ValueError(f"task {entry.task.name!r}: labels {encoded.labels.min()}..{encoded.labels.max()} "
                     f"do not index its {len(class_names)} classes (-1 = a record without a label)")
  prompts_for = tasks.prompt_names(entry.task, class_names)
  class_emb = zeroshot.class_embeddings(prompts_for, entry.task.templates, models.encode_text)
  results, differences = zeroshot.evaluate(class_emb, encoded.labels, class_names,
                              encoded.features.get("clip_image"), encoded.features.get("dino"),
                              models.aligner, methods, ensemble_weight, models.logit_scale)
  common = {"task": entry.task.name, "data": spec, "templates": list(entry.task.templates),
            "prompt_names": prompts_for, "eval_fraction": fraction, "skipped": encoded.skipped,
            "requested_images": int(len(indices))}
  rows = [{**common, "method": method, **metrics} for method, metrics in results.items()]
  return rows, [{"task": entry.task.name, **d} for d in differences], retrieval_rows


def run_suite(entries, models: Models, methods: Sequence[str], **options) -> dict[str, Any]:
  rows: list[dict[str, Any]] = []
  differences: list[dict[str, Any]] = []
  retrieval_rows: list[dict[str, Any]] = []
  for entry in entries:
    task_rows, task_differences, task_retrieval = evaluate_entry(entry, models, methods, **options)
    rows.extend(task_rows)
    differences.extend(task_differences)
    retrieval_rows.extend(task_retrieval)
    if task_rows:
      print(f"[zeroshot] {entry.task.name}: " + ", ".join(
          f"{r['method']} {100 * r['top1']:.1f}% [{100 * r['top1_interval']['low']:.1f}, "
          f"{100 * r['top1_interval']['high']:.1f}]" for r in task_rows)
          + f" on {task_rows[0]['num_images']} images (95 % bootstrap intervals)")
    for r in task_retrieval:
      print(f"[zeroshot] {entry.task.name} retrieval ({r['method']}): image->text R@1/5/10 "
            f"{r['image_to_text_R@1']:.3f}/{r['image_to_text_R@5']:.3f}/{r['image_to_text_R@10']:.3f}, "
            f"text->image {r['text_to_image_R@1']:.3f}/{r['text_to_image_R@5']:.3f}/"
            f"{r['text_to_image_R@10']:.3f}")
  document: dict[str, Any] = {"results": rows, "mean": zeroshot.suite_means(rows) if rows else {}}
  if differences:
    document["differences"] = differences
  if retrieval_rows:
    document["retrieval"] = retrieval_rows
  return document


def load_models(args: argparse.Namespace, methods: Sequence[str]) -> Models:
  from agriclip_jax import features
  if args.model is None:
    raise ValueError("--model (a CLIP model directory) is required: its text "
                     "tower embeds the class prompts")
  clip = features.clip_model_encoders(args.model, args.batch_size)
  models = Models(clip.encode_text, clip_image=clip.image, logit_scale=clip.logit_scale)
  if any(m in ("agriclip", "ensemble") for m in methods):
    if args.dino is None or args.aligner is None:
      raise ValueError(f"method(s) {list(methods)} need --dino and --aligner")
    from agriclip_jax import align
    models.aligner = features.load_aligner_any(args.aligner)
    recorded = align.read_aligner_metadata(args.aligner) if Path(args.aligner).is_file() else {}
    pooling = align.resolve_pooling(recorded, args.dino_pooling, args.aligner)
    models.dino = features.dino_model_encoder(args.dino, pooling=pooling)
    align.check_provenance(recorded, args.aligner, {"dino": (str(args.dino), models.dino.model_id),
                                                    "clip": (str(args.model), clip.image.model_id)})
  return models


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", type=Path, help="CLIP model directory (text tower + image tower)")
  parser.add_argument("--dino", type=Path, help="DINO backbone: model directory or .pth")
  parser.add_argument("--aligner", type=Path, help="aligner: .pth | .safetensors | .npz | model dir")
  parser.add_argument("--dino-pooling", default=None,
                      help="DINO ViT features the aligner was fitted on: 'cls', 'cls+avgpool' or "
                           "'lastN'. A .safetensors aligner from `agriclip align` records its own "
                           "(a flag that disagrees is an error); for a .pth / .npz aligner the flag "
                           "decides (default: the one the DINO model records)")
  parser.add_argument("--data", help="ImageFolder (or any source with labels); tfds:NAME[:SPLIT]")
  parser.add_argument("--task", help="a registered task (its templates and class names)")
  parser.add_argument("--template", action="append",
                      help="prompt template with '{}'; repeat for an ensemble of templates")
  parser.add_argument("--suite", type=Path, help="JSON suite file: several tasks, reports the mean")
  parser.add_argument("--method", choices=(*zeroshot.METHODS, "all"), default="all")
  parser.add_argument("--ensemble-weight", type=float, default=0.5, help="weight of the CLIP probabilities")
  parser.add_argument("--eval-fraction", type=float, default=None,
                      help="score only the hashed evaluation split of this size (default: all items)")
  parser.add_argument("--limit", type=int, default=None, help="at most this many images per task")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--cache", type=Path, help="feature cache folder")
  parser.add_argument("--retrieval", action="store_true",
                      help="also image<->caption recall@1/5/10 from the records' captions; data "
                           "with captions but no labels (a manifest) is evaluated for retrieval only")
  parser.add_argument("--clip", type=Path,
                      help="the released-bundle path: a CLIP (HF dir, open_clip/OpenAI file or flax "
                           "dir) for the reference recipe, with --dino X.pth --aligner A.pth --data DIR "
                           "--task NAME|--template T (ImageNet normalisation, bilinear resize 224 + "
                           "centre crop, DINO -> aligner -> cosine with the class prompts)")
  parser.add_argument("--clip-format", help="format of --clip when it cannot be told from the path")
  parser.add_argument("--tokenizer", type=Path, help="tokenizer for --clip (bpe .txt.gz or HF dir)")
  parser.add_argument("--out", type=Path, required=True, help="results JSON")


def entries_from_args(args: argparse.Namespace):
  from agriclip_jax import tasks
  if args.suite is not None:
    if args.task or args.template or args.data:
      raise ValueError("--suite lists its own tasks; drop --task/--template/--data")
    return tasks.load_suite(args.suite)
  if args.task is None and not args.template and args.retrieval and args.data:
    return [tasks.SuiteEntry(tasks.Task(Path(str(args.data)).stem, (tasks.FALLBACK_TEMPLATE,),
                                        "captioned"), args.data)]
  if args.task is None and not args.template:
    raise ValueError("give --task NAME, or --data DIR with --template, or --suite "
                     "FILE (or --data MANIFEST --retrieval for captioned data without labels)")
  task = tasks.resolve_task(args.task, args.template, args.data)
  if task.kind != "tfds" and args.data is None:
    raise ValueError(f"task {task.name!r} needs --data (its ImageFolder)")
  if task.kind == "imagefolder" or (task.kind == "reference" and args.data):
    tasks.imagefolder_classes(args.data)  # clear errors for empty class folders before any model loads
  return [tasks.SuiteEntry(task, args.data, task.split, None)]


def run_released_bundle(args: argparse.Namespace) -> int:
  """The reference AgriCLIP zero-shot recipe on the released weights, entirely in JAX."""
  from agriclip_jax import reference_bundle
  missing = [flag for flag, value in (("--dino", args.dino), ("--aligner", args.aligner),
                                      ("--data", args.data), ("--task or --template",
                                                              args.task or args.template)) if not value]
  if missing:
    raise ValueError(f"--clip runs the reference recipe, which also needs {', '.join(missing)}")
  result = reference_bundle.run_reference_zeroshot(
      args.dino, args.aligner, args.clip, args.data, args.task or args.template,
      clip_format=args.clip_format, tokenizer=args.tokenizer, batch_size=min(args.batch_size, 64),
      on_bad_image="skip")
  document = result.summary()
  document["predictions"] = [{"file": str(path), "label": result.class_names[int(label)],
                              "prediction": result.class_names[int(prediction)]}
                             for path, label, prediction in zip(result.files, result.labels,
                                                                result.predictions)]
  document["config"] = {"dino": str(args.dino), "aligner": str(args.aligner), "clip": str(args.clip),
                        "data": str(args.data), "task": args.task, "template": args.template,
                        "recipe": "reference"}
  fileio.atomic_write_json(args.out, document, indent=2)
  print(f"[zeroshot] reference recipe: top-1 {100 * result.accuracy:.2f}% on {len(result.labels)} "
        f"images ({len(result.skipped)} unreadable, listed in {args.out})")
  return 0


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import features
  fileio.check_writable(args.out)  # a read-only or wrong --out fails now, not after the compute
  if args.clip is not None:
    if args.model is not None:
      raise ValueError("give either --model (our pipeline) or --clip (the reference recipe), not both")
    return run_released_bundle(args)
  methods = methods_from_flag(args.method)
  entries = entries_from_args(args)
  models = load_models(args, methods)
  cache = features.FeatureCache(args.cache) if args.cache else None
  document = run_suite(entries, models, methods, ensemble_weight=args.ensemble_weight,
                       batch_size=args.batch_size, cache=cache, limit=args.limit,
                       eval_fraction=args.eval_fraction, retrieval=args.retrieval)
  document["config"] = {"model": str(args.model), "dino": str(args.dino), "aligner": str(args.aligner),
                        "methods": list(methods), "ensemble_weight": args.ensemble_weight,
                        "eval_fraction": args.eval_fraction, "limit": args.limit}
  fileio.atomic_write_json(args.out, document, indent=2)
  for method, mean in document["mean"].items():
    print(f"[zeroshot] mean over {mean['tasks']} task(s), {method}: top-1 {100 * mean['top1']:.2f}%, "
          f"balanced {100 * mean['balanced_accuracy']:.2f}%")
  print(f"[zeroshot] results -> {args.out}")
  return 0
