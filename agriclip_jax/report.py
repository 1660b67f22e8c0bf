"""Reports from zero-shot results: markdown tables and PNG plots (matplotlib, headless).

Input is the JSON written by `agriclip zeroshot`:
  {"results": [{"task", "method", "num_images", "top1", "top5", "balanced_accuracy", "per_class",
                "class_names", "confusion", ...}, ...],
   "mean": {method: {"tasks", "top1", "balanced_accuracy"}}, ...}
Output: report.md (one table of top-1 per task and method with the mean over tasks, and one table of
all metrics per task and method), accuracy.png (grouped bars) and confusion/<task>__<method>.png.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_KEYS = ("task", "method", "num_images", "top1", "top5", "balanced_accuracy")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
  path = Path(path)
  try:
    document = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"results file {path}: {e}") from e
  rows = document.get("results") if isinstance(document, dict) else None
  has_retrieval = isinstance(document, dict) and bool(document.get("retrieval"))
  if not isinstance(rows, list) or not (rows or has_retrieval):
    raise ValueError(f"results file {path}: expected {{\"results\": [...]}} with at least one entry")
  for i, row in enumerate(rows):
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
      raise ValueError(f"results file {path}: entry #{i} lacks {missing}")
  return document


def _ordered(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  return tasks, methods


def _percent(value: float | None) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def markdown_tables(rows: list[dict[str, Any]]) -> str:
  tasks, methods = _ordered(rows)
  lookup = {(r["task"], r["method"]): r for r in rows}
  lines = ["## Top-1 accuracy (%)", "", "| task | images | " + " | ".join(methods) + " |",
           "|---|---:|" + "---:|" * len(methods)]
  for task in tasks:
    images = next(r["num_images"] for r in rows if r["task"] == task)
    cells = [_percent(lookup[(task, m)]["top1"]) if (task, m) in lookup else "–" for m in methods]
    lines.append(f"| {task} | {images} | " + " | ".join(cells) + " |")
  means = []
  for m in methods:
    values = [lookup[(t, m)]["top1"] for t in tasks if (t, m) in lookup]
    means.append(f"**{_percent(float(np.mean(values)))}**" if values else "–")
  lines.append(f"| **mean over {len(tasks)} tasks** | | " + " | ".join(means) + " |")
  lines += ["", "## All metrics (%)", "",
            "| task | method | images | top-1 | top-5 | balanced |", "|---|---|---:|---:|---:|---:|"]
  for task in tasks:
    for m in methods:
      if (task, m) in lookup:
        r = lookup[(task, m)]
        lines.append(f"| {task} | {m} | {r['num_images']} | {_percent(r['top1'])} | "
                     f"{_percent(r['top5'])} | {_percent(r['balanced_accuracy'])} |")
  return "\n".join(lines) + "\n"


def retrieval_table(rows: list[dict[str, Any]]) -> str:
  ks = sorted({int(k.rsplit("@", 1)[1]) for r in rows for k in r if k.startswith("image_to_text_R@")})
  header = " | ".join(f"I->T R@{k}" for k in ks) + " | " + " | ".join(f"T->I R@{k}" for k in ks)
  lines = ["## Image-text retrieval (%)", "", f"| task | method | images | texts | {header} |",
           "|---|---|---:|---:|" + "---:|" * (2 * len(ks))]
  for r in rows:
    cells = [_percent(r[f"image_to_text_R@{k}"]) for k in ks] + [_percent(r[f"text_to_image_R@{k}"]) for k in ks]
    lines.append(f"| {r['task']} | {r['method']} | {r['num_images']} | {r['num_texts']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # headless: no display on servers and CI
  import matplotlib.pyplot as plt
  return plt


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> Path:
  plt = _pyplot()
  tasks, methods = _ordered(rows)
  lookup = {(r["task"], r["method"]): r["top1"] for r in rows}
  width = 0.8 / len(methods)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(methods)) / 2), 4.0))
  positions = np.arange(len(tasks))
  for i, method in enumerate(methods):
    values = [100 * lookup.get((t, method), np.nan) for t in tasks]
    ax.bar(positions + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
  ax.set_xticks(positions, tasks, rotation=30 if len(tasks) > 3 else 0, ha="right" if len(tasks) > 3 else "center")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Zero-shot accuracy per task and method")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_confusion(row: dict[str, Any], path: Path) -> Path:
  plt = _pyplot()
  confusion = np.asarray(row["confusion"], np.float64)
  names = row.get("class_names") or [str(i) for i in range(len(confusion))]
  support = confusion.sum(axis=1, keepdims=True)
  rates = np.divide(confusion, support, out=np.zeros_like(confusion), where=support > 0)
  size = max(4.0, 0.45 * len(names) + 2.5)
  fig, ax = plt.subplots(figsize=(size, size))
  image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
  ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(f"{row['task']} / {row['method']}: top-1 {100 * row['top1']:.1f}%")
  if len(names) <= 15:  # counts stay legible only for small matrices
    for (i, j), count in np.ndenumerate(confusion):
      if count:
        ax.text(j, i, int(count), ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "task"


def write_report(document: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
  """Writes report.md, accuracy.png and one confusion-matrix PNG per task and method."""
  out = Path(out_dir)
  (out / "confusion").mkdir(parents=True, exist_ok=True)
  rows = document["results"]
  written = [plot_accuracy(rows, out / "accuracy.png")] if rows else []
  confusion_links = []
  for row in rows:
    if "confusion" in row:
      name = f"{_slug(row['task'])}__{_slug(row['method'])}.png"
      written.append(plot_confusion(row, out / "confusion" / name))
      confusion_links.append(f"- {row['task']} / {row['method']}: [confusion/{name}](confusion/{name})")
  text = ["# Zero-shot report", ""]
  if rows:
    text += [markdown_tables(rows), "![accuracy](accuracy.png)", ""]
  if document.get("retrieval"):
    text += [retrieval_table(document["retrieval"]), ""]
  if confusion_links:
    text += ["## Confusion matrices", "", *confusion_links, ""]
  report = out / "report.md"
  report.write_text("\n".join(text))
  return [report, *written]
