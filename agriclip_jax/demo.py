"""The whole AgriCLIP pipeline, offline, as one function per stage (`agriclip demo` runs them).

    data      ALive-synth (`testing/synthetic.py`): pretraining set + disjoint downstream tasks,
              or your own ImageFolder / manifest (`--data`) and zero-shot folders (`--eval`)
    captions  ALive-style captions through `prompts.py` (+ the synthetic writer's own captions),
              written as a JSONL manifest the input pipeline reads
    tokenizer byte-level BPE trained on those captions (no OpenAI vocabulary needed)
    train     joint CLIP + DINO through `agriclip train`'s loop (train/loop.train) in the workdir:
              one jitted step updates both models from the same batch; checkpoints, resume,
              metrics.jsonl, TensorBoard and the export to W/models/ are the loop's
    features  CLIP image embeddings, DINO (teacher) features, CLIP text embeddings of the prompts
    align     exact least-squares aligner DINO -> CLIP on the training images' features
    zeroshot  every task with CLIP only, aligned DINO (AgriCLIP) and their ensemble
    report    W/report.md + PNG plots (`report.py`), W/results.json
    export    PyTorch: HF CLIPModel directory, DINO ViT and aligner state dicts (safetensors;
              the reference .pth layouts too when torch is installed)

Every stage prints its progress and wall time; the times also go to W/timings.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.py"
METHODS = ("clip", "agriclip", "ensemble")


def log(message: str) -> None:
  print(f"[demo] {message}", flush=True)


# ================================================================================================
# Config and stage timing
# ================================================================================================

def load_config(spec: str | os.PathLike, default_arg: str = "default"):
  """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns."""
  from agriclip_jax.train.config import load_config_file
  return load_config_file(str(spec), default_arg, lock=False)


class StageTimer:
  """Prints the start and wall time of each stage and keeps the times in order."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def stage(self, name: str, what: str) -> Iterator[None]:
    log(f"== {name}: {what}")
    start = time.perf_counter()
    yield
    self.seconds[name] = time.perf_counter() - start
    log(f"== {name} done in {self.seconds[name]:.1f} s")

  @property
  def total(self) -> float:
    return time.perf_counter() - self._start


# ================================================================================================
# Data and captions
# ================================================================================================

@dataclasses.dataclass
class EvalTask:
  """One zero-shot task: a labelled random-access source and its readable class names."""
  name: str
  kind: str
  source: Any  # records with "label" in [0, num_classes)
  class_names: tuple[str, ...]  # readable names, for the report
  prompt_names: tuple[str, ...]  # what goes into the templates
  templates: tuple[str, ...]
  indices: np.ndarray | None = None  # the records to evaluate (None: all)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass
class DemoData:
  train_source: Any  # records with "captions": what the joint training and the aligner see
  train_spec: str  # the same records as a data source path (the training config's data.source)
  captions: list[str]  # every training caption (the tokenizer's corpus)
  tasks: list[EvalTask]
  description: str


def _write_jsonl(path: Path, lines: Sequence[dict]) -> Path:
  from agriclip_jax.fileio import atomic_write_jsonl
  return atomic_write_jsonl(path, lines)


