"""`agriclip train --config configs/X.py[:arg] --workdir W [--config.key=value ...]`.

The config file defines `get_config(arg)` returning an ml_collections ConfigDict. Overrides
`--config.a.b=value` (or `--config.a.b value`) may only change keys that exist: a typo is an error
that names the key and the closest existing ones. Values are parsed as Python literals
(numbers, True/False, None, tuples, quoted strings); anything else is taken as a string.

Several processes (one per host): `--coordinator HOST:PORT --num-processes N --process-id I`, or
the environment (SLURM, Cloud TPU pod slices) -- see `agriclip_jax.train.multihost`.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
from typing import Any

OVERRIDE_PREFIX = "--config."


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--workdir", required=True,
                      help="checkpoints, metrics and models go here (a folder or a gs:// URL)")
  parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--cpu-collectives", default=None, choices=("gloo", "mpi"),
                      help="collectives for multi-process CPU runs (tests)")
  parser.epilog = "Any config key can be overridden with --config.KEY=VALUE (e.g. --config.total_steps=10)."


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """The flags above plus any number of --config.KEY=VALUE overrides (see `agriclip_jax.cli`)."""
  known, extra = parser.parse_known_args(argv)
  overrides: list[tuple[str, str]] = []
  index = 0
  while index < len(extra):
    item = extra[index]
    if not item.startswith(OVERRIDE_PREFIX):
      parser.error(f"unrecognized argument {item!r} (config overrides look like "
                   f"{OVERRIDE_PREFIX}KEY=VALUE)")
    if "=" in item:
      key, value = item[len(OVERRIDE_PREFIX):].split("=", 1)
    else:
      if index + 1 >= len(extra):
        parser.error(f"{item} needs a value")
      key, value = item[len(OVERRIDE_PREFIX):], extra[index + 1]
      index += 1
    overrides.append((key, value))
    index += 1
  known.overrides = overrides
  return known


# ----------------------------------------------------------------------------------------------
# Config loading and overrides
# ----------------------------------------------------------------------------------------------

def load_config_file(spec: str):
  """`path.py[:arg]` -> get_config(arg), locked so that new keys cannot appear."""
  from agriclip_jax.train.config import load_config_file as load
  return load(spec)


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config, key: str, text: str) -> None:
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    existing = list(node.keys()) if hasattr(node, "keys") else []
    if part not in existing:
      where = ".".join(parts[:depth]) or "config"
      close = difflib.get_close_matches(part, existing, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise KeyError(f"--config.{key}: {where} has no key {part!r}{hint}")
    if depth < len(parts) - 1:
      node = node[part]
  value = _parse_value(text)
  current = node[parts[-1]]
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as err:
    raise ValueError(f"--config.{key}={text!r}: {err}") from err


def build_config(spec: str, overrides: list[tuple[str, str]]):
  config = load_config_file(spec)
  for key, text in overrides:
    apply_override(config, key, text)
  return config


def run(args: argparse.Namespace) -> int:
  from agriclip_jax.fileio import resolve_path
  from agriclip_jax.train import multihost
  config = build_config(args.config, getattr(args, "overrides", []))
  multihost.initialize(args.coordinator, args.num_processes, args.process_id,
                       initialization_timeout=config.distributed.initialization_timeout,
                       heartbeat_timeout_seconds=config.distributed.heartbeat_timeout_seconds,
                       cpu_collectives=args.cpu_collectives)
  from agriclip_jax.train.loop import train
  try:
    last = train(config, args.workdir)
  except KeyboardInterrupt:
    # A second Ctrl-C: stopped at once. Orbax commits a step by renaming its finished temporary
    # directory, so a save cut short here is never restored.
    print(f"agriclip train: interrupted: stopped at once by a second Ctrl-C; resuming restores "
          f"the newest complete checkpoint in {resolve_path(args.workdir) / 'checkpoints'}",
          file=sys.stderr, flush=True)
    return 130
  # Ctrl-C (after its checkpoint) exits as shells expect of an interrupted command, so that
  # `agriclip train ... && agriclip align ...` does not go on; a preemption's SIGTERM exits 0.
  return 130 if last.get("stopped_by") == "SIGINT" else 0


if __name__ == "__main__":
  from agriclip_jax.cli import main
  sys.exit(main(["train"] + sys.argv[1:]))
