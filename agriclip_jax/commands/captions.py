"""`agriclip captions`: an ImageFolder + class metadata -> an ALive-style captioned JSONL manifest.

    agriclip captions --images DIR --metadata META.json --out manifest.jsonl [--variants K] [--seed S]
                      [--llm-base-url URL --llm-model NAME [--llm-key-env VAR] [--llm-cache DIR]]

Each line: {"image": path relative to the manifest, "captions": [K captions], "label", "key",
"class_name"}; the first caption is the class's base caption, the others paraphrases chosen per
image from (seed, key). Without --llm-* flags the paraphrases come from the offline bank in
agriclip_jax.prompts; with them, from one LLM request per class (cached), validated, and topped up
from the bank where the model's answers fail. The key is read from the environment variable named by
--llm-key-env and never printed or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax import fileio, prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--images", required=True, type=Path, help="ImageFolder root: DIR/<class>/<image>")
  parser.add_argument("--metadata", required=True, type=Path, help="dataset metadata JSON (see agriclip_jax.prompts)")
  parser.add_argument("--out", required=True, type=Path, help="output manifest (.jsonl)")
  parser.add_argument("--variants", type=int, default=4, help="captions per image (first = base caption)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the per-image choice of paraphrases")
  parser.add_argument("--llm-base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
  parser.add_argument("--llm-model", default=None, help="model name sent to the endpoint")
  parser.add_argument("--llm-key-env", default="OPENAI_API_KEY",
                      help="environment variable holding the API key (the key itself is never a flag)")
  parser.add_argument("--llm-cache", type=Path, default=None,
                      help="cache directory for LLM answers (default: <out dir>/.llm_cache)")
  parser.add_argument("--llm-timeout", type=float, default=30.0, help="seconds per request")
  parser.add_argument("--llm-retries", type=int, default=3, help="retries on timeouts, 429 and 5xx")
  parser.add_argument("--llm-backoff", type=float, default=1.0, help="first retry delay in s (doubles each time)")
  parser.add_argument("--llm-pool", type=int, default=0,
                      help="paraphrases requested per class (default: max(8, 2 x variants))")


def _paraphrase_pools(metadata: prompts.DatasetMetadata, args: argparse.Namespace) -> dict[str, list[str]]:
  """class name -> validated LLM paraphrases (empty without an LLM or when it fails)."""
  if not args.llm_base_url:
    return {cls.name: [] for cls in metadata.classes}
  if not args.llm_model:
    raise ValueError("--llm-base-url needs --llm-model")
  from agriclip_jax.llm_paraphrase import LLMParaphraser
  paraphraser = LLMParaphraser(
      base_url=args.llm_base_url, model=args.llm_model, key_env=args.llm_key_env,
      cache_dir=args.llm_cache or args.out.parent / ".llm_cache", timeout_s=args.llm_timeout,
      max_retries=args.llm_retries, backoff_s=args.llm_backoff)
  pool_size = args.llm_pool or max(8, 2 * args.variants)
  pools = {}
  for cls in metadata.classes:
    others = [c.readable for c in metadata.classes if c.name != cls.name]
    pools[cls.name] = paraphraser.paraphrases(prompts.base_caption(metadata, cls), cls.readable, others, pool_size)
  print(f"LLM: {json.dumps(dict(sorted(paraphraser.stats.items())))}", file=sys.stderr)
  return pools


def image_captions(metadata: prompts.DatasetMetadata, cls: prompts.ClassMetadata, pool: list[str],
                   variants: int, seed: int, key: str) -> list[str]:
  """Base caption + (variants - 1) paraphrases: from the LLM pool first, then the template bank."""
  bank = prompts.template_variants(metadata, cls, variants, seed, key)
  if not pool:
    return bank
  rng = np.random.default_rng([seed, prompts.stable_hash(key), 1])
  chosen = [pool[i] for i in rng.permutation(len(pool))[:variants - 1]]
  return [bank[0], *chosen, *bank[1:variants - len(chosen)]]


def build_manifest_lines(images: Path, metadata: prompts.DatasetMetadata, pools: dict[str, list[str]],
                         variants: int, seed: int, manifest_dir: Path) -> list[dict[str, Any]]:
  from input_pipeline.sources import ImageFolderSource
  folder = ImageFolderSource(images, captions_for_class=lambda name: [])
  known = {c.name for c in metadata.classes}
  unknown = [name for name in folder.class_names if name not in known]
  if unknown:
    raise ValueError(f"class folder(s) {unknown} in {images} have no entry in metadata "
                     f"{metadata.name!r} (classes: {sorted(known)})")
  lines = []
  for index in range(len(folder)):
    entry = folder.entry(index)  # paths and keys only: images are not read here
    cls = metadata.class_by_name(folder.class_names[entry["label"]])
    lines.append({"image": os.path.relpath(entry["path"], manifest_dir),
                  "captions": image_captions(metadata, cls, pools[cls.name], variants, seed, entry["key"]),
                  "label": entry["label"], "key": entry["key"], "class_name": cls.name})
  return lines


def run(args: argparse.Namespace) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if args.variants < 1:
    print(f"error: --variants must be >= 1, got {args.variants}", file=sys.stderr)
    return 2
  try:
    metadata = prompts.load_metadata(args.metadata)
    pools = _paraphrase_pools(metadata, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = build_manifest_lines(args.images, metadata, pools, args.variants, args.seed,
                                 args.out.resolve().parent)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  fileio.atomic_write_jsonl(args.out, lines)
  llm_classes = sum(1 for pool in pools.values() if pool)
  print(f"wrote {len(lines)} images x {args.variants} captions to {args.out} "
        f"({len(metadata.classes)} classes, {llm_classes} with LLM paraphrases)")
  return 0
