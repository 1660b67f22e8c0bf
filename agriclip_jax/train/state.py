"""What is trained (the task) and the train state pytree.

The train state is a plain dict so Orbax saves and restores it without custom types:
  step         int32 []    optimizer updates done (skipped non-finite steps included)
  params       {"clip": ..., "dino": ...}   the trained models (DINO: the student)
  opt_state    {"clip": ..., "dino": ...}   one optax state per model part
  teacher      {"dino": ...} or {}          EMA teacher of the DINO student
  batch_stats  {"dino": ...} or {}          BatchNorm running statistics of the student (ResNet)
  teacher_batch_stats  {"dino": ...} or {}  ... of the teacher: its own, not an EMA (see below)
  centre       [out_dim] or [0]             DINO centre of the teacher outputs
  rng          uint32 [2]                   base key; step keys are fold_in(rng, step)
  skipped      int32 []                     non-finite steps skipped

BatchNorm in DINO (facebookresearch/dino main_dino.py, checked): both networks get SyncBatchNorm;
the teacher is never switched to eval, so it normalises with batch statistics and updates its own
running statistics from the global crops it sees; the EMA covers `parameters()` only (buffers are
not averaged); at the start the teacher is a full copy of the student, buffers included. The
state mirrors that: `teacher_batch_stats` starts as a copy of `batch_stats` and is then updated by
the teacher's own forward passes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import CLIPConfig, clip_config, vision_config
from agriclip_jax.models.dino import DINO, DINOConfig, DINOHeadConfig
from agriclip_jax.models.resnet import RESNET_STAGES, ResNetConfig
from agriclip_jax.models.transformer import match_layer_layout
from agriclip_jax.train import optim

KINDS = ("contrastive", "dino", "joint")
# dino.variant names that select a torchvision ResNet backbone, e.g. "resnet50".
RESNET_VARIANTS = {f"resnet{depth}": depth for depth in RESNET_STAGES}


def is_resnet_variant(variant: str) -> bool:
  return variant in RESNET_VARIANTS


@dataclasses.dataclass(frozen=True)
class DinoSettings:
  steps_per_epoch: int
  student_temp: float
  teacher_temp: float
  warmup_teacher_temp: float
  warmup_teacher_temp_epochs: int
  centre_momentum: float
  teacher_momentum: Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainTask:
  """Everything static about a run: models, optimizers, loss choices. Hashable by identity."""
  kind: str
  clip_model: CLIP | None
  dino_model: DINO | None
  optimizers: dict[str, optax.GradientTransformation]
  schedules: dict[str, dict[str, Callable]]
  contrastive_loss: str  # "infonce" | "sigmoid"
  sharded_loss: bool
  dino: DinoSettings | None
  accumulate_steps: int
  pretrained: dict[str, str]  # part -> model directory to start from

  @property
  def parts(self) -> tuple[str, ...]:
    return tuple(p for p, m in (("clip", self.clip_model), ("dino", self.dino_model)) if m)

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


# ----------------------------------------------------------------------------------------------
# Model configs from the run config
# ----------------------------------------------------------------------------------------------

def _init_from_config(config: Any, part: str) -> dict[str, Any]:
  """The model config stored in `config.<part>.init_from`, which must hold a `part` model."""
  from agriclip_jax import model_io
  path = config[part].init_from
  meta = model_io.read_config(path)
  if meta["model_type"] != part:
    raise ValueError(f"{part}.init_from={path!r} holds a {meta['model_type']!r} model, "
                     f"not a {part} model")
  return meta["config"]


def clip_model_config(config: Any) -> CLIPConfig:
  c = config.clip
  if c.get("init_from"):
    cfg = CLIPConfig.from_dict(_init_from_config(config, "clip"))
    vision = dataclasses.replace(cfg.vision, dtype=config.dtype, patch_dropout=c.patch_dropout,
                                 **_execution(config))
    text = dataclasses.replace(cfg.text, dtype=config.dtype, **_execution(config))
    return cfg.replace(vision=vision, text=text)
  bias = c.get("init_logit_bias") if c.loss == "sigmoid" else None
  depth = {"layers": c.layers} if c.get("layers") else {}
  cfg = clip_config(c.variant, dtype=config.dtype, init_logit_bias=bias,
                    image_size=config.data.image_size, patch_dropout=c.patch_dropout,
                    **_execution(config), **depth)
  text = dataclasses.replace(cfg.text, vocab_size=c.vocab_size,
                             context_length=config.data.context_length, **_execution(config),
                             **depth)
  init_scale = c.get("init_logit_scale")
  changes = {"text": text}
  if init_scale is not None:
    changes["init_logit_scale"] = init_scale
  return cfg.replace(**changes)


def _execution(config: Any) -> dict[str, Any]:
  """How a transformer runs (not what it computes): remat, its policy, scan over layers."""
  return {"remat": bool(config.remat), "remat_policy": config.remat_policy,
          "scan_layers": bool(config.scan_layers)}


def dino_model_config(config: Any) -> DINOConfig:
  d = config.dino
  if d.get("init_from"):
    cfg = DINOConfig.from_dict(_init_from_config(config, "dino"))
    if isinstance(cfg.backbone, ResNetConfig):
      backbone = dataclasses.replace(cfg.backbone, dtype=config.dtype)
    else:
      backbone = dataclasses.replace(cfg.backbone, dtype=config.dtype,
                                     drop_path_rate=d.drop_path_rate, **_execution(config))
    return DINOConfig(backbone, cfg.head)
  head = DINOHeadConfig(out_dim=d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                        norm_last_layer=d.norm_last_layer)
  if is_resnet_variant(d.variant):
    # No drop-path, remat or depth override for a ResNet: the variant names the depth.
    backbone = ResNetConfig(depth=RESNET_VARIANTS[d.variant],
                            image_size=config.data.global_crop_size, dtype=config.dtype)
    return DINOConfig(backbone, head)
  depth = {"layers": d.layers} if d.get("layers") else {}
  backbone = vision_config(d.variant, flavour="dino", image_size=config.data.global_crop_size,
                           drop_path_rate=d.drop_path_rate, dtype=config.dtype, **_execution(config),
                           **depth)
  return DINOConfig(backbone, head)


def load_pretrained(task: "TrainTask") -> dict[str, Any]:
  """Host params of the parts that start from a model directory (`init_from`).

  A model with BatchNorm also brings its running statistics, as `"<part>_batch_stats"`.
  """
  from agriclip_jax import model_io
  loaded = {}
  models = {"clip": task.clip_model, "dino": task.dino_model}
  for part, path in task.pretrained.items():
    _, _, variables = model_io.load_model_dir(path)
    # The run may scan its layers where the saved model did not, or the other way round.
    model_type = "clip" if part == "clip" else "dino"
    like = model_io.abstract_variables(model_type, models[part].config.to_dict())
    loaded[part] = match_layer_layout(variables["params"], like["params"])
    if "batch_stats" in variables:
      loaded[f"{part}_batch_stats"] = variables["batch_stats"]
  return loaded


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------

def _abstract_params(model, inputs: tuple) -> Any:
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs)["params"])


def build_task(config: Any, steps_per_epoch: int) -> TrainTask:
  if config.kind not in KINDS:
    raise ValueError(f"config.kind={config.kind!r}; expected one of {KINDS}")
  total = config.total_steps
  clip_model = dino_model = dino = None
  optimizers, schedules, pretrained = {}, {}, {}
  if config.kind in ("contrastive", "joint"):
    cfg = clip_model_config(config)
    clip_model = CLIP(cfg)
    size, length = cfg.vision.image_size, cfg.text.context_length
    abstract = _abstract_params(clip_model, (jnp.zeros((1, size, size, 3)),
                                             jnp.zeros((1, length), jnp.int32)))
    optimizers["clip"], schedules["clip"] = optim.build_optimizer(config.clip.optimizer, abstract,
                                                                  total)
    if config.clip.get("init_from"):
      pretrained["clip"] = config.clip.init_from
  if config.kind in ("dino", "joint"):
    cfg = dino_model_config(config)
    dino_model = DINO(cfg)
    size = cfg.backbone.image_size
    abstract = _abstract_params(dino_model, (jnp.zeros((1, size, size, 3)),))
    d = config.dino
    opt_cfg = d.optimizer.copy_and_resolve_references()
    with opt_cfg.unlocked():
      # DINO: the prototypes get no update of any kind during the first epoch(s).
      opt_cfg.delayed = tuple(opt_cfg.get("delayed", ()) or ()) + (r"head/last_layer/.*",)
      opt_cfg.unfreeze_step = d.freeze_last_layer_epochs * steps_per_epoch
    optimizers["dino"], schedules["dino"] = optim.build_optimizer(opt_cfg, abstract, total)
    momentum = optim.cosine_schedule(d.teacher_momentum, d.teacher_momentum_end, total)
    dino = DinoSettings(steps_per_epoch, d.student_temp, d.teacher_temp, d.warmup_teacher_temp,
                        d.warmup_teacher_temp_epochs, d.centre_momentum, momentum)
    if d.get("init_from"):
      pretrained["dino"] = d.init_from
  loss = config.clip.loss if clip_model else "infonce"
  if loss not in ("infonce", "sigmoid"):
    raise ValueError(f"clip.loss={loss!r}; expected 'infonce' or 'sigmoid'")
  return TrainTask(config.kind, clip_model, dino_model, optimizers, schedules, loss,
                   bool(config.clip.sharded_loss) if clip_model else False, dino,
                   int(config.accumulate_steps), pretrained)


# ----------------------------------------------------------------------------------------------
# The state
# ----------------------------------------------------------------------------------------------

def init_state(task: TrainTask, seed: int,
               pretrained: dict[str, Any] | None = None) -> dict[str, Any]:
  """The initial train state (pure: jit it with out_shardings to create it sharded).

  `pretrained` maps a part to its starting params (pass them as a jit argument, not a constant).
  """
  pretrained = pretrained or {}
  init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
  clip_key, dino_key = jax.random.split(init_key)
  params, opt_state, teacher = {}, {}, {}
  batch_stats, teacher_batch_stats = {}, {}
  centre = jnp.zeros((1,), jnp.float32)  # unused without DINO (Orbax cannot save empty arrays)
  if task.clip_model is not None:
    cfg = task.clip_model.config
    size, length = cfg.vision.image_size, cfg.text.context_length
    params["clip"] = pretrained["clip"] if "clip" in pretrained else task.clip_model.init(
        clip_key, jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32))["params"]
  if task.dino_model is not None:
    cfg = task.dino_model.config
    size = cfg.backbone.image_size
    variables = task.dino_model.init(dino_key, jnp.zeros((1, size, size, 3)))
    params["dino"] = pretrained.get("dino", variables["params"])
    # The teacher starts as a copy of the student (as the reference loads it), buffers included.
    teacher["dino"] = jax.tree.map(jnp.copy, params["dino"])
    if cfg.has_batch_norm:
      batch_stats["dino"] = pretrained.get("dino_batch_stats", variables["batch_stats"])
      teacher_batch_stats["dino"] = jax.tree.map(jnp.copy, batch_stats["dino"])
    centre = jnp.zeros((cfg.head.out_dim,), jnp.float32)
  for part in params:
    opt_state[part] = task.optimizers[part].init(params[part])
  return dict(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state, teacher=teacher,
              batch_stats=batch_stats, teacher_batch_stats=teacher_batch_stats, centre=centre,
              rng=run_key, skipped=jnp.zeros([], jnp.int32))


def abstract_state(task: TrainTask, seed: int = 0) -> Any:
  return jax.eval_shape(lambda: init_state(task, seed))


def parameter_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def state_shardings_for(task: TrainTask, mesh: Any, config: Any) -> Any:
  """NamedShardings of every state leaf from the config's sharding rules."""
  from agriclip_jax.train.sharding import state_shardings
  return state_shardings(abstract_state(task, config.seed), mesh, config.sharding.rules,
                         config.sharding.min_size)


def create_sharded_state(task: TrainTask, mesh: Any, config: Any,
                         pretrained: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
  """The initial state created directly on its shardings (large params never sit on one device)."""
  from agriclip_jax.train.steps import compiler_options
  shardings = state_shardings_for(task, mesh, config)
  create = jax.jit(lambda p: init_state(task, config.seed, p), out_shardings=shardings,
                   compiler_options=compiler_options(config.get("fast_compile", False)))
  return create(pretrained or {}), shardings
