"""`agriclip report --results results.json --out DIR`: markdown tables and PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--results", type=Path, required=True, help="results JSON from `agriclip zeroshot`, `knn` or `probe` (or the demo's rows.json)")
  parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import report
  written = report.write_report(report.load_results(args.results), args.out)
  confusions = sum(1 for p in written if p.parent.name == "confusion")
  print(f"[report] {len(written)} files -> {args.out}: " + ", ".join(
      p.name for p in written if p.parent == args.out) + f", {confusions} confusion matrices")
  return 0
