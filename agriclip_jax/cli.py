"""The `agriclip` command: one subcommand per stage of the pipeline.

Each subcommand lives in its own module under `agriclip_jax.commands` and exposes
`add_arguments(parser)` and `run(args) -> int` (and optionally `parse_arguments(parser, argv)` when
it accepts more than argparse flags). The table below is the whole registry: a
subcommand's module is imported only when that subcommand runs, so a slow import (JAX, torch)
never delays `agriclip --help`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# name -> (module, one-line help). Order is the order of the data flow.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("agriclip_jax.commands.demo", "run the whole pipeline offline on generated data (or yours)"),
    "captions": ("agriclip_jax.commands.captions", "build an ALive-style captioned manifest from images + metadata"),
    "data": ("agriclip_jax.commands.data", "inspect a data source through the real input pipeline"),
    "train": ("agriclip_jax.commands.train", "train a stage (contrastive, dino, joint) from an ml_collections config"),
    "embed": ("agriclip_jax.commands.embed", "compute image/text embeddings of a model into an .npz"),
    "align": ("agriclip_jax.commands.align", "fit the linear DINO -> CLIP aligner"),
    "suite": ("agriclip_jax.commands.suite", "pin a suite's data (content hashes per task) or check data against a pin"),
    "zeroshot": ("agriclip_jax.commands.zeroshot", "zero-shot classification on downstream tasks"),
    "knn": ("agriclip_jax.commands.knn", "DINO's weighted kNN accuracy of image features (train vs test source)"),
    "probe": ("agriclip_jax.commands.probe", "linear probe and few-shot (probe, class centroids) on image features"),
    "predict": ("agriclip_jax.commands.predict", "labels for your photos from a list of class names (zero-shot)"),
    "report": ("agriclip_jax.commands.report", "markdown tables and PNG plots from zeroshot, knn or probe results"),
    "convert": ("agriclip_jax.commands.convert", "convert weights between flax, HF, open_clip and DINO layouts"),
}


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="agriclip",
      description="AgriCLIP in JAX/Flax: train, align, evaluate and port vision-language models.")
  sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
  for name, (_, help_text) in SUBCOMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _build_parser()
  if not argv or argv[0] in ("-h", "--help"):
    parser.print_help()
    return 0
  name = argv[0]
  if name not in SUBCOMMANDS:
    parser.error(f"unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}")
  module_name, help_text = SUBCOMMANDS[name]
  exit_on_sigterm()
  module = importlib.import_module(module_name)
  sub_parser = argparse.ArgumentParser(prog=f"agriclip {name}", description=help_text)
  module.add_arguments(sub_parser)
  # A subcommand that takes free-form arguments (train's --config.KEY=VALUE) parses them itself.
  parse = getattr(module, "parse_arguments", None)
  args = parse(sub_parser, argv[1:]) if parse else sub_parser.parse_args(argv[1:])
  try:
    return int(module.run(args) or 0)
  except KeyboardInterrupt:
    # Ctrl-C outside what a command handles itself (train and demo save first): the shell's 130
    # and one line, not a traceback. Output files are written atomically, so none is half there.
    print(f"agriclip {name}: interrupted", file=sys.stderr)
    return 130
  except _expected_errors() as error:  # evaluated when an error arrives: sees what run() imported
    # Bad input, a full disk, bad data: the user's to fix. One line naming the problem, not a
    # traceback. Set AGRICLIP_DEBUG=1 to see where it came from.
    if os.environ.get("AGRICLIP_DEBUG"):
      raise
    print(f"agriclip {name}: error: {describe_error(error)}", file=sys.stderr)
    return 2


def exit_on_sigterm() -> None:
  """SIGTERM ends the command by raising SystemExit(143) instead of killing the process outright,
  so the cleanup of an interrupted write (fileio's temporaries) runs as it does on Ctrl-C.
  Training installs its own handler for the duration of the loop (save, then stop)."""
  def handler(signum, frame):
    del frame
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, handler)


def describe_error(error: BaseException) -> str:
  """An expected failure's message; an OSError from the system (it carries an errno) as
  "FILE: reason", e.g. "runs/x/results.json: No space left on device"."""
  if isinstance(error, KeyError) and error.args:
    return str(error.args[0])
  if isinstance(error, OSError) and error.errno is not None and error.strerror:
    files = [str(f) for f in (error.filename, error.filename2) if f is not None]
    return f"{' -> '.join(files)}: {error.strerror}" if files else error.strerror
  return str(error) or type(error).__name__


def _expected_errors() -> tuple[type[BaseException], ...]:
  """The failures the CLI reports as one line: bad values and files (ValueError, KeyError,
  OSError incl. disk full and read-only), and the project's own error types, which say what is
  wrong and where."""
  errors: list[type[BaseException]] = [ValueError, KeyError, OSError, ImportError]
  for module_name, class_name in (("input_pipeline.pipeline", "BadDataError"),
                                  ("agriclip_jax.train.loop", "NonFiniteLossError"),
                                  ("agriclip_jax.llm_paraphrase", "LLMError")):
    module = sys.modules.get(module_name)  # only what the subcommand imported can be raised
    if module is not None and hasattr(module, class_name):
      errors.append(getattr(module, class_name))
  return tuple(errors)
