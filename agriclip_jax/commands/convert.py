"""`agriclip convert`: port weights between our Flax model directories and PyTorch layouts.

  agriclip convert --src openai_vitb16.pt --src-format openclip --model-name ViT-B-16-quickgelu \
                   --dst models/clip --dst-format flax
  agriclip convert --src models/clip --src-format flax --dst hf_clip --dst-format hf
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agriclip_jax.convert import registry
from input_pipeline.transforms import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
  readers, writers = registry.format_tables()
  parser.add_argument("--src", required=True, help="source file or directory")
  parser.add_argument("--src-format", required=True,
                      help=f"format of --src: {', '.join(sorted(readers))}")
  parser.add_argument("--dst", required=True, help="destination file or directory")
  parser.add_argument("--dst-format", required=True,
                      help=f"format of --dst: {', '.join(sorted(writers))}")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into an existing --dst directory that holds other files too, "
                           "replacing only the files this conversion writes (without it such a "
                           "directory is refused; a previous output of the same kind is replaced)")
  parser.add_argument("--preprocess", choices=PRESETS, default=None,
                      help="the eval view the written model records: openclip (CLIP sources' "
                           "default), hf-clip, agriclip-reference (DINO sources' default: shorter "
                           "side 224 bilinear, crop 224, ImageNet mean/std) or dino-eval (DINO's own "
                           "256 bicubic then crop 224)")
  parser.add_argument("--model-name", default=None,
                      help="open_clip model name for openclip sources, e.g. ViT-B-16 (exact GELU) or "
                           "ViT-B-16-quickgelu (OpenAI weights); decides activation and heads")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer for sources without one: OpenAI's bpe_simple_vocab_16e6.txt.gz "
                           "or an HF tokenizer directory (default: the copy in an installed "
                           "open_clip_torch package)")
  parser.add_argument("--allow-torchscript", action="store_true",
                      help="allow loading OpenAI's TorchScript archives (runs torch.jit.load)")
  dino = parser.add_argument_group("DINO formats (dino-vit, dino-rn50, dino-checkpoint, timm-dino-vit)")
  dino.add_argument("--which", choices=("teacher", "student"), default="teacher",
                    help="dino-checkpoint: which network to read (DINO evaluates the teacher)")
  dino.add_argument("--part", choices=("full", "backbone"), default="full",
                    help="dino-checkpoint: backbone + projection head, or the backbone only")
  dino.add_argument("--heads", type=int, default=None,
                    help="attention heads of a DINO ViT (not stored in its files; default width/64)")
  dino.add_argument("--depth", type=int, default=None,
                    help="dino-rn50: the ResNet depth expected (default 50); another depth is an error")
  dino.add_argument("--drop-fc", action="store_true",
                    help="dino-rn50: accept and drop a classifier `fc` (torchvision ImageNet weights)")
  dino.add_argument("--drop-classifier", action="store_true",
                    help="timm-dino-vit: accept and drop a classifier `head.*`")


def run(args: argparse.Namespace) -> int:
  from agriclip_jax import fileio
  src, dst = Path(args.src), Path(args.dst)
  if dst.exists() and src.exists() and dst.resolve() == src.resolve():
    raise ValueError(f"--dst {dst} is the source itself; write the conversion somewhere else")
  directory = args.dst_format in registry.DIRECTORY_FORMATS
  fileio.check_writable(dst, directory=directory, marker=None if args.overwrite else "config.json")
  options = {"model_name": args.model_name, "tokenizer": args.tokenizer,
             "allow_torchscript": args.allow_torchscript, "which": args.which, "part": args.part,
             "heads": args.heads, "depth": args.depth, "drop_fc": args.drop_fc,
             "drop_classifier": args.drop_classifier, "overwrite": args.overwrite,
             "preprocess": args.preprocess}
  model = registry.convert(args.src, args.src_format, args.dst, args.dst_format, options)
  print(f"converted {args.src} ({args.src_format}) -> {args.dst} ({args.dst_format}): "
        f"model_type {model.model_type}")
  if args.dst_format == "openclip" and model.model_type == "clip":
    from agriclip_jax.convert.clip_formats import openclip_model_name
    from agriclip_jax.models.configs import CLIPConfig
    name = openclip_model_name(CLIPConfig.from_dict(model.config))
    if name is not None:
      print(f"load it with open_clip.create_model({name!r}) and load_state_dict(..., strict=True)")
  return 0