def synthetic_data(workdir: Path, config) -> DemoData:
  """Writes ALive-synth and its captioned manifest; the tasks come from tasks.json."""
  from agriclip_jax import prompts
  from agriclip_jax.testing import synthetic
  from input_pipeline.sources import ImageFolderSource, JsonlSource
  s = config.synthetic
  pretrain_dir = workdir / "data" / "pretrain"
  tasks_dir = workdir / "data" / "tasks"
  for path in (pretrain_dir, tasks_dir):
    if path.exists():  # a rerun in the same workdir regenerates the data from the seed
      shutil.rmtree(path)
  start = time.perf_counter()
  synthetic.write_pretraining_set(pretrain_dir, s.num_images, s.image_size, config.seed)
  specs = synthetic.write_downstream_tasks(tasks_dir, s.image_size, config.seed, s.images_per_class)
  log(f"ALive-synth: {s.num_images} pretraining images and {len(specs)} downstream tasks at "
      f"{s.image_size} px in {time.perf_counter() - start:.1f} s")

  metadata = json.loads((pretrain_dir / "metadata.json").read_text())
  by_dataset = {entry["name"]: synthetic.caption_metadata(entry) for entry in metadata["datasets"]}
  class_index: dict[tuple[str, str], int] = {}
  lines, corpus = [], []
  with open(pretrain_dir / "manifest.jsonl", encoding="utf-8") as handle:
    for line in handle:
      item = json.loads(line)
      meta = by_dataset[item["dataset"]]
      cls = meta.class_by_name(item["class"])
      key = item["image"]
      bank = prompts.template_variants(meta, cls, config.captions.variants, config.seed, key)
      # The writer's captions name the pair as the downstream templates do; the bank adds the
      # ALive paraphrases (openings, phrasings, shuffled attributes).
      captions = list(dict.fromkeys(item["captions"] + bank))
      label = class_index.setdefault((item["dataset"], item["class"]), len(class_index))
      lines.append({"image": key, "captions": captions, "label": label, "key": key})
      corpus.extend(captions)
  manifest = _write_jsonl(pretrain_dir / "captions.jsonl", lines)
  log(f"captions: {len(corpus)} for {len(lines)} images ({len(corpus) / len(lines):.1f} per "
      f"image) -> {manifest}")
  tasks = [EvalTask(spec.name, spec.kind, ImageFolderSource(spec.path), spec.class_names,
                    spec.class_names, (spec.template,)) for spec in specs]
  for task, spec in zip(tasks, specs):
    if tuple(task.source.class_names) != spec.class_folders:
      raise ValueError(f"task {spec.name}: folders {task.source.class_names} differ from "
                       f"tasks.json {spec.class_folders}")
  return DemoData(JsonlSource(manifest), str(manifest), corpus, tasks, "ALive-synth (generated)")


