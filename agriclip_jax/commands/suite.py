"""`agriclip suite`: pin a suite's data, or check data against a pin.

  agriclip suite pin SUITE.json --out PINNED.json   # hash every record each task evaluates
  agriclip suite check PINNED.json                  # the data still equal to the pin?

A pinned suite is accepted wherever a suite is (`agriclip zeroshot --suite PINNED.json`): the
evaluation checks each task's data against the pin before any model runs and writes the suite's
hash into its results. See `agriclip_jax.suite_pin` for the file's contents.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agriclip_jax import fileio


def add_arguments(parser: argparse.ArgumentParser) -> None:
  actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
  pin = actions.add_parser("pin", help="record the content hash of every record of each task")
  pin.add_argument("suite", type=Path, help="suite file (or a pinned suite, to pin it again)")
  pin.add_argument("--out", type=fileio.resolve_path, required=True, help="pinned suite JSON")
  check = actions.add_parser("check", help="compare each task's data with its pin")
  check.add_argument("suite", type=Path, help="pinned suite file")


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import suite_pin, tasks
  suite = tasks.read_suite(args.suite)
  if args.action == "check":
    if suite.hash is None:
      raise ValueError(f"{args.suite} is a suite file, not a pinned one: nothing to check against "
                       f"(agriclip suite pin {args.suite} --out PINNED.json)")
    suite_pin.check_suite(suite)
    print(f"[suite] {len(suite.entries)} task(s) equal to the pin {suite.hash[:16]} ({args.suite})")
    return 0
  fileio.check_writable(args.out)
  document = suite_pin.pin_suite(suite, args.out)
  fileio.atomic_write_json(args.out, document, indent=1)
  print(f"[suite] pinned {len(document['pins'])} task(s), hash {document['hash']} -> {args.out}")
  return 0
