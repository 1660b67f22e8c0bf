"""DINO ResNet-50 on ALive: the recipe of the released AgriCLIP DINO backbone (`dino_pretrain.pth`).

`configs/dino_rn50_alive.py[:sgd|lars] --config.data.source=ALIVE_MANIFEST`

Numbers from facebookresearch/dino's ResNet-50 command (README) and the args of its released RN50
run: SGD (momentum 0.9) lr 0.03 per 256 images scaled linearly with the batch, 10 warm-up epochs,
cosine to 1e-6; weight decay 1e-4 constant; per-parameter gradient-norm clip 3.0; global crops
RandomResizedCrop 224 scale (0.14, 1), 8 local crops 96 scale (0.05, 0.14); head out_dim 65536,
no BN in the head, norm_last_layer, last layer frozen for the first epoch; teacher momentum 0.996
-> 1, teacher temperature 0.04; 100 epochs of 64 images per GPU on 8 GPUs. `:lars` swaps SGD for
LARS with the same learning rate (DINO's `--optimizer lars`).

The backbone is `agriclip_jax.models.resnet` (torchvision layout; BatchNorm statistics over the
global batch under jit, which is DINO's SyncBatchNorm). As in main_dino.py the teacher stays in
train mode: it normalises with batch statistics and keeps its own running statistics (the EMA covers
parameters only); both sets are in the train state and checkpoints (`batch_stats`,
`teacher_batch_stats`). Drop-path does not apply to a ResNet. The finished run writes the teacher to
W/models/dino; `agriclip convert --src W/models/dino --src-format flax --dst rn50.pth
--dst-format dino-rn50` exports its backbone as a torchvision state dict (like `dino_pretrain.pth`).
"""

from agriclip_jax.train.config import default_config, optimizer_config

ALIVE_IMAGES = 600_000  # ~600k images in ALive (the paper); set total_steps for your copy.
EPOCHS = 100
GLOBAL_BATCH = 512  # 8 x 64, DINO's RN50 run
STEPS_PER_EPOCH = ALIVE_IMAGES // GLOBAL_BATCH
BASE_LR = 0.03  # per 256 images (DINO scales lr * batch / 256)


def get_config(arg: str = "sgd"):
  optimizers = ("sgd", "lars")
  if arg not in optimizers:
    raise ValueError(f"configs/dino_rn50_alive.py:{arg}: expected one of {optimizers}")
  c = default_config()
  c.kind = "dino"
  c.batch_size = GLOBAL_BATCH
  c.total_steps = EPOCHS * STEPS_PER_EPOCH
  c.log_every_steps = 100
  c.checkpoint_every_steps = STEPS_PER_EPOCH
  c.dtype = "bfloat16"

  c.data.source = "toy"  # replace with the ALive manifest: --config.data.source=PATH
  c.data.global_crop_size = 224
  c.data.local_crop_size = 96
  c.data.n_local_crops = 8
  # The ResNet crop scales (the ViT recipe uses (0.4, 1) / (0.05, 0.4)).
  c.data.global_crop_scale = (0.14, 1.0)
  c.data.local_crop_scale = (0.05, 0.14)

  c.dino.variant = "resnet50"
  c.dino.out_dim = 65536
  c.dino.hidden_dim = 2048
  c.dino.bottleneck_dim = 256
  c.dino.norm_last_layer = True
  c.dino.drop_path_rate = 0.0
  c.dino.teacher_momentum = 0.996
  c.dino.teacher_momentum_end = 1.0
  c.dino.teacher_temp = 0.04
  c.dino.warmup_teacher_temp = 0.04
  c.dino.warmup_teacher_temp_epochs = 0
  c.dino.student_temp = 0.1
  c.dino.centre_momentum = 0.9
  c.dino.freeze_last_layer_epochs = 1
  c.dino.optimizer = optimizer_config(
      name=arg, lr=BASE_LR * GLOBAL_BATCH / 256, min_lr=1e-6, warmup_steps=10 * STEPS_PER_EPOCH,
      weight_decay=1e-4, weight_decay_end=1e-4, momentum=0.9, clip_per_param_norm=3.0)
  return c
