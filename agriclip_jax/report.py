"""Reports from evaluation results: markdown tables and PNG plots (matplotlib, headless).

Input is the JSON written by `agriclip zeroshot`:
  {"results": [{"task", "method", "num_images", "top1", "top5", "balanced_accuracy", "per_class",
                "class_names", "confusion", ...}, ...],
   "mean": {method: {"tasks", "top1", "balanced_accuracy"}}, ...}
Output: report.md (one table of top-1 per task and method with the mean over tasks, and one table of
all metrics per task and method), accuracy.png (grouped bars) and confusion/<task>__<method>.png.

Or the JSON of `agriclip knn` / `agriclip probe` ({"knn": {k: {"top1", "top5"}}, "probe": {"top1",
"C", "sweep"}, "fewshot": {N: {"probe": {"mean", "std"}, "centroid": ...}}, "features",
"compared": {features: {...the same..., "difference": ...}}}): tables per section, knn.png (top-1
against k), probe.png and fewshot.png (mean +- std against N).

A zero-shot file may also hold "differences": [{"task", "methods": [a, b], "top1": paired
interval}], shown as a table of a − b.

An accuracy `NAME` with a bootstrap interval beside it (`NAME_interval`: {"low", "high", ...}, as
`evaluation.bootstrap_interval` returns) is shown as "acc [low, high]" and drawn with error bars;
files without intervals give the plain tables and bars.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_KEYS = ("task", "method", "num_images", "top1", "top5", "balanced_accuracy")


EVALUATION_SECTIONS = ("knn", "probe", "fewshot")


def _check_evaluation(document: dict[str, Any], path: Path) -> None:
  """The sections of a knn / probe results file hold the accuracies the tables read."""
  for name, section in [("", document)] + [(f"compared.{f}.", c) for f, c in
                                           (document.get("compared") or {}).items()]:
    for k, row in (section.get("knn") or {}).items():
      missing = [key for key in ("top1", "top5") if key not in row]
      if missing:
        raise ValueError(f"results file {path}: {name}knn.{k} lacks {missing}")
    if "probe" in section and "top1" not in section["probe"]:
      raise ValueError(f"results file {path}: {name}probe lacks 'top1'")
    for n, row in (section.get("fewshot") or {}).items():
      missing = [f"{m}.{key}" for m in ("probe", "centroid") for key in ("mean", "std")
                 if key not in row.get(m, {})]
      if missing:
        raise ValueError(f"results file {path}: {name}fewshot.{n} lacks {missing}")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
  path = Path(path)
  try:
    document = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"results file {path}: {e}") from e
  if isinstance(document, dict) and any(document.get(s) for s in EVALUATION_SECTIONS):
    _check_evaluation(document, path)
    return document
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


def _with_interval(value: float | None, interval: dict[str, Any] | None) -> str:
  """"81.2 [77.0, 85.1]" (percent) when the bootstrap interval is there, else "81.2"."""
  if value is None or not interval:
    return _percent(value)
  return f"{_percent(value)} [{_percent(interval['low'])}, {_percent(interval['high'])}]"


def _cell(row: dict[str, Any], key: str) -> str:
  return _with_interval(row.get(key), row.get(f"{key}_interval"))


def _difference(paired: dict[str, Any]) -> str:
  """"+3.1 [0.4, 5.9]": a paired difference in percentage points."""
  return (f"{100 * paired['difference']:+.1f} [{100 * paired['low']:+.1f}, "
          f"{100 * paired['high']:+.1f}]")


def _error_bars(values: list[float], intervals: list[dict[str, Any] | None]) -> np.ndarray | None:
  """[2, n] distances below / above each value (percent) for matplotlib's yerr; None without any
  interval, zero where one is missing."""
  if not any(intervals):
    return None
  return np.array([[100 * (v - i["low"]) if i else 0.0 for v, i in zip(values, intervals)],
                   [100 * (i["high"] - v) if i else 0.0 for v, i in zip(values, intervals)]])


def markdown_tables(rows: list[dict[str, Any]]) -> str:
  tasks, methods = _ordered(rows)
  lookup = {(r["task"], r["method"]): r for r in rows}
  lines = ["## Top-1 accuracy (%)", "", "| task | images | " + " | ".join(methods) + " |",
           "|---|---:|" + "---:|" * len(methods)]
  for task in tasks:
    images = next(r["num_images"] for r in rows if r["task"] == task)
    cells = [_cell(lookup[(task, m)], "top1") if (task, m) in lookup else "–" for m in methods]
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
        lines.append(f"| {task} | {m} | {r['num_images']} | {_cell(r, 'top1')} | "
                     f"{_cell(r, 'top5')} | {_percent(r['balanced_accuracy'])} |")
  return "\n".join(lines) + "\n"


def differences_table(rows: list[dict[str, Any]]) -> str:
  """Zero-shot comparisons on the same images: rows {"task", "methods": [a, b], "top1": paired
  interval of accuracy(a) - accuracy(b) (`evaluation.paired_bootstrap_difference`)}."""
  lines = ["## Paired differences (percentage points, 95% CI)", "",
           "| task | methods | images | top-1 difference |", "|---|---|---:|---:|"]
  for r in rows:
    first, second = r["methods"]
    lines.append(f"| {r['task']} | {first} − {second} | {r['top1']['images']} | "
                 f"{_difference(r['top1'])} |")
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
  lookup = {(r["task"], r["method"]): r for r in rows}
  width = 0.8 / len(methods)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(methods)) / 2), 4.0))
  positions = np.arange(len(tasks))
  for i, method in enumerate(methods):
    found = [lookup.get((t, method)) for t in tasks]
    values = [r["top1"] if r else np.nan for r in found]
    errors = _error_bars(values, [r.get("top1_interval") if r else None for r in found])
    ax.bar(positions + (i - (len(methods) - 1) / 2) * width, [100 * v for v in values], width,
           yerr=errors, capsize=3 if errors is not None else 0, label=method)
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


# ----------------------------------------------------------------------------------------------
# kNN, linear probe, few-shot (`agriclip knn` / `agriclip probe`)
# ----------------------------------------------------------------------------------------------

def _feature_sections(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """(feature kind, its results) for the main features, then every compared kind."""
  return [(str(document.get("features", "features")), document),
          *((kind, section) for kind, section in (document.get("compared") or {}).items())]


def evaluation_tables(document: dict[str, Any]) -> str:
  sections = _feature_sections(document)
  first = sections[0][0]
  test_images = (document.get("test") or {}).get("images", "–")
  lines: list[str] = []
  if document.get("knn"):
    lines += [f"## Weighted kNN (%), {test_images} test images", "",
              "| features | k | top-1 [95% CI] | top-5 [95% CI] |", "|---|---:|---:|---:|"]
    for kind, section in sections:
      for k, row in (section.get("knn") or {}).items():
        lines.append(f"| {kind} | {k} | {_cell(row, 'top1')} | {_cell(row, 'top5')} |")
    lines.append("")
  if document.get("probe"):
    lines += [f"## Linear probe (%), {test_images} test images", "",
              "| features | top-1 [95% CI] | C |", "|---|---:|---:|"]
    for kind, section in sections:
      if section.get("probe"):
        probe = section["probe"]
        C = f"{probe['C']:.3g}" if probe.get("C") is not None else "–"
        lines.append(f"| {kind} | {_cell(probe, 'top1')} | {C} |")
    lines.append("")
  if document.get("fewshot"):
    lines += ["## Few-shot top-1 (%), mean ± std over seeds", "",
              "| features | N per class | seeds | probe | centroid |", "|---|---:|---:|---:|---:|"]
    for kind, section in sections:
      for n, row in (section.get("fewshot") or {}).items():
        lines.append(f"| {kind} | {n} | {row.get('seeds', '–')} | "
                     + " | ".join(f"{_percent(row[m]['mean'])} ± {_percent(row[m]['std'])}"
                                  for m in ("probe", "centroid")) + " |")
    lines.append("")
  differences = [(kind, section["difference"]) for kind, section in sections[1:]
                 if section.get("difference")]
  if differences:
    lines += [f"## Paired differences, {first} minus the other (percentage points, 95% CI)", "",
              "| versus | evaluation | top-1 | top-5 |", "|---|---|---:|---:|"]
    for kind, difference in differences:
      for k, row in (difference.get("knn") or {}).items():
        lines.append(f"| {kind} | kNN k={k} | {_difference(row['top1'])} | "
                     f"{_difference(row['top5']) if 'top5' in row else '–'} |")
      if "probe" in difference:
        lines.append(f"| {kind} | linear probe | {_difference(difference['probe']['top1'])} | – |")
    lines.append("")
  return "\n".join(lines)


def plot_knn(document: dict[str, Any], path: Path) -> Path:
  """Top-1 against k, one line per feature kind, with bootstrap error bars."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for kind, section in _feature_sections(document):
    rows = section.get("knn") or {}
    if not rows:
      continue
    ks = sorted(rows, key=int)
    values = [rows[k]["top1"] for k in ks]
    ax.errorbar([int(k) for k in ks], [100 * v for v in values], capsize=3, marker="o", label=kind,
                yerr=_error_bars(values, [rows[k].get("top1_interval") for k in ks]))
  ax.set_xscale("log")
  ks = sorted({int(k) for _, s in _feature_sections(document) for k in (s.get("knn") or {})})
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.minorticks_off()
  ax.set_xlabel("neighbours k")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Weighted kNN accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_probe(document: dict[str, Any], path: Path) -> Path:
  """Linear-probe top-1 per feature kind, with bootstrap error bars."""
  plt = _pyplot()
  sections = [(kind, s["probe"]) for kind, s in _feature_sections(document) if s.get("probe")]
  values = [probe["top1"] for _, probe in sections]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(sections) + 2), 4.0))
  errors = _error_bars(values, [probe.get("top1_interval") for _, probe in sections])
  ax.bar(range(len(sections)), [100 * v for v in values], 0.6, yerr=errors,
         capsize=4 if errors is not None else 0)
  ax.set_xticks(range(len(sections)), [kind for kind, _ in sections])
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Linear probe accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_fewshot(document: dict[str, Any], path: Path) -> Path:
  """Few-shot top-1 against N per class: probe and centroid per feature kind, mean +- std."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for kind, section in _feature_sections(document):
    rows = section.get("fewshot") or {}
    shots = sorted(rows, key=int)
    for method, style in (("probe", "-o"), ("centroid", "--s")):
      if shots:
        ax.errorbar([int(n) for n in shots], [100 * rows[n][method]["mean"] for n in shots],
                    yerr=[100 * rows[n][method]["std"] for n in shots], fmt=style, capsize=3,
                    label=f"{kind} {method}")
  ax.set_xscale("log", base=2)
  shots = sorted({int(n) for _, s in _feature_sections(document) for n in (s.get("fewshot") or {})})
  ax.set_xticks(shots, [str(n) for n in shots])
  ax.minorticks_off()
  ax.set_xlabel("training images per class")
  ax.set_ylabel("top-1 accuracy (%), mean ± std")
  ax.set_ylim(0, 100)
  ax.set_title("Few-shot accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_evaluation_report(document: dict[str, Any], out: Path) -> list[Path]:
  out.mkdir(parents=True, exist_ok=True)
  written, images = [], []
  for key, plot in (("knn", plot_knn), ("probe", plot_probe), ("fewshot", plot_fewshot)):
    if document.get(key):
      written.append(plot(document, out / f"{key}.png"))
      images.append(f"![{key}]({key}.png)")
  train, test = document.get("train") or {}, document.get("test") or {}
  parts = [label for key, label in (("knn", "kNN"), ("probe", "linear-probe"),
                                    ("fewshot", "few-shot")) if document.get(key)]
  title = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
  title = title if title.startswith("kNN") else title[0].upper() + title[1:]
  text = [f"# {title} report", "",
          f"Features: {document.get('features', '–')}; train {train.get('source', '–')} "
          f"({train.get('images', '–')} images, {train.get('classes', '–')} classes), test "
          f"{test.get('source', '–')} ({test.get('images', '–')} images).", "",
          evaluation_tables(document), *images, ""]
  report = out / "report.md"
  report.write_text("\n".join(text))
  return [report, *written]


def write_report(document: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
  """Writes report.md and the plots: for zero-shot results accuracy.png and one confusion-matrix
  PNG per task and method; for kNN / probe results knn.png, probe.png, fewshot.png."""
  out = Path(out_dir)
  if any(document.get(s) for s in EVALUATION_SECTIONS):
    return write_evaluation_report(document, out)
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
  if document.get("differences"):
    text += [differences_table(document["differences"]), ""]
  if document.get("retrieval"):
    text += [retrieval_table(document["retrieval"]), ""]
  if confusion_links:
    text += ["## Confusion matrices", "", *confusion_links, ""]
  report = out / "report.md"
  report.write_text("\n".join(text))
  return [report, *written]
