"""Stage 2: DINO ViT-S/16 self-distillation on ALive images, facebookresearch/dino's defaults.

out_dim 65536 with the last-layer norm fixed, teacher momentum 0.996 -> 1 (cosine), teacher
temperature 0.04 (README's boosted setting 0.04 -> 0.07 over 30 epochs: set
dino.teacher_temp=0.07 and dino.warmup_teacher_temp_epochs=30), student temperature 0.1, AdamW
lr 5e-4 * batch / 256 with 10 warm-up epochs and cosine to 1e-6, weight decay 0.04 -> 0.4,
per-parameter gradient clip 3.0, last layer frozen for 1 epoch, drop-path 0.1, 100 epochs,
2 global crops of 224 and 8 local crops of 96.

  agriclip train --config configs/dino_vits16_alive.py --workdir W --config.data.source=alive/
"""

from agriclip_jax.train.config import default_config

ALIVE_IMAGES = 600_000
EPOCHS = 100
WARMUP_EPOCHS = 10


def get_config(arg: str | None = None):
  del arg
  c = default_config()
  c.kind = "dino"
  c.batch_size = 512  # 64 per GPU on 8 GPUs
  steps_per_epoch = ALIVE_IMAGES // c.batch_size
  c.total_steps = EPOCHS * steps_per_epoch
  c.log_every_steps = 50
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.dtype = "bfloat16"
  c.data.source = ""
  c.data.global_crop_size = 224
  c.data.local_crop_size = 96
  c.data.n_local_crops = 8
  c.data.num_workers = 8
  c.dino.update(dict(variant="ViT-S/16", out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
                     norm_last_layer=True, drop_path_rate=0.1, teacher_momentum=0.996,
                     teacher_momentum_end=1.0, teacher_temp=0.04, warmup_teacher_temp=0.04,
                     warmup_teacher_temp_epochs=0, student_temp=0.1, centre_momentum=0.9,
                     freeze_last_layer_epochs=1))
  c.dino.optimizer.update(dict(name="adamw", lr=5e-4 * c.batch_size / 256, min_lr=1e-6,
                               warmup_steps=WARMUP_EPOCHS * steps_per_epoch, weight_decay=0.04,
                               weight_decay_end=0.4, clip_per_param_norm=3.0))
  return c
