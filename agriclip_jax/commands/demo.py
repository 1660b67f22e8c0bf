"""`agriclip demo`: the whole AgriCLIP pipeline offline (see agriclip_jax/demo.py for the stages).

    agriclip demo --workdir W [--quick]                       generated ALive-synth data
    agriclip demo --workdir W --data IMAGEFOLDER_OR_MANIFEST [--metadata META.json]
                  --eval IMAGEFOLDER [--eval ...] [--holdout 0.5]   your own photos
    [--config configs/demo.py[:default|quick|real|real_quick]] [--config.KEY=VALUE ...]

Writes W/report.md (+ PNGs), W/results.json, W/timings.json, W/models/ (model directories) and
W/export/ (PyTorch files). Training is `agriclip train`'s loop in W (W/checkpoints,
W/metrics.jsonl, W/tensorboard): a demo stopped mid-training resumes when run again.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", type=Path, required=True, help="output folder")
  parser.add_argument("--quick", action="store_true",
                      help="test-size run (config arg quick, or real_quick with --data)")
  parser.add_argument("--config", default=None,
                      help="config file[:arg] (default: configs/demo.py, arg default / real)")
  parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
  parser.add_argument("--data", default=None,
                      help="your training images: an ImageFolder (captioned from --metadata or the "
                           "class folder names) or a captioned manifest (.jsonl/.csv/shards)")
  parser.add_argument("--metadata", default=None, help="class metadata JSON for the captions "
                      "(see agriclip_jax/prompts.py; e.g. configs/corn_metadata.json)")
  parser.add_argument("--eval", dest="evals", action="append", default=[], metavar="IMAGEFOLDER",
                      help="a zero-shot task over its class folders (repeatable)")
  parser.add_argument("--holdout", type=float, default=0.0,
                      help="hold this fraction of an ImageFolder --data out of training and "
                           "evaluate it zero-shot as one more task (e.g. 0.5)")
  parser.add_argument("--no-export", action="store_true", help="skip the PyTorch exports")
  parser.epilog = ("Any config key can be overridden with --config.KEY=VALUE, as for `agriclip "
                   "train` (e.g. --config.train.total_steps=200).")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
  """The flags above plus --config.KEY=VALUE overrides: `agriclip train`'s one syntax."""
  from agriclip_jax.commands.train import parse_arguments as parse_with_overrides
  return parse_with_overrides(parser, argv)


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import demo
  if not 0.0 <= args.holdout < 1.0:
    raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
  real = args.data is not None
  default_arg = ("real_quick" if args.quick else "real") if real else (
      "quick" if args.quick else "default")
  config = demo.load_config(args.config or str(demo.DEFAULT_CONFIG), default_arg)
  if args.seed is not None:
    config.seed = args.seed
    config.train.seed = args.seed
  from agriclip_jax.commands.train import apply_override
  for key, text in args.overrides:
    apply_override(config, key, text)
  options = demo.DemoOptions(args.workdir, args.data, args.metadata, tuple(args.evals),
                             args.holdout, export=not args.no_export)
  import sys
  try:
    demo.run_demo(options, config)
  except demo.TrainingStopped as stopped:
    # The pipeline did not finish: the shell's status for the signal, so that `./run.sh && ...`
    # does not go on. (Ctrl-C in another stage: the CLI's one line and 130.)
    print(f"agriclip demo: {stopped}", file=sys.stderr, flush=True)
    return stopped.exit_code
  return 0