def class_prompts(folders: Sequence[str], config, metadata
                  ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """(readable names, prompt names, templates) of an ImageFolder's classes.

  With metadata the prompt is the class's ALive base caption without its attribute clause
  ("a photo of a corn leaf with northern leaf blight", "a photo of a healthy corn leaf"), the
  phrase the training captions start with; without it, the config's template over the folder name.
  """
  from agriclip_jax import prompts, zeroshot
  if metadata is None:
    names = tuple(zeroshot.clean_class_name(f) for f in folders)
    return names, names, (config.captions.template,)
  known = {c.name: c for c in metadata.classes}
  missing = [f for f in folders if f not in known]
  if missing:
    raise ValueError(f"class folder(s) {missing} have no entry in metadata {metadata.name!r} "
                     f"(classes: {sorted(known)})")
  readable = tuple(known[f].readable for f in folders)
  bare = tuple(prompts.base_caption(metadata, dataclasses.replace(known[f], attributes=()))
               for f in folders)
  return readable, bare, ("{}",)


def folder_captions(class_names: Sequence[str], config, metadata, seed: int,
                    keys: Sequence[str], labels: Sequence[int]) -> list[list[str]]:
  """Captions per image of an ImageFolder: ALive bank from metadata, else from the folder names."""
  from agriclip_jax import prompts, zeroshot
  out = []
  for key, label in zip(keys, labels):
    folder = class_names[label]
    if metadata is not None:
      cls = metadata.class_by_name(folder)
      out.append(prompts.template_variants(metadata, cls, config.captions.variants, seed, key))
    else:
      readable = zeroshot.clean_class_name(folder)
      out.append(list(dict.fromkeys([prompts.simple_caption(folder),
                                     config.captions.template.format(readable)])))
  return out


def own_data(workdir: Path, config, data: str, metadata_path: str | None, evals: Sequence[str],
             holdout: float) -> DemoData:
  """Your photos: `data` an ImageFolder (captioned here) or a captioned manifest; `evals` are
  ImageFolders, one zero-shot task each; `holdout` > 0 keeps that share of an ImageFolder `data`
  out of training and evaluates it as one more task."""
  from agriclip_jax import prompts, zeroshot
  from input_pipeline.sources import ImageFolderSource, JsonlSource, open_source
  metadata = prompts.load_metadata(metadata_path) if metadata_path else None
  tasks: list[EvalTask] = []
  data_path = Path(data)
  if data_path.is_dir() and not any(p.suffix in (".tar",) or ".array_record" in p.name
                                    for p in data_path.iterdir() if p.is_file()):
    folder = ImageFolderSource(data_path, captions_for_class=lambda name: [])
    if metadata is not None:
      unknown = [n for n in folder.class_names if n not in {c.name for c in metadata.classes}]
      if unknown:
        raise ValueError(f"class folder(s) {unknown} of {data_path} have no entry in metadata "
                         f"{metadata_path}")
    entries = [folder.entry(i) for i in range(len(folder))]
    relative = [os.path.relpath(e["path"], data_path) for e in entries]
    if holdout > 0:
      held = zeroshot.eval_indices(relative, holdout, salt=f"{config.own_data.holdout_salt}-"
                                   f"{config.seed}")
      held_set = set(int(i) for i in held)
      train_rows = [i for i in range(len(entries)) if i not in held_set]
      tasks.append(EvalTask(f"{data_path.name}_heldout", "heldout_images",
                            ImageFolderSource(data_path),
                            *class_prompts(folder.class_names, config, metadata),
                            np.asarray(sorted(held_set), np.int64)))
      log(f"--holdout {holdout}: {len(held_set)} of {len(entries)} images of {data_path} held out "
          f"for zero-shot, {len(train_rows)} train")
    else:
      train_rows = list(range(len(entries)))
    keys = [entries[i]["key"] for i in train_rows]
    labels = [entries[i]["label"] for i in train_rows]
    captions = folder_captions(folder.class_names, config, metadata, config.seed, keys, labels)
    lines = [{"image": os.path.abspath(entries[i]["path"]), "captions": caps, "label": lab,
              "key": key} for i, caps, lab, key in zip(train_rows, captions, labels, keys)]
    manifest = _write_jsonl(workdir / "data" / "captions.jsonl", lines)
    source, spec = JsonlSource(manifest), str(manifest)
    corpus = [c for caps in captions for c in caps]
    log(f"captions for {len(lines)} images of {data_path} "
        f"({'metadata ' + str(metadata_path) if metadata else 'class folder names'}) -> {manifest}")
  else:
    if holdout > 0:
      raise ValueError(f"--holdout needs an ImageFolder --data; {data} is a manifest or shards")
    source, spec = open_source(data), data
    corpus = [c for i in range(len(source)) for c in source.entry(i)["captions"]] if hasattr(
        source, "entry") else []
    if not corpus:
      raise ValueError(f"{data}: no captions found to train the tokenizer on")
  for folder_path in evals:
    path = Path(folder_path)
    source_eval = ImageFolderSource(path)
    tasks.append(EvalTask(path.name, "eval_folder", source_eval,
                          *class_prompts(source_eval.class_names, config, metadata)))
  if not tasks:
    raise ValueError("no zero-shot task: give --eval FOLDER (one per task) or --holdout FRACTION")
  return DemoData(source, spec, corpus, tasks, f"own data {data}")


# ================================================================================================
# Tokenizer and joint training
# ================================================================================================

def train_tokenizer(corpus: Sequence[str], config, out_dir: Path):
  from agriclip_jax.tokenizer import train_bpe_tokenizer
  tok = train_bpe_tokenizer(corpus, config.tokenizer.vocab_size, out_dir,
                            min_frequency=config.tokenizer.min_frequency)
  log(f"BPE tokenizer: {tok.vocab_size} tokens ({len(tok.merges)} merges) from "
      f"{len(corpus)} captions -> {out_dir}")
  return tok


def demo_tokenizer(corpus: Sequence[str], config, out_dir: Path, workdir: Path):
  """The tokenizer trained on the captions; when the workdir already holds training checkpoints
  (a stopped run being resumed, or a finished one rerun), the tokenizer they were trained with."""
  from agriclip_jax import model_io
  from agriclip_jax.tokenizer import load_tokenizer
  checkpoints = workdir / "checkpoints"
  if model_io.has_tokenizer(out_dir) and checkpoints.is_dir() and any(
      p.name.isdigit() for p in checkpoints.iterdir()):
    tok = load_tokenizer(out_dir)
    log(f"BPE tokenizer: {tok.vocab_size} tokens from {out_dir}, the one the checkpoints in "
        f"{checkpoints} were trained with")
    return tok
  return train_tokenizer(corpus, config, out_dir)


def training_config(config, data: DemoData, tokenizer_dir: Path, vocab_size: int):
  """The demo's `train` section pointed at the data stage's manifest and tokenizer: a run config
  that `agriclip train --config` would run the same way."""
  train_cfg = config.train.copy_and_resolve_references()
  with train_cfg.unlocked():
    train_cfg.data.source = data.train_spec
    train_cfg.data.tokenizer = str(tokenizer_dir)
    train_cfg.clip.vocab_size = vocab_size
  return train_cfg


class TrainingStopped(Exception):
  """A signal stopped the training: after saving its checkpoint, or at once (a second Ctrl-C).
  The demo stops there and the same command resumes it. `exit_code`: the shell's status for the
  signal (130 Ctrl-C, 143 SIGTERM)."""

  def __init__(self, signal_name: str | None, workdir: Path):
    checkpoints = workdir / "checkpoints"
    if signal_name is None:  # KeyboardInterrupt: the second Ctrl-C
      message = (f"interrupted: stopped at once by a second Ctrl-C during training; the same "
                 f"command resumes from the newest complete checkpoint in {checkpoints}")
      self.exit_code = 130
    else:
      message = (f"stopped by {signal_name} during training, after saving a checkpoint in "
                 f"{checkpoints}; run the same command again to resume")
      member = signal.Signals.__members__.get(signal_name, signal.SIGTERM)
      self.exit_code = 128 + member.value
    super().__init__(message)


@dataclasses.dataclass
class TrainingRun:
  paths: dict[str, Path]  # model directories: "clip" (with its tokenizer), "dino" (the teacher)
  history: list[dict[str, Any]]  # the logged steps of W/metrics.jsonl
  steps_per_second: float | None  # the median of the logged windows


def train_models(train_cfg, workdir: Path) -> TrainingRun:
  """Joint CLIP + DINO training by `agriclip train`'s loop (train/loop.train) in the demo's
  workdir: its checkpoints, W/metrics.jsonl, TensorBoard, resume, Ctrl-C / SIGTERM handling and
  its export to W/models/clip and W/models/dino. A rerun resumes from the newest checkpoint; a
  finished run is exported again from its last one."""
  from agriclip_jax.train import loop
  from agriclip_jax.train.metrics_writer import read_metrics
  try:
    last = loop.train(train_cfg, workdir)
  except KeyboardInterrupt:
    raise TrainingStopped(None, workdir) from None
  if last.get("stopped_by"):
    raise TrainingStopped(last["stopped_by"], workdir)
  history = [r for r in read_metrics(workdir) if "contrastive_loss" in r]
  # The first window of a run (or of a resumed run) holds the compilation: the median skips it.
  rates = [r["images_per_sec"] / train_cfg.batch_size for r in history if "images_per_sec" in r]
  models = workdir / "models"
  return TrainingRun({"clip": models / "clip", "dino": models / "dino"}, history,
                     float(np.median(rates)) if rates else None)


# ================================================================================================
# Features, aligner, zero-shot
# ================================================================================================

def _one_device_mesh():
  import jax

  from agriclip_jax import features
  return features.data_mesh(jax.devices()[:1])


def load_models(paths: dict[str, Path], batch_size: int, dino_pooling: str = "cls"):
  """The trained CLIP and DINO backbone as an `api.Model` (the aligner comes after the fit)."""
  from agriclip_jax import api, features
  return api.Model(clip=features.clip_model_encoders(paths["clip"], batch_size, _one_device_mesh()),
                   dino=features.dino_model_encoder(paths["dino"], pooling=dino_pooling),
                   batch_size=batch_size)


def fit_aligner(model, source, config):
  """Exact least squares DINO -> CLIP image embeddings on the training images; sets
  `model.ensemble` to the ensemble's calibration on the held-out rows."""
  from agriclip_jax import align, features, zeroshot
  encoded = features.encode_source(source, np.arange(len(source)), [model.clip.image, model.dino],
                                   config.features.batch_size, mesh=_one_device_mesh(),
                                   desc="aligner features")
  dino, clip = encoded.features["dino"], encoded.features["clip_image"]
  result = align.fit_exact(align.iterate_chunks(dino, clip), ridge=config.align.ridge,
                           holdout=config.align.holdout, seed=config.seed)
  # The ensemble's weight and temperatures from the held-out rows' captions, as `agriclip
  # align` chooses them: never from a zero-shot task.
  held = align.holdout_mask(np.arange(len(dino)), config.align.holdout, config.seed)
  model.ensemble = zeroshot.calibrate_on_source(
      source, encoded.indices[held], clip[held], result.aligner.apply(dino[held]),
      model.clip.encode_text, seed=config.seed) if held.any() else None
  if model.ensemble is not None:
    log(f"ensemble calibrated on {model.ensemble['validation']['images']} held-out images: CLIP "
        f"weight {model.ensemble['weight']:.2f}, temperatures CLIP "
        f"{model.ensemble['clip_temperature']:.3g} / AgriCLIP "
        f"{model.ensemble['agriclip_temperature']:.3g}")
  log(f"aligner {dino.shape[1]} -> {clip.shape[1]} (DINO pooling {config.features.dino_pooling}) "
      f"on {len(dino)} images: ridge {result.ridge:g}, "
      f"R^2 fit {result.metrics['fit']['r2']:.3f}"
      + (f", held-out {result.metrics['heldout']['r2']:.3f}" if "heldout" in result.metrics else ""))
  return result


def evaluate_task(task: EvalTask, model, config) -> list[dict[str, Any]]:
  """Result rows (one per method) of one zero-shot task, through `zeroshot.score_task`."""
  from agriclip_jax import zeroshot
  indices = task.indices if task.indices is not None else np.arange(len(task.source))
  scored = zeroshot.score_task(task.name, task.source, indices, task.class_names, task.templates,
                               model, METHODS, prompt_names=task.prompt_names,
                               ensemble_weight=config.zeroshot.ensemble_weight,
                               batch_size=config.features.batch_size, mesh=_one_device_mesh())
  if scored.encoded.skipped:
    log(f"task {task.name}: {sum(scored.encoded.skipped.values())} images could not be read: "
        f"{scored.encoded.skipped}")
  rows, _ = zeroshot.task_rows(scored, kind=task.kind)
  log(f"task {task.name} ({task.num_classes} classes, {len(scored.labels)} images): "
      + ", ".join(f"{r['method']} {100 * r['top1']:.1f}%" for r in rows)
      + f" (chance {100 * rows[0]['chance']:.1f}%)")
  return rows


def results_document(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The results.json shape scripts rely on: {"tasks": {TASK: {"num_classes", "chance",
  "accuracy": {method: top-1}, "interval": {method: [low, high]} (95 % bootstrap over the
  task's images), "minus_clip": {method: {"difference", "low", "high", ...}} (paired bootstrap),
  ...}}, "mean": {method: ..., "chance": ...}, "ensemble": {"weight", "clip_temperature",
  "agriclip_temperature", "source", "validation"}}."""
  tasks: dict[str, dict[str, Any]] = {}
  for row in rows:
    entry = tasks.setdefault(row["task"], {"num_classes": row["num_classes"],
                                           "chance": row["chance"], "accuracy": {},
                                           "interval": {}, "minus_clip": {},
                                           "balanced_accuracy": {}, "num_images": row["num_images"],
                                           "kind": row["kind"]})
    entry["accuracy"][row["method"]] = row["top1"]
    entry["interval"][row["method"]] = [row["top1_interval"]["low"], row["top1_interval"]["high"]]
    if "top1_minus_clip" in row:
      entry["minus_clip"][row["method"]] = row["top1_minus_clip"]
    entry["balanced_accuracy"][row["method"]] = row["balanced_accuracy"]
  mean = {m: float(np.mean([t["accuracy"][m] for t in tasks.values()])) for m in METHODS}
  mean["chance"] = float(np.mean([t["chance"] for t in tasks.values()]))
  # The ensemble's weight and temperatures (chosen on the held-out align rows, the same for every
  # task) and where they came from.
  ensemble = next((row["ensemble"] for row in rows if "ensemble" in row), None)
  return {"tasks": tasks, "mean": mean, **({"ensemble": ensemble} if ensemble else {})}


# ================================================================================================
# Report and export
# ================================================================================================

def _comparison_lines(document: dict[str, Any]) -> list[str]:
  tasks = document["tasks"]
  better = [n for n, t in tasks.items() if t["accuracy"]["agriclip"] > t["accuracy"]["clip"]]
  worse = [n for n, t in tasks.items() if t["accuracy"]["agriclip"] < t["accuracy"]["clip"]]
  mean = document["mean"]
  return [f"- Aligned DINO (AgriCLIP) beats CLIP only on {len(better)} of {len(tasks)} tasks"
          + (f": {', '.join(better)}" if better else "") + ".",
          f"- CLIP only beats AgriCLIP on {len(worse)} of {len(tasks)} tasks"
          + (f": {', '.join(worse)}" if worse else "") + ".",
          f"- Mean over tasks: CLIP {100 * mean['clip']:.1f}%, AgriCLIP {100 * mean['agriclip']:.1f}%, "
          f"ensemble {100 * mean['ensemble']:.1f}%, chance {100 * mean['chance']:.1f}% "
          f"(AgriCLIP / chance = {mean['agriclip'] / mean['chance']:.2f}x)."]


def plot_training(history: list[dict[str, float]], path: Path) -> Path | None:
  if not history:
    return None
  from agriclip_jax.report import _pyplot
  plt = _pyplot()
  steps = [h["step"] for h in history]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  axes[0].plot(steps, [h["contrastive_loss"] for h in history])
  axes[0].set_title("CLIP contrastive loss")
  axes[1].plot(steps, [h["dino_loss"] for h in history], color="tab:orange")
  axes[1].set_title("DINO loss")
  for ax in axes:
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(workdir: Path, rows: list[dict[str, Any]], document: dict[str, Any],
                 timer: StageTimer, summary: dict[str, Any], history: list[dict[str, float]]) -> Path:
  """report.md (tables + plots from report.py) headed by the demo's own summary."""
  from agriclip_jax import report, zeroshot
  differences = [{"task": row["task"], "methods": [row["method"], "clip"],
                  "top1": row["top1_minus_clip"]} for row in rows if "top1_minus_clip" in row]
  report.write_report({"results": rows, "mean": zeroshot.suite_means(rows),
                       "differences": differences}, workdir)
  tables = (workdir / "report.md").read_text()
  tables = tables.split("\n", 1)[1] if tables.startswith("# ") else tables
  plot_training(history, workdir / "training.png")
  lines = ["# AgriCLIP demo report", "", f"Data: {summary['data']}.", "",
           "## Zero-shot accuracy with chance", "",
           "Top-1 % with its 95 % bootstrap interval over the task's images; the last column is "
           "AgriCLIP minus CLIP on the same images, with its paired bootstrap interval.", "",
           "| task | classes | images | chance | CLIP | AgriCLIP | ensemble | AgriCLIP - CLIP |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]

  def cell(t: dict[str, Any], method: str) -> str:
    low, high = t["interval"][method]
    return f"{100 * t['accuracy'][method]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"

  for name, t in document["tasks"].items():
    d = t["minus_clip"]["agriclip"]
    lines.append(f"| {name} | {t['num_classes']} | {t['num_images']} | {100 * t['chance']:.1f} | "
                 f"{cell(t, 'clip')} | {cell(t, 'agriclip')} | {cell(t, 'ensemble')} | "
                 f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")
  m = document["mean"]
  lines += [f"| **mean** | | | {100 * m['chance']:.1f} | {100 * m['clip']:.1f} | "
            f"{100 * m['agriclip']:.1f} | {100 * m['ensemble']:.1f} | "
            f"{100 * (m['agriclip'] - m['clip']):+.1f} |", "",
            *_comparison_lines(document), "",
            "## Pipeline", "",
            f"- Training: {summary['train']}", f"- Aligner: {summary['aligner']}",
            f"- Ensemble: {_ensemble_line(document.get('ensemble'))}",
            f"- Exports: {summary.get('exports', 'none')}", "",
            "![training](training.png)", "",
            "| stage | wall time (s) |", "|---|---:|"]
  lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timer.seconds.items()]
  lines += [f"| **total** | {timer.total:.1f} |", ""]
  path = workdir / "report.md"
  path.write_text("\n".join(lines) + "\n" + tables)
  return path


def _ensemble_line(choice: dict[str, Any] | None) -> str:
  if not choice:
    return "not scored"
  if choice["clip_temperature"] is None:
    return f"CLIP weight {choice['weight']:.2f} ({choice['source']})"
  return (f"CLIP weight {choice['weight']:.2f}, temperatures CLIP {choice['clip_temperature']:.3g} / "
          f"AgriCLIP {choice['agriclip_temperature']:.3g} ({choice['source']})")


def torch_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("torch") is not None


def export_pytorch(paths: dict[str, Path], aligner, export_dir: Path,
                   dino_pooling: str = "cls") -> dict[str, Path]:
  """PyTorch files through the converters: an HF CLIPModel directory, the DINO ViT state dict
  (DINO's names) and the aligner {'W', 'b'} as safetensors, and dino_features.json saying which
  DINO features the aligner reads (DINO's get_intermediate_layers recipe: see models/vit.py).

  None of these needs PyTorch to write, and PyTorch reads them all (`CLIPModel.from_pretrained`,
  `safetensors.torch.load_file`). The reference's torch.save layouts (dino_vit.pth, aligner.pth)
  are written too when torch is installed; without it one line says how to make them later."""
  from agriclip_jax import align, fileio
  from agriclip_jax.convert import registry
  from agriclip_jax.models.vit import dino_pooling as parse_pooling
  export_dir.mkdir(parents=True, exist_ok=True)
  out = {"clip_hf": export_dir / "clip_hf", "dino_vit": export_dir / "dino_vit.safetensors",
         "aligner": export_dir / "aligner.safetensors",
         "dino_features": export_dir / "dino_features.json"}
  n_last_blocks, avgpool = parse_pooling(dino_pooling)
  fileio.atomic_write_json(out["dino_features"], {
      "pooling": dino_pooling, "n_last_blocks": n_last_blocks, "avgpool": avgpool,
      "aligner_in_dim": aligner.in_dim,
      "recipe": "concatenate norm(x)[:, 0] of the last n_last_blocks blocks, oldest first "
                "(with avgpool: interleave with the mean of norm(x)[:, 1:], as DINO's eval_linear)"})
  registry.convert(paths["clip"], "flax", out["clip_hf"], "hf")
  registry.convert(paths["dino"], "flax", out["dino_vit"], "dino-vit")
  align.save_aligner(aligner, out["aligner"], metadata={"dino_pooling": dino_pooling})
  reference_layouts = {"dino_vit_pth": (out["dino_vit"], "dino-vit", export_dir / "dino_vit.pth"),
                       "aligner_pth": (out["aligner"], "agriclip-aligner",
                                       export_dir / "aligner.pth")}
  if torch_available():
    for name, (src, fmt, dst) in reference_layouts.items():
      registry.convert(src, fmt, dst, fmt)
      out[name] = dst
  else:
    log("torch is not installed: skipped the reference torch.save layouts "
        f"({', '.join(dst.name for _, _, dst in reference_layouts.values())}); the .safetensors "
        "files hold the same tensors. After `pip install torch`: " + "; ".join(
            f"agriclip convert --src {src} --src-format {fmt} --dst {dst} --dst-format {fmt}"
            for src, fmt, dst in reference_layouts.values()))
  for name, path in out.items():
    log(f"export {name}: {path}")
  return out


# ================================================================================================
# The whole run
# ================================================================================================

@dataclasses.dataclass
class DemoOptions:
  workdir: Path
  data: str | None = None
  metadata: str | None = None
  evals: tuple[str, ...] = ()
  holdout: float = 0.0
  export: bool = True


def run_demo(options: DemoOptions, config) -> dict[str, Any]:
  """Runs every stage; returns the results document (also written to W/results.json)."""
  from agriclip_jax import align
  workdir = Path(options.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  timer = StageTimer()
  summary: dict[str, Any] = {}
  with timer.stage("data", "images and captions"):
    if options.data is None:
      if options.evals or options.metadata or options.holdout:
        raise ValueError("--eval, --metadata and --holdout apply to your own --data")
      data = synthetic_data(workdir, config)
    else:
      data = own_data(workdir, config, options.data, options.metadata, options.evals,
                      options.holdout)
    summary["data"] = (f"{data.description}: {len(data.train_source)} training images, "
                       f"{len(data.tasks)} zero-shot tasks")
  with timer.stage("tokenizer", "BPE trained on the captions"):
    tokenizer_dir = workdir / "tokenizer"
    tokenizer = demo_tokenizer(data.captions, config, tokenizer_dir, workdir)
  train_cfg = training_config(config, data, tokenizer_dir, tokenizer.vocab_size)
  with timer.stage("train", "joint CLIP + DINO (agriclip train's loop)"):
    trained = train_models(train_cfg, workdir)
    paths = dict(trained.paths)
    rate = (f"{trained.steps_per_second:.2f} steps/s, median of the logged windows"
            if trained.steps_per_second else "no window logged")
    summary["train"] = (f"{train_cfg.total_steps} joint steps of batch {train_cfg.batch_size} at "
                        f"{train_cfg.data.image_size} px ({rate}); checkpoints, metrics.jsonl "
                        f"and TensorBoard in the workdir")
  with timer.stage("align", "features of the training images and the exact aligner"):
    model = load_models(paths, config.features.batch_size, config.features.dino_pooling)
    fitted = fit_aligner(model, data.train_source, config)
    aligner = model.aligner = fitted.aligner
    paths["aligner"] = align.save_aligner(
        aligner, workdir / "models" / "aligner.safetensors",
        metadata={"dino_pooling": config.features.dino_pooling,
                  **({"ensemble": model.ensemble} if model.ensemble else {})})
    summary["aligner"] = (f"exact least squares on DINO features "
                          f"'{config.features.dino_pooling}' ({aligner.in_dim}-d), ridge "
                          f"{fitted.ridge:g}, R^2 fit "
                          f"{fitted.metrics['fit']['r2']:.3f}" +
                          (f", held-out {fitted.metrics['heldout']['r2']:.3f}"
                           if "heldout" in fitted.metrics else ""))
  with timer.stage("zeroshot", f"{len(data.tasks)} tasks x {len(METHODS)} methods"):
    rows = [row for task in data.tasks for row in evaluate_task(task, model, config)]
    document = results_document(rows)
  # Results and report first: a failing export must not lose the evaluation.
  with timer.stage("report", "report.md, plots, results.json"):
    _write_json(workdir / "results.json", document)
    _write_json(workdir / "rows.json", {"results": rows})
    write_report(workdir, rows, document, timer, summary, trained.history)
  if options.export:
    with timer.stage("export", "PyTorch: HF CLIP, DINO ViT and aligner state dicts"):
      exports = export_pytorch(paths, aligner, workdir / "export", config.features.dino_pooling)
      summary["exports"] = ", ".join(f"`{p.relative_to(workdir)}`" for p in exports.values())
    write_report(workdir, rows, document, timer, summary, trained.history)  # now with the exports
  timings = dict(timer.seconds, total=timer.total)
  _write_json(workdir / "timings.json", timings)
  for line in _comparison_lines(document):
    log(line[2:])
  log(f"total {timer.total:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in timer.seconds.items())
      + f" -> {workdir / 'report.md'}")
  return document


def _write_json(path: Path, obj: Any) -> Path:
  from agriclip_jax.fileio import atomic_write_json
  return atomic_write_json(path, obj, indent=1)
