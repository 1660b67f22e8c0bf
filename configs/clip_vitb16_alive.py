"""Stage 1: CLIP ViT-B/16 fine-tuned contrastively on ALive image-caption pairs.

The reference recipe: start from OpenAI's weights, symmetric InfoNCE, AdamW, 30 epochs.
Give the converted OpenAI model directory (`agriclip convert ... --dst-format flax`) and the
captioned data:

  agriclip train --config configs/clip_vitb16_alive.py --workdir W \\
      --config.clip.init_from=models/openai-vitb16 --config.data.source=alive.jsonl
"""

from agriclip_jax.train.config import default_config

ALIVE_IMAGES = 600_000  # approximate size of ALive; set steps from your own data if different
EPOCHS = 30


def get_config(arg: str | None = None):
  del arg
  c = default_config()
  c.kind = "contrastive"
  c.batch_size = 256
  c.total_steps = EPOCHS * ALIVE_IMAGES // c.batch_size
  c.log_every_steps = 50
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.dtype = "bfloat16"
  c.data.source = ""  # required: a manifest, folder, tar shards, ArrayRecord or tfds:NAME
  c.data.image_size = 224
  c.data.context_length = 77
  c.data.num_workers = 8
  c.clip.variant = "ViT-B/16"
  c.clip.loss = "infonce"
  c.clip.sharded_loss = True
  c.clip.optimizer.update(dict(name="adamw", lr=1e-5, min_lr=0.0, warmup_steps=500,
                               weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6))
  return c
