"""Stages 1 and 2 in one pass over the data: CLIP ViT-B/16 (InfoNCE) and DINO ViT-S/16
(self-distillation) updated from the same batch in one jitted step, each with its own optimizer.

  agriclip train --config configs/joint_vitb16_alive.py --workdir W \\
      --config.clip.init_from=models/openai-vitb16 --config.data.source=alive.jsonl
"""

import importlib.util
from pathlib import Path


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg: str | None = None):
  del arg
  clip, dino = _load("clip_vitb16_alive"), _load("dino_vits16_alive")
  c = clip
  c.kind = "joint"
  c.batch_size = 256
  c.dino = dino.dino
  c.data.global_crop_size = dino.data.global_crop_size
  c.data.local_crop_size = dino.data.local_crop_size
  c.data.n_local_crops = dino.data.n_local_crops
  steps_per_epoch = 600_000 // c.batch_size
  c.total_steps = 30 * steps_per_epoch  # the CLIP recipe's length; DINO schedules follow it
  c.dino.optimizer.lr = 5e-4 * c.batch_size / 256
  c.dino.optimizer.warmup_steps = 10 * steps_per_epoch
  return c
