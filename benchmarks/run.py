"""One entry point for every benchmark: `python -m benchmarks [--quick] [--only NAME ...]`.

Each benchmark is a module `benchmarks/bench_NAME.py` with `main(quick: bool)` printing one line per
figure (`FIGURE: value unit (details)`). Each runs in its own process so that thread settings,
XLA flags and memory of one cannot colour another's figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
  return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
  parser.add_argument("--only", nargs="*", default=None, help=f"subset of: {', '.join(available())}")
  args = parser.parse_args(argv)
  names = args.only or available()
  unknown = sorted(set(names) - set(available()))
  if unknown:
    parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(available())}")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  failed = []
  print(f"# agriclip-jax benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs"
        f"{' (quick)' if args.quick else ''}", flush=True)
  for name in names:
    print(f"## {name}", flush=True)
    code = (f"import benchmarks.bench_{name} as b; b.main(quick={args.quick})")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE.parent)
    if result.returncode:
      failed.append(name)
      print(f"## {name} FAILED (exit {result.returncode})", flush=True)
  if failed:
    print(f"# failed: {', '.join(failed)}")
  return 1 if failed else 0
