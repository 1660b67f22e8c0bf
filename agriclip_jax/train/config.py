"""The run config: every key with its default, and validation that runs before any compilation.

Config files (`configs/*.py`) start from `default_config()` and change what their recipe needs;
the command line can then override any existing key (`--config.key=value`); an unknown key is an
error. Stable top-level keys that scripts rely on: seed, batch_size (global), total_steps,
log_every_steps, checkpoint_every_steps, keep_checkpoints.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import ml_collections


def _run_config_code(path: Path, call: Any, what: str) -> Any:
  """Runs the config file's own code; whatever it raises becomes a ValueError naming the file
  (a config's mistakes are the user's to fix, not a traceback into this package)."""
  try:
    return call()
  except SyntaxError as err:
    raise ValueError(f"config file {path}: syntax error at line {err.lineno}: {err.msg}") from err
  except Exception as err:  # noqa: BLE001 -- any error of the user's code, named with its file
    raise ValueError(f"config file {path}: {what} failed: {type(err).__name__}: {err}") from err


def load_config_file(spec: str, default_arg: str | None = None, lock: bool = True):
  """`path.py[:arg]` -> the ConfigDict its `get_config(arg)` returns (locked: no new keys)."""
  path_text, _, arg = str(spec).partition(":")
  path = Path(path_text)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found")
  if path.suffix != ".py":
    raise ValueError(f"config file {path} is not a .py file: give a Python file that defines "
                     f"get_config(arg), as configs/tiny.py does")
  module_spec = importlib.util.spec_from_file_location(f"agriclip_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  _run_config_code(path, lambda: module_spec.loader.exec_module(module), "running it")
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} defines no get_config(arg)")
  arg = arg or default_arg
  config = _run_config_code(path, lambda: module.get_config(arg) if arg else module.get_config(),
                            f"get_config({arg!r})" if arg else "get_config()")
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"config file {path}: get_config() returned {type(config).__name__}, not an "
                     f"ml_collections.ConfigDict (start from default_config() and return it)")
  if lock:
    config.lock()
  return config


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, min_lr=0.0, warmup_steps=0, weight_decay=0.0,
      weight_decay_end=ml_collections.config_dict.placeholder(float),
      b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False, trust_coefficient=0.001,
      clip_per_param_norm=ml_collections.config_dict.placeholder(float),
      clip_global_norm=ml_collections.config_dict.placeholder(float),
      # Ordered (regex, value) rules over '/'-joined parameter names; first match wins.
      weight_decay_rules=(), lr_multipliers=(), frozen=(), delayed=(), unfreeze_step=0))
  cfg.update(overrides)
  return cfg


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "contrastive"  # contrastive | dino | joint
  # Stable keys.
  c.seed = 0
  c.batch_size = 32  # global, over all devices and processes
  c.total_steps = 100
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 3
  # Numerics and parallelism.
  c.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU
  c.remat = False
  c.remat_policy = "nothing_saveable"  # what a rematerialised block keeps (models/transformer.py)
  c.scan_layers = False  # each transformer as one nn.scan: one compiled block, a shorter compile
  c.accumulate_steps = 1
  c.fast_compile = False  # cheaper XLA compilation, slower steps: for tiny CPU runs and tests
  c.nonfinite = "skip"  # skip: count and continue | stop: stop with the last good checkpoint
  # With "skip": a run whose skipped steps pass this fraction of its steps stops (checked at each
  # checkpoint and at the end) instead of saving or exporting a model that did not learn.
  c.max_skipped_fraction = 0.5
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding = ml_collections.ConfigDict(dict(rules=((r".*", "fsdp"),), min_size=2 ** 14))
  c.async_checkpoints = True
  c.tensorboard = True
  c.distributed = ml_collections.ConfigDict(dict(initialization_timeout=300,
                                                 heartbeat_timeout_seconds=100))
  # Evaluations between steps on the current parameters (train/evals.py): a tuple of dicts, e.g.
  # dict(name="corn", kind="zeroshot", source="data/corn", templates=("a photo of {}.",),
  # every=500) or dict(name="corn_knn", kind="knn", train=..., test=..., k=20, every=500).
  c.evals = ()
  # Data: "toy" generates structured data in-process; anything else goes to input_pipeline.
  c.data = ml_collections.ConfigDict(dict(
      source="toy", toy_records=1024, image_size=224, context_length=77, global_crop_size=224,
      local_crop_size=96, n_local_crops=8,
      # RandomResizedCrop area fractions: DINO's ViT recipe; the ResNet recipe uses (0.14, 1) and
      # (0.05, 0.14).
      global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4), num_workers=0,
      # The CLIP view's RandomResizedCrop area fraction (open_clip's training view).
      clip_crop_scale=(0.9, 1.0),
      # DINO multi-crop colour: DataAugmentationDINO's probabilities. jitter: (brightness,
      # contrast, saturation, hue); blur_p: (first global crop, second global crop, local crops);
      # solarize_p: the second global crop.
      flip_p=0.5, jitter_p=0.8, jitter=(0.4, 0.4, 0.2, 0.1), grayscale_p=0.2,
      blur_p=(1.0, 0.1, 0.5), solarize_p=0.2,
      # where the augmentation is rendered: auto (the device on GPU / TPU, PIL on the host on CPU),
      # device (input_pipeline/device_augment.py, inside jit) or host (the PIL reference)
      augment_on="auto", tokenizer=ml_collections.config_dict.
      placeholder(str), weights=ml_collections.config_dict.placeholder(tuple)))
  c.clip = ml_collections.ConfigDict(dict(
      variant="ViT-B/16", init_from=ml_collections.config_dict.placeholder(str),
      layers=ml_collections.config_dict.placeholder(int),  # None: the variant's depth
      vocab_size=49408, loss="infonce", sharded_loss=True,
      patch_dropout=0.0,  # FLIP: fraction of image patch tokens dropped per image in training
      init_logit_scale=ml_collections.config_dict.placeholder(float), init_logit_bias=-10.0,
      optimizer=optimizer_config(lr=1e-5, warmup_steps=500, weight_decay=0.2, b2=0.98, eps=1e-6)))
  c.dino = ml_collections.ConfigDict(dict(
      variant="ViT-S/16", init_from=ml_collections.config_dict.placeholder(str),
      layers=ml_collections.config_dict.placeholder(int),
      out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
      drop_path_rate=0.1, teacher_momentum=0.996, teacher_momentum_end=1.0, teacher_temp=0.04,
      warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, student_temp=0.1,
      centre_momentum=0.9, freeze_last_layer_epochs=1,
      optimizer=optimizer_config(lr=5e-4 * 64 / 256, min_lr=1e-6, warmup_steps=0,
                                 weight_decay=0.04, weight_decay_end=0.4, clip_per_param_norm=3.0)))
  return c


def _positive(config: Any, key: str, where: str = "config") -> None:
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{where}.{key}={value!r} must be a positive integer")


def validate_config(config: Any, n_devices: int, process_count: int = 1) -> None:
  """Errors that name the field, raised before anything is compiled."""
  from agriclip_jax.train import optim
  from agriclip_jax.train.sharding import mesh_shape
  if config.kind not in ("contrastive", "dino", "joint"):
    raise ValueError(f"config.kind={config.kind!r}; expected contrastive, dino or joint")
  for key in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "accumulate_steps"):
    _positive(config, key)
  if config.nonfinite not in ("skip", "stop"):
    raise ValueError(f"config.nonfinite={config.nonfinite!r}; expected 'skip' or 'stop'")
  fraction = config.max_skipped_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
    raise ValueError(f"config.max_skipped_fraction={fraction!r} must be a number in [0, 1): the "
                     f"largest fraction of steps that may be skipped for a non-finite loss")
  for key in ("image_size", "global_crop_size", "local_crop_size", "context_length",
              "toy_records"):
    _positive(config.data, key, "config.data")
  if config.data.get("augment_on", "auto") not in ("auto", "device", "host"):
    raise ValueError(f"config.data.augment_on={config.data.augment_on!r}; expected 'auto', "
                     f"'device' or 'host'")
  data, fsdp = mesh_shape(config.mesh.data, config.mesh.fsdp, n_devices)
  n_devices = data * fsdp  # the devices the mesh uses
  micro_batch = config.batch_size // config.accumulate_steps
  if config.batch_size % config.accumulate_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.accumulate_steps={config.accumulate_steps}")
  if micro_batch % n_devices:
    raise ValueError(f"config.batch_size={config.batch_size} (micro-batch {micro_batch}) is not "
                     f"divisible by the {n_devices} devices")
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if not config.data.source:
    raise ValueError("config.data.source is empty: give a data source (a manifest, a folder, tar "
                     "shards, ArrayRecord files or tfds:NAME) or 'toy'")
  uses_clip = config.kind in ("contrastive", "joint")
  uses_dino = config.kind in ("dino", "joint")
  if uses_clip:
    optim.validate_optimizer_config(config.clip.optimizer)
    if not config.clip.get("init_from"):
      from agriclip_jax.models.configs import vision_config
      patch = vision_config(config.clip.variant).patch_size
      if config.data.image_size % patch:
        raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by "
                         f"the patch size {patch} of clip.variant={config.clip.variant!r}")
  if uses_dino:
    optim.validate_optimizer_config(config.dino.optimizer)
    from agriclip_jax.train.state import is_resnet_variant
    for key in ("global_crop_scale", "local_crop_scale"):
      scale = tuple(config.data[key])
      if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"config.data.{key}={scale} must be (low, high) with 0 < low <= high <= 1")
    if is_resnet_variant(config.dino.variant) and not config.dino.get("init_from"):
      if config.data.global_crop_size < 32:
        raise ValueError(f"config.data.global_crop_size={config.data.global_crop_size} is below "
                         f"32, the smallest input of dino.variant={config.dino.variant!r}")
    elif not config.dino.get("init_from"):
      from agriclip_jax.models.configs import vision_config
      patch = vision_config(config.dino.variant, flavour="dino").patch_size
      for key in ("global_crop_size", "local_crop_size"):
        if config.data[key] % patch:
          raise ValueError(f"config.data.{key}={config.data[key]} is not divisible by the patch "
                           f"size {patch} of dino.variant={config.dino.variant!r}")
    if config.data.n_local_crops < 0:
      raise ValueError(f"config.data.n_local_crops={config.data.n_local_crops} must be >= 0")
    probabilities = {key: config.data[key] for key in ("flip_p", "jitter_p", "grayscale_p",
                                                       "solarize_p")}
    probabilities.update({f"blur_p[{i}]": p for i, p in enumerate(config.data.blur_p)})
    for key, value in probabilities.items():
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"config.data.{key}={value!r} must be a probability in [0, 1]")
    if len(tuple(config.data.blur_p)) != 3 or len(tuple(config.data.jitter)) != 4:
      raise ValueError(f"config.data.blur_p={tuple(config.data.blur_p)} needs 3 probabilities "
                       f"(global 1, global 2, local) and config.data.jitter="
                       f"{tuple(config.data.jitter)} 4 strengths (brightness, contrast, "
                       f"saturation, hue)")
  if uses_clip:
    scale = tuple(config.data.clip_crop_scale)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
      raise ValueError(f"config.data.clip_crop_scale={scale} must be (low, high) with "
                       f"0 < low <= high <= 1")
  from agriclip_jax.train.evals import validate_evals
  validate_evals(config.get("evals", ()), config.kind,
                 config.data.get("tokenizer") or config.clip.get("init_from"))
