"""`agriclip zeroshot`: zero-shot classification on downstream tasks, one or a suite.

  agriclip zeroshot --model CLIP [--dino DIR_OR_PTH --aligner PATH]
                    (--data DIR --task NAME | --data DIR --template T [--template T2 ...] | --suite FILE)
                    [--method clip|agriclip|ensemble|all] [--recipe agriclip-jax|reference]
                    [--eval-fraction F] [--limit N] [--cache DIR] [--predictions] --out results.json
  agriclip zeroshot --clip CLIP --dino dino_pretrain.pth --aligner A.pth --data DIR --task NAME ...

--model is a CLIP in any format we read (our model directory, an HF CLIPModel directory, an
open_clip / OpenAI file; a TorchScript archive with --allow-torchscript). Methods: clip (CLIP image
tower), agriclip (DINO -> aligner, the AgriCLIP path), ensemble (weighted probabilities of both),
all. `--clip X` is the released bundle's shorthand for `--model X --recipe reference --method
agriclip --predictions` (any of them may still be given): the same path, with the reference's
class-embedding rule (`zeroshot.RECIPES`). With --eval-fraction F only the items whose key hashes
into the evaluation split are scored (`agriclip align --reserve-eval F` leaves exactly those out);
without it the whole data set is evaluation data, as for the paper's downstream sets, disjoint
from ALive. With a pinned suite (`agriclip suite pin`) every task's data is checked against its
pin before any model loads, and the results record {"suite": {"path", "hash"}} (and each row its
task's "files_hash"): equal hashes, the same images. The results JSON feeds `agriclip report`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax import fileio, zeroshot


def methods_from_flag(flag: str) -> tuple[str, ...]:
  return zeroshot.METHODS if flag == "all" else (flag,)


def limit_indices(indices: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
  """At most `limit` of `indices`: a seeded random subset keeps every class represented."""
  if limit is not None and len(indices) > limit:
    indices = np.sort(np.random.default_rng(seed).choice(indices, limit, replace=False))
  return indices


def _retrieval_rows(entry, source, encoded, model, methods: Sequence[str]) -> list[dict[str, Any]]:
  """Image <-> caption recall@1/5/10 for the evaluated images, per method with an image embedding."""
  captions = [list(source[int(i)]["captions"]) for i in encoded.indices]
  keep = [row for row, texts in enumerate(captions) if texts]
  if not keep:
    raise ValueError(f"task {entry.task.name!r}: --retrieval needs captions, and no evaluated image has one")
  texts = [t for row in keep for t in captions[row]]
  owner = np.array([new for new, row in enumerate(keep) for _ in captions[row]], np.int64)
  text_emb = np.asarray(model.clip.encode_text(texts), np.float32)
  embeddings = {}
  if "clip_image" in encoded.features and any(m in ("clip", "ensemble") for m in methods):
    embeddings["clip"] = encoded.features["clip_image"][keep]
  if "dino" in encoded.features and model.aligner is not None:
    embeddings["agriclip"] = model.aligner.apply(encoded.features["dino"][keep])
  return [{"task": entry.task.name, "method": method, "num_images": len(keep), "num_texts": len(texts),
           "images_without_captions": len(captions) - len(keep),
           **zeroshot.retrieval_recall(image_emb, text_emb, owner)}
          for method, image_emb in embeddings.items()]


def _retrieval_only(entry, source, indices, model, methods, batch_size, cache, spec):
  from agriclip_jax import features
  need_clip, need_dino = zeroshot.methods_need(methods)
  encoders = ([model.clip.image] if need_clip else []) + ([model.dino] if need_dino else [])
  encoded = features.encode_source(source, indices, encoders, batch_size, cache=cache,
                                   data_fingerprint=features.data_fingerprint(spec, source),
                                   desc=entry.task.name)
  return _retrieval_rows(entry, source, encoded, model, methods)


def _has_labels(source, indices) -> bool:
  """Whether any of the records carries a class label (read from the listing where the source
  has one, so that no image is read twice)."""
  if callable(getattr(source, "entry", None)):
    return any(int(source.entry(int(i))["label"]) >= 0 for i in indices)
  return True


def evaluate_entry(entry, model, methods: Sequence[str], ensemble_weight: float | None = None,
                   batch_size: int = 128, cache=None, limit: int | None = None,
                   eval_fraction: float | None = None, retrieval: bool = False,
                   recipe: str = "agriclip-jax", predictions: bool = False) -> dict[str, list]:
  """{"results": rows (one per method), "differences": paired differences from CLIP,
  "retrieval": rows, "predictions": per image (with `predictions`)} of one suite entry, through
  `zeroshot.score_task` (`model`: an `api.Model`)."""
  from agriclip_jax import features, tasks
  records = tasks.entry_records(entry, eval_fraction)  # the split, then the class subset
  spec, source = records.spec, records.source
  fraction = entry.eval_fraction if entry.eval_fraction is not None else eval_fraction
  indices = limit_indices(records.indices, limit)
  out: dict[str, list] = {"results": [], "differences": [], "retrieval": [], "predictions": []}
  if entry.task.kind == "captioned" or (retrieval and not _has_labels(source, indices)):
    # captions without class labels: retrieval only
    out["retrieval"] = _retrieval_only(entry, source, indices, model, methods, batch_size, cache,
                                       spec)
    return out
  class_names = records.class_names
  if not class_names:
    raise ValueError(f"task {entry.task.name!r}: no class names (neither the registry nor the data "
                     f"has them; a suite entry may give 'class_names')")
  data_print = features.data_fingerprint(spec, source)
  if entry.class_names is not None:  # the cache holds labels: those of this subset
    data_print = features.fingerprint(data_print, class_names)
  clean = zeroshot.get_recipe(recipe).clean_names
  scored = zeroshot.score_task(
      entry.task.name, source, indices, class_names, entry.task.templates, model, methods,
      recipe=recipe, prompt_names=tasks.prompt_names(entry.task, class_names) if clean else None,
      ensemble_weight=ensemble_weight, batch_size=batch_size, cache=cache,
      data_fingerprint=data_print)
  names = features.record_names(source, scored.encoded.indices)
  skipped = [{"image": name, "reason": reason} for name, reason in
             zip(features.record_names(source, [i for i, _ in scored.encoded.skipped_records]),
                 [reason for _, reason in scored.encoded.skipped_records])]
  common: dict[str, Any] = {"data": spec, "eval_fraction": fraction,
                            "requested_images": int(len(indices)), "skipped_images": skipped}
  if entry.class_names is not None:
    common["excluded_images"] = records.excluded  # per class left out by the subset
  if entry.pin is not None:
    common["files_hash"] = entry.pin["files_hash"]
  out["results"], out["differences"] = zeroshot.task_rows(scored, **common)
  if retrieval:
    out["retrieval"] = _retrieval_rows(entry, source, scored.encoded, model, methods)
  if predictions:
    out["predictions"] = zeroshot.task_predictions(scored, names)
  return out


def run_suite(entries, model, methods: Sequence[str], **options) -> dict[str, Any]:
  """The results document of a list of suite entries: {"results", "mean", and where there are
  any "differences", "retrieval", "predictions"}."""
  parts: dict[str, list] = {"results": [], "differences": [], "retrieval": [], "predictions": []}
  for entry in entries:
    task = evaluate_entry(entry, model, methods, **options)
    for key, values in task.items():
      parts[key].extend(values)
    rows = task["results"]
    if rows:
      print(f"[zeroshot] {entry.task.name}: " + ", ".join(
          f"{r['method']} {100 * r['top1']:.1f}% [{100 * r['top1_interval']['low']:.1f}, "
          f"{100 * r['top1_interval']['high']:.1f}]" for r in rows)
          + f" on {rows[0]['num_images']} images (95 % bootstrap intervals)"
          + (f"; {sum(rows[0]['skipped'].values())} unreadable, listed in the results"
             if rows[0]["skipped"] else ""))
    for r in task["retrieval"]:
      print(f"[zeroshot] {entry.task.name} retrieval ({r['method']}): image->text R@1/5/10 "
            f"{r['image_to_text_R@1']:.3f}/{r['image_to_text_R@5']:.3f}/{r['image_to_text_R@10']:.3f}, "
            f"text->image {r['text_to_image_R@1']:.3f}/{r['text_to_image_R@5']:.3f}/"
            f"{r['text_to_image_R@10']:.3f}")
  document: dict[str, Any] = {"results": parts["results"],
                              "mean": zeroshot.suite_means(parts["results"]) if parts["results"] else {}}
  document.update({key: values for key, values in parts.items() if key != "results" and values})
  return document


def load_model(args: argparse.Namespace, methods: Sequence[str]):
  """The `api.Model` the flags name (`api.load`, the one loader, with its provenance and width
  checks)."""
  from agriclip_jax import api
  clip = args.model if args.model is not None else args.clip
  if clip is None:
    raise ValueError("--model (a CLIP: model directory, HF directory or open_clip / OpenAI file) "
                     "is required: its text tower embeds the class prompts")
  if zeroshot.methods_need(methods)[1] and (args.dino is None or args.aligner is None):
    raise ValueError(f"method(s) {list(methods)} need --dino and --aligner")
  use_dino = zeroshot.methods_need(methods)[1]
  return api.load(clip=clip, dino=args.dino if use_dino else None,
                  aligner=args.aligner if use_dino else None, dino_pooling=args.dino_pooling,
                  batch_size=args.batch_size, **clip_load_options(args))


def add_clip_load_arguments(parser: argparse.ArgumentParser) -> None:
  """How to read a CLIP file (`features.load_clip_model`); shared by zeroshot and predict."""
  parser.add_argument("--clip-format", choices=("flax", "hf", "openclip"),
                      help="format of the CLIP when it cannot be told from the path")
  parser.add_argument("--model-name", help="open_clip architecture name of an open_clip / OpenAI "
                                           "file (default: read from its tensor shapes)")
  parser.add_argument("--allow-torchscript", action="store_true",
                      help="allow a TorchScript CLIP archive (OpenAI's JIT .pt); loading one "
                           "unpickles code, so only for files you trust")
  parser.add_argument("--tokenizer", type=fileio.input_path,
                      help="tokenizer of an open_clip / OpenAI file (bpe .txt.gz or HF dir)")


def clip_load_options(args: argparse.Namespace) -> dict:
  return {"clip_format": args.clip_format, "tokenizer": args.tokenizer,
          "model_name": args.model_name, "allow_torchscript": args.allow_torchscript}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", type=fileio.input_path,
                      help="the CLIP: our model directory, an HF CLIPModel directory or an "
                           "open_clip / OpenAI file (its architecture read from the tensor shapes)")
  parser.add_argument("--dino", type=fileio.input_path, help="DINO backbone: model directory or .pth")
  parser.add_argument("--aligner", type=fileio.input_path, help="aligner: .pth | .safetensors | .npz | model dir")
  parser.add_argument("--dino-pooling", default=None,
                      help="DINO ViT features the aligner was fitted on: 'cls', 'cls+avgpool' or "
                           "'lastN'. A .safetensors aligner from `agriclip align` records its own "
                           "(a flag that disagrees is an error); for a .pth / .npz aligner the flag "
                           "decides (default: the one the DINO model records)")
  parser.add_argument("--data", help="ImageFolder (or any source with labels); tfds:NAME[:SPLIT]")
  parser.add_argument("--task", help="a registered task (its templates and class names)")
  parser.add_argument("--template", action="append",
                      help="prompt template with '{}'; repeat for an ensemble of templates")
  parser.add_argument("--metadata", type=fileio.input_path,
                      help="caption metadata JSON (as for `agriclip captions`, e.g. "
                           "configs/corn_metadata.json): its readable class names go into the "
                           "templates instead of the cleaned folder names")
  parser.add_argument("--suite", type=Path,
                      help="JSON suite file: several tasks, reports the mean; a pinned suite "
                           "(agriclip suite pin) has its data checked against the pin first")
  parser.add_argument("--method", choices=(*zeroshot.METHODS, "all"), default=None,
                      help="default: all (agriclip with --clip)")
  parser.add_argument("--recipe", choices=sorted(zeroshot.RECIPES), default=None,
                      help="class-embedding rule: agriclip-jax (cleaned class names, unit prompt "
                           "embeddings averaged; default) or reference (the released AgriCLIP "
                           "evaluation: folder names as they are, raw average; default with --clip)")
  parser.add_argument("--predictions", action="store_true", default=None,
                      help="also write every image's prediction per method (default with --clip)")
  parser.add_argument("--ensemble-weight", type=float, default=None,
                      help="weight of the CLIP probabilities in the ensemble (default: the weight and "
                           "temperatures `agriclip align` chose on its own data, recorded in the "
                           "aligner file; else 0.5)")
  parser.add_argument("--eval-fraction", type=float, default=None,
                      help="score only the hashed evaluation split of this size (default: all items)")
  parser.add_argument("--limit", type=int, default=None, help="at most this many images per task")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--cache", type=Path, help="feature cache folder")
  parser.add_argument("--retrieval", action="store_true",
                      help="also image<->caption recall@1/5/10 from the records' captions; data "
                           "with captions but no labels (a manifest) is evaluated for retrieval only")
  parser.add_argument("--clip", type=fileio.input_path,
                      help="the released-bundle shorthand: --model CLIP --recipe reference --method "
                           "agriclip --predictions, with --dino X.pth --aligner A.pth --data DIR "
                           "--task NAME|--template T")
  add_clip_load_arguments(parser)
  parser.add_argument("--out", type=fileio.resolve_path, required=True, help="results JSON")
  from agriclip_jax.commands import distributed
  distributed.add_arguments(parser)


def suite_from_args(args: argparse.Namespace):
  """The `tasks.Suite` of --suite (a suite file or a pinned suite), or None."""
  from agriclip_jax import tasks
  if args.suite is None:
    return None
  if args.task or args.template or args.data:
    raise ValueError("--suite lists its own tasks; drop --task/--template/--data")
  return tasks.read_suite(args.suite)


def entries_from_args(args: argparse.Namespace):
  from agriclip_jax import tasks
  if args.suite is not None:
    return suite_from_args(args).entries
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
  if args.metadata is not None:
    task = tasks.with_metadata_names(task, args.data, args.metadata)
  return [tasks.SuiteEntry(task, args.data, task.split, None)]


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import features
  from agriclip_jax.commands import distributed
  distributed.initialize(args)
  fileio.check_writable(args.out)  # a read-only or wrong --out fails now, not after the compute
  if args.clip is not None and args.model is not None:
    raise ValueError("--clip is the released-bundle shorthand for --model; give one of them")
  bundle = args.clip is not None
  if bundle:
    missing = [flag for flag, value in (("--dino", args.dino), ("--aligner", args.aligner),
                                        ("--data or --suite", args.data or args.suite))
               if not value]
    if missing:
      raise ValueError(f"--clip runs the released-bundle recipe, which also needs {', '.join(missing)}")
  method = args.method or ("agriclip" if bundle else "all")
  recipe = args.recipe or ("reference" if bundle else "agriclip-jax")
  predictions = args.predictions if args.predictions is not None else bundle
  methods = methods_from_flag(method)
  if args.metadata is not None and (args.suite is not None
                                    or not zeroshot.get_recipe(recipe).clean_names):
    raise ValueError("--metadata names the classes of one --data task under the agriclip-jax "
                     "recipe (a suite file gives its own class names; the reference recipe keeps "
                     "the folder names)")
  suite = suite_from_args(args)
  entries = suite.entries if suite is not None else entries_from_args(args)
  if suite is not None and suite.hash is not None:
    from agriclip_jax import suite_pin
    suite_pin.check_suite(suite)  # before any model loads: a changed file is an error now
    print(f"[zeroshot] data equal to the pinned suite {args.suite} (hash {suite.hash[:16]})")
  model = load_model(args, methods)
  cache = features.FeatureCache(args.cache) if args.cache else None
  document = run_suite(entries, model, methods, ensemble_weight=args.ensemble_weight,
                       batch_size=args.batch_size, cache=cache, limit=args.limit,
                       eval_fraction=args.eval_fraction, retrieval=args.retrieval, recipe=recipe,
                       predictions=predictions)
  document["config"] = {"model": str(args.model or args.clip), "dino": str(args.dino),
                        "aligner": str(args.aligner), "methods": list(methods), "recipe": recipe,
                        "ensemble_weight": args.ensemble_weight,
                        "eval_fraction": args.eval_fraction, "limit": args.limit}
  if suite is not None:  # equal hashes: measured on the same images (None: the suite is not pinned)
    document["suite"] = {"path": str(args.suite), "hash": suite.hash}
  if not distributed.writes_outputs():
    return 0
  fileio.atomic_write_json(args.out, document, indent=2)
  for method_name, mean in document["mean"].items():
    print(f"[zeroshot] mean over {mean['tasks']} task(s), {method_name}: top-1 "
          f"{100 * mean['top1']:.2f}%, balanced {100 * mean['balanced_accuracy']:.2f}%")
  print(f"[zeroshot] results -> {args.out}")
  return 0
