"""`agriclip data inspect SOURCE`: read a source through the real pipeline and report on it.

Every record goes through the same checks and decoding as training (input_pipeline.pipeline's
check_and_decode, in Grain, optionally with worker processes). Printed: records read, records
skipped by reason with a few paths each, caption length statistics, image sizes, images/s and
the host CPU milliseconds per image of each training view (the CLIP view and the DINO multi-crop,
at the default 224 px recipes) for each placement of its augmentation (`data.augment_on`): "host"
renders it with PIL, "device" only decodes small and draws the crop plans (the rendering is the
accelerator's), measured by input_pipeline.host_decode.view_costs on the first --view-cost good
records. With --json, one JSON object: {"read": N, "skipped": {reason: count}, "images_per_sec":
X, "host_cpu_ms_per_image": {"images": n, "clip": {"host": ms, "device": ms}, "dino": {...}}, ...}.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  inspect = sub.add_parser("inspect", help="read every record of SOURCE and report")
  inspect.add_argument("source", help="ImageFolder dir, .csv/.tsv, .jsonl, .tar / shard dir / pattern, "
                                      ".array_record, or tfds:NAME[:SPLIT]")
  inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  inspect.add_argument("--limit", type=int, default=0, help="read only the first N records (0 = all)")
  inspect.add_argument("--examples", type=int, default=3, help="example paths shown per skip reason")
  inspect.add_argument("--num-workers", type=int, default=0, help="Grain worker processes")
  inspect.add_argument("--image-column", default=None, help="CSV image column (default filepath)")
  inspect.add_argument("--caption-column", default=None, help="CSV caption column (default title)")
  inspect.add_argument("--label-column", default=None, help="CSV label column")
  inspect.add_argument("--key-column", default=None, help="CSV key column (default: the image path)")
  inspect.add_argument("--data-dir", default=None, help="TFDS data_dir")
  inspect.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")
  inspect.add_argument("--max-caption-chars", type=int, default=None, help="longest caption accepted")
  inspect.add_argument("--no-captions", action="store_true", help="do not require captions (image-only data)")
  inspect.add_argument("--view-cost", type=int, default=16, metavar="N",
                       help="measure the host CPU-ms per image of each view and placement on the "
                            "first N good records (default 16; 0 = skip)")


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
  options = {"image_column": args.image_column, "caption_column": args.caption_column,
             "label_column": args.label_column, "key_column": args.key_column}
  options = {k: v for k, v in options.items() if v is not None}
  if args.data_dir is not None:
    options["data_dir"] = args.data_dir
  return options


@dataclasses.dataclass(frozen=True)
class _Inspect:
  """Grain map: index -> what inspection needs to know about the record (no pixels kept)."""
  source: Any
  checks: Any

  def __call__(self, index: int) -> dict[str, Any]:
    from input_pipeline.pipeline import check_and_decode
    from input_pipeline.transforms import BadRecord
    record = self.source[int(index)]
    try:
      image, captions = check_and_decode(record, self.checks)
    except BadRecord as bad:
      return {"reason": bad.reason, "path": record["path"]}
    return {"reason": None, "index": int(index), "caption_chars": [len(c) for c in captions],
            "caption_words": [len(c.split()) for c in captions], "size": image.size,
            "label": record["label"]}


def inspect_source(source: Any, checks: Any, limit: int = 0, num_workers: int = 0,
                   examples_per_reason: int = 3, view_cost_records: int = 0) -> dict[str, Any]:
  """The report above; `view_cost_records` > 0 adds "host_cpu_ms_per_image" (None when no record
  was good)."""
  import grain
  from input_pipeline.pipeline import BadRecordStats, _worker_processes
  count = len(source) if limit <= 0 else min(limit, len(source))
  dataset = grain.MapDataset.range(count).map(_Inspect(source, checks)).to_iter_dataset(
      grain.ReadOptions(num_threads=2))
  dataset = _worker_processes(dataset, num_workers)
  stats = BadRecordStats(examples_per_reason=examples_per_reason)
  caption_chars, caption_words, widths, heights = [], [], [], []
  labels: collections.Counter = collections.Counter()
  good: list[int] = []
  start = time.perf_counter()
  for item in dataset:
    if item["reason"] is not None:
      stats.add_bad(item["reason"], item["path"])
      continue
    stats.add_good()
    caption_chars += item["caption_chars"]
    caption_words += item["caption_words"]
    widths.append(item["size"][0])
    heights.append(item["size"][1])
    labels[item["label"]] += 1
    good.append(item["index"])
  seconds = time.perf_counter() - start
  read = stats.seen - stats.skipped

  def summary(values: list[int]) -> dict[str, float] | None:
    return None if not values else {"min": int(np.min(values)), "mean": round(float(np.mean(values)), 2),
                                    "max": int(np.max(values))}

  return {
      "read": read,
      "skipped": dict(sorted(stats.counts.items())),
      "images_per_sec": round(stats.seen / seconds, 2) if seconds > 0 else 0.0,
      "records": stats.seen,
      "examples": {reason: paths for reason, paths in sorted(stats.examples.items())},
      "caption_chars": summary(caption_chars),
      "caption_words": summary(caption_words),
      "width": summary(widths),
      "height": summary(heights),
      "labels": {str(k): v for k, v in sorted(labels.items())},
      **({"host_cpu_ms_per_image": _view_costs(source, sorted(good)[:view_cost_records])}
         if view_cost_records > 0 else {}),
  }


def _view_costs(source: Any, indices: list[int]) -> dict[str, Any] | None:
  """{"images": n, "clip": {"host": ms, "device": ms}, "dino": {...}} over these records."""
  if not indices:
    return None
  from input_pipeline.host_decode import view_costs
  return {"images": len(indices), **view_costs([source[i] for i in indices])}


def _print_text(spec: str, kind: str, report: dict[str, Any]) -> None:
  skipped = sum(report["skipped"].values())
  print(f"source: {spec} ({kind}, {report['records']} records)")
  print(f"read: {report['read']}")
  share = 100 * skipped / report["records"] if report["records"] else 0.0
  print(f"skipped: {skipped} ({share:.2f}%)")
  for reason, count in report["skipped"].items():
    print(f"  {reason}: {count}  e.g. {', '.join(report['examples'].get(reason, []))}")
  for name in ("caption_chars", "caption_words", "width", "height"):
    if report[name]:
      values = report[name]
      print(f"{name.replace('_', ' ')}: min {values['min']}, mean {values['mean']}, max {values['max']}")
  print(f"images/s: {report['images_per_sec']}")
  costs = report.get("host_cpu_ms_per_image")
  if costs:
    from input_pipeline.transforms import ClipViewConfig, MultiCropConfig
    clip, crops = ClipViewConfig(), MultiCropConfig()
    print(f"host CPU ms per image ({costs['images']} images; host: decode + PIL view, device: "
          f"reduced decode + crop plans):")
    print(f"  CLIP view {clip.size} px: host {costs['clip']['host']}, device {costs['clip']['device']}")
    print(f"  DINO multi-crop 2x{crops.global_size} + {crops.num_local}x{crops.local_size}: "
          f"host {costs['dino']['host']}, device {costs['dino']['device']}")


def run(args: argparse.Namespace) -> int:
  from input_pipeline.pipeline import RecordChecks
  from input_pipeline.sources import open_source
  checks = RecordChecks(need_captions=not args.no_captions)
  overrides = {"max_pixels": args.max_pixels, "max_caption_chars": args.max_caption_chars}
  checks = dataclasses.replace(checks, **{k: v for k, v in overrides.items() if v is not None})
  source = open_source(args.source, **_source_options(args))
  report = inspect_source(source, checks, args.limit, args.num_workers, args.examples,
                          args.view_cost)
  if args.json:
    print(json.dumps(report))
  else:
    _print_text(args.source, type(source).__name__, report)
  if report["records"] and not report["read"]:
    # Nothing usable: the summary above says why; a script must not take this for a good source.
    print(f"agriclip data: error: {args.source}: none of its {report['records']} records could "
          f"be read", file=sys.stderr)
    return 2
  return 0
