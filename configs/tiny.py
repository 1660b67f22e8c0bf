"""Tiny models on generated data: `configs/tiny.py:contrastive|dino|joint|dino_resnet`.

`dino_resnet` is DINO with a ResNet-18 backbone (BatchNorm) at 32 px with a small head, trained
with SGD and the ResNet crop scales, as `configs/dino_rn50_alive.py` is at full size.

No input files; each trains in well under a minute on a CPU. Used by the tests and for quick
checks of the whole training path (sharding, checkpoints, resume, multi-host).
"""

from agriclip_jax.train.config import default_config
from agriclip_jax.testing.toy_data import TOY_CONTEXT_LENGTH, TOY_VOCAB_SIZE


def get_config(arg: str = "contrastive"):
  kinds = ("contrastive", "dino", "joint", "dino_resnet")
  if arg not in kinds:
    raise ValueError(f"configs/tiny.py:{arg}: expected one of {kinds}")
  c = default_config()
  c.kind = "dino" if arg == "dino_resnet" else arg
  c.batch_size = 16
  c.total_steps = 60
  c.log_every_steps = 5
  c.checkpoint_every_steps = 20
  c.keep_checkpoints = 2
  c.sharding.min_size = 2 ** 10
  c.fast_compile = True
  c.data.toy_records = 256
  c.data.image_size = 32
  c.data.context_length = TOY_CONTEXT_LENGTH
  c.data.global_crop_size = 32
  c.data.local_crop_size = 16
  c.data.n_local_crops = 2
  c.clip.variant = "tiny"
  c.clip.vocab_size = TOY_VOCAB_SIZE
  c.clip.optimizer.lr = 1e-3
  c.clip.optimizer.warmup_steps = 5
  c.clip.optimizer.weight_decay = 0.01
  c.dino.variant = "tiny"
  c.dino.out_dim = 64
  c.dino.hidden_dim = 64
  c.dino.bottleneck_dim = 16
  c.dino.teacher_temp = 0.04
  c.dino.optimizer.lr = 5e-5  # higher rates collapse this tiny DINO to uniform within ~50 steps
  c.dino.optimizer.warmup_steps = 5
  if arg == "dino_resnet":
    c.dino.variant = "resnet18"
    c.dino.drop_path_rate = 0.0
    c.data.global_crop_scale = (0.14, 1.0)
    c.data.local_crop_scale = (0.05, 0.14)
    c.dino.optimizer.name = "sgd"
    c.dino.optimizer.lr = 0.03 * c.batch_size / 256
    c.dino.optimizer.weight_decay = 1e-4
    c.dino.optimizer.weight_decay_end = 1e-4
    c.dino.optimizer.momentum = 0.9
  return c
