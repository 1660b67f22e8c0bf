"""`agriclip demo` sizes: `configs/demo.py[:default|quick|real|real_quick]`.

- default:    ALive-synth at 64 px, tiny CLIP + tiny DINO trained jointly on 2 CPU cores; the whole
              demo (data, training, features, aligner, zero-shot, report, export) in < 15 minutes.
- quick:      the same pipeline, smaller everything, for the end-to-end test (well under 2 minutes).
- real:       your own photos (`--data` / `--eval`): images resized to 64 px.
- real_quick: `real` at test size.

Sections: `synthetic` (generated data), `captions`, `tokenizer`, `train` (a full training config,
the same keys as `agriclip train` configs: configs/tiny.py; its `data` section holds the
augmentation), `features`, `align`, `zeroshot`, `own_data`. Measured sizes and times are in BENCHMARKS.md; change them together with those numbers.
"""

import ml_collections

from agriclip_jax.train.config import default_config

ARGS = ("default", "quick", "real", "real_quick")


def _train_config(steps: int, batch_size: int, image_size: int) -> ml_collections.ConfigDict:
  """Joint CLIP + DINO training of the tiny towers on one CPU device."""
  c = default_config()
  c.kind = "joint"
  c.batch_size = batch_size
  c.total_steps = steps
  c.log_every_steps = max(1, steps // 10)
  # A demo stopped mid-training (Ctrl-C, kill) resumes from its newest checkpoint on the next run.
  c.checkpoint_every_steps = max(1, steps // 4)
  c.fast_compile = False
  c.mesh.data = 1
  c.sharding.min_size = 2 ** 30  # tiny params: replicate everything
  # The demo's data stage writes the captioned manifest and the tokenizer and sets
  # data.source and data.tokenizer to them before training.
  c.data.source = "demo"
  c.data.image_size = image_size
  c.data.context_length = 32  # captions are short; 77 would only add padding
  c.data.global_crop_size = image_size
  c.data.local_crop_size = image_size // 2
  c.data.n_local_crops = 2
  c.clip.variant = "tiny"
  c.clip.vocab_size = 0  # set from the trained tokenizer
  c.clip.sharded_loss = False
  c.clip.optimizer.lr = 1e-3
  c.clip.optimizer.min_lr = 1e-5
  c.clip.optimizer.warmup_steps = max(1, steps // 20)
  c.clip.optimizer.weight_decay = 0.05
  c.dino.variant = "tiny"
  c.dino.out_dim = 256
  c.dino.hidden_dim = 256
  c.dino.bottleneck_dim = 64
  c.dino.drop_path_rate = 0.0
  c.dino.teacher_temp = 0.04
  c.dino.teacher_momentum = 0.99
  c.dino.freeze_last_layer_epochs = 0
  c.dino.optimizer.lr = 1e-3
  c.dino.optimizer.min_lr = 1e-5
  c.dino.optimizer.warmup_steps = max(1, steps // 20)
  c.dino.optimizer.weight_decay = 0.04
  c.dino.optimizer.weight_decay_end = 0.1
  return c


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  if arg not in ARGS:
    raise ValueError(f"configs/demo.py:{arg}: expected one of {ARGS}")
  quick = arg.endswith("quick")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.synthetic = ml_collections.ConfigDict(dict(
      # Pretraining set (ALive-synth). Rendering is cheap (~1,000 images/s), so the default draws
      # 12,000 (6.4 epochs of 1,200 steps) rather than repeating 3,000 for 25 epochs.
      num_images=600 if quick else 12000,
      image_size=64,
      images_per_class=20 if quick else 30))  # per class of each downstream task
  c.captions = ml_collections.ConfigDict(dict(
      variants=3,  # ALive bank paraphrases per image (agriclip_jax.prompts), besides the writer's
      # Own data without --metadata: captions and zero-shot prompts from the class folder names.
      template="a photo of a {} leaf"))
  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=1024, min_frequency=2))
  if arg == "default":
    c.train = _train_config(steps=1200, batch_size=64, image_size=64)
  elif arg == "quick":
    c.train = _train_config(steps=400, batch_size=32, image_size=32)
    c.train.clip.optimizer.lr = c.train.dino.optimizer.lr = 2e-3
  elif arg == "real":
    c.train = _train_config(steps=600, batch_size=64, image_size=64)
  else:
    c.train = _train_config(steps=60, batch_size=32, image_size=32)
  c.train.seed = c.seed
  # DINO multi-crop: the reference recipe is colour-invariant (jitter p 0.8, grayscale p 0.2), but
  # here colours name classes (fin colour, coat, chlorosis) and PIL jitter is the dearest part of
  # the input pipeline on 2 cores, so both are turned down.
  c.train.data.update(dict(
      global_crop_scale=(0.4, 1.0), local_crop_scale=(0.1, 0.4), jitter_p=0.3,
      jitter=(0.3, 0.3, 0.1, 0.0), grayscale_p=0.0, blur_p=(0.5, 0.1, 0.2), solarize_p=0.0,
      clip_crop_scale=(0.8, 1.0)))
  if quick:
    c.train.data.jitter_p = 0.0  # the dearest augmentation; the quick run cannot afford it
  # The DINO tower: the tiny ViT (width 64) at depth 4 rather than 2 for the full runs. Measured on
  # a 3,000-image set with the final class token, aligned-DINO zero-shot rose from 28 % to 34 % for
  # ~40 % more step time; a wider head, more prototypes, other learning rates, teacher temperature
  # or momentum, 6 local crops or twice the steps moved it by 2 points or less. Its features for
  # the aligner are DINO's linear-evaluation choice for small ViTs, the class tokens of the last 4
  # blocks ("last4"; the reference reads the final one, "cls"). BENCHMARKS.md has the full run.
  if not quick:
    c.train.dino.layers = 4
  c.features = ml_collections.ConfigDict(dict(batch_size=128,
                                              dino_pooling="last2" if quick else "last4"))
  c.align = ml_collections.ConfigDict(dict(ridge="auto", holdout=0.1))
  # ensemble_weight None: the weight and temperatures calibrated on the held-out align rows
  # (zeroshot.calibrate_on_source); a number fixes the weight.
  c.zeroshot = ml_collections.ConfigDict(dict(ensemble_weight=ml_collections.FieldReference(
      None, field_type=float)))
  c.own_data = ml_collections.ConfigDict(dict(
      # `--holdout F`: this fraction of --data (by a seeded hash of each path) is held out of
      # training and evaluated as one more zero-shot task.
      holdout_salt="agriclip-demo"))
  return c
