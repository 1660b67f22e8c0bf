"""Optimizers from config: schedules, weight-decay masks, LR multipliers, frozen parts.

Every per-parameter choice goes through `param_rules` (ordered regex rules over '/'-joined
parameter names). The chain is written out so that DINO's recipe holds exactly:

  per-parameter (or global) gradient clip
  -> multi_transform over labels:  train   -> core (Adam moments / SGD momentum / LARS)
                                   delayed -> core, not updated until `unfreeze_step` (DINO's last
                                              layer: no moments, no decay, no step before that)
                                   frozen  -> set_to_zero (holds no state)
  -> decoupled weight decay (AdamW; scheduled, masked by rules)
  -> learning rate (warm-up + cosine, from the global step)
  -> per-parameter LR multipliers
  -> zero the updates of frozen parts, and of delayed parts before `unfreeze_step`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agriclip_jax import param_rules

Schedule = Callable[[jax.Array], jax.Array]

TRAIN, DELAYED, FROZEN = "train", "delayed", "frozen"

# Parameters that are never decayed: biases, LayerNorm scales, the temperature and its bias.
DEFAULT_WEIGHT_DECAY_RULES: tuple[tuple[str, bool], ...] = (
    (r".*bias", False), (r".*(^|/)scale", False), (r".*logit_scale", False), (r".*", True))


# ----------------------------------------------------------------------------------------------
# Schedules (functions of the global step, as the reference computes them per iteration)
# ----------------------------------------------------------------------------------------------

def cosine_schedule(start: float, end: float, steps: int) -> Schedule:
  """end + (start - end) * (1 + cos(pi * t / steps)) / 2, held at `end` after `steps`."""
  steps = max(int(steps), 1)

  def schedule(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32), 0, steps)
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * t / steps))
  return schedule


def warmup_cosine_schedule(peak: float, warmup_steps: int, total_steps: int,
                           end: float = 0.0, start: float = 0.0) -> Schedule:
  """Linear warm-up from `start` to `peak`, then cosine to `end` at `total_steps`."""
  warmup_steps = max(int(warmup_steps), 0)
  decay = cosine_schedule(peak, end, max(total_steps - warmup_steps, 1))

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = start + (peak - start) * step / max(warmup_steps, 1)
    return jnp.where(step < warmup_steps, warm, decay(step - warmup_steps))
  return schedule


def lr_schedule(cfg: Any, total_steps: int) -> Schedule:
  return warmup_cosine_schedule(cfg.lr, cfg.warmup_steps, total_steps, end=cfg.min_lr)


def weight_decay_schedule(cfg: Any, total_steps: int) -> Schedule:
  end = cfg.weight_decay if cfg.get("weight_decay_end") is None else cfg.weight_decay_end
  return cosine_schedule(cfg.weight_decay, end, total_steps)


# ----------------------------------------------------------------------------------------------
# Small gradient transformations optax does not have
# ----------------------------------------------------------------------------------------------

def clip_by_per_param_norm(max_norm: float) -> optax.GradientTransformation:
  """DINO's `clip_gradients`: each tensor scaled by max_norm / (||g|| + 1e-6) when that is < 1."""

  def update(updates, state, params=None):
    del params

    def clip(g):
      coef = max_norm / (jnp.linalg.norm(g.reshape(-1)) + 1e-6)
      return jnp.where(coef < 1.0, g * coef, g)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class FrozenUntilState(NamedTuple):
  count: jax.Array
  inner_state: Any


def frozen_until(inner: optax.GradientTransformation,
                 unfreeze_step: int) -> optax.GradientTransformation:
  """`inner` whose state does not move before `unfreeze_step` (as if there were no gradient)."""

  def init(params):
    return FrozenUntilState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner_state, params)
    active = state.count >= unfreeze_step
    new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner_state)
    return new_updates, FrozenUntilState(optax.safe_increment(state.count), inner_state)
  return optax.GradientTransformation(init, update)


class GateState(NamedTuple):
  count: jax.Array


def gate_updates(labels: Any, unfreeze_step: int) -> optax.GradientTransformation:
  """Zero the final updates of FROZEN leaves always and of DELAYED leaves before `unfreeze_step`."""

  def init(params):
    del params
    return GateState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    delayed_open = state.count >= unfreeze_step

    def gate(u, label):
      if label == FROZEN:
        return jnp.zeros_like(u)
      if label == DELAYED:
        return jnp.where(delayed_open, u, jnp.zeros_like(u))
      return u
    return jax.tree.map(gate, updates, labels), GateState(optax.safe_increment(state.count))
  return optax.GradientTransformation(init, update)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiply each update by its leaf of `multipliers` (python floats: LR multipliers)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------

def param_labels(params: Any, cfg: Any) -> Any:
  """TRAIN / DELAYED / FROZEN per leaf from `cfg.frozen` and `cfg.delayed` regex lists."""
  rules = ([(pattern, FROZEN) for pattern in cfg.get("frozen", ())] +
           [(pattern, DELAYED) for pattern in cfg.get("delayed", ())] + [(".*", TRAIN)])
  return param_rules.tree_from_rules(params, rules)


def _core(cfg: Any, weight_decay: Schedule, decay_mask: Any) -> optax.GradientTransformation:
  """The part of the optimizer with per-parameter state (moments / momentum)."""
  name = cfg.name
  if name == "adamw":
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if name == "sgd":
    # torch SGD: weight decay joins the gradient before momentum.
    return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.trace(decay=cfg.momentum, nesterov=cfg.get("nesterov", False)))
  if name == "lars":
    return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.scale_by_trust_ratio(trust_coefficient=cfg.get("trust_coefficient",
                                                                               0.001)),
                       optax.trace(decay=cfg.momentum))
  raise ValueError(f"optimizer.name={name!r}; expected one of adamw, sgd, lars")


def validate_optimizer_config(cfg: Any) -> None:
  if cfg.name not in ("adamw", "sgd", "lars"):
    raise ValueError(f"optimizer.name={cfg.name!r}; expected one of adamw, sgd, lars")
  for field in ("lr", "min_lr", "weight_decay"):
    if cfg.get(field) is not None and cfg[field] < 0:
      raise ValueError(f"optimizer.{field}={cfg[field]} must not be negative")
  if cfg.get("weight_decay_end") is not None and cfg.weight_decay_end < 0:
    raise ValueError(f"optimizer.weight_decay_end={cfg.weight_decay_end} must not be negative")
  if cfg.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps={cfg.warmup_steps} must not be negative")


def build_optimizer(cfg: Any, params: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                      dict[str, Schedule]]:
  """The optax chain for `params` from an optimizer config, and its schedules for logging.

  Config fields: name (adamw|sgd|lar), lr, min_lr, warmup_steps, weight_decay, weight_decay_end
  (None: constant), b1, b2, eps, momentum, clip_per_param_norm (DINO: 3.0) or clip_global_norm,
  weight_decay_rules [(regex, bool)], lr_multipliers [(regex, float)], frozen [regex],
  delayed [regex] with unfreeze_step.
  """
  validate_optimizer_config(cfg)
  lr = lr_schedule(cfg, total_steps)
  weight_decay = weight_decay_schedule(cfg, total_steps)
  labels = param_labels(params, cfg)
  decay_rules = tuple(cfg.get("weight_decay_rules", None) or DEFAULT_WEIGHT_DECAY_RULES)
  decay_mask = param_rules.tree_from_rules(params, decay_rules, default=True)
  multipliers = param_rules.tree_from_rules(params, tuple(cfg.get("lr_multipliers", ()) or ()),
                                            default=1.0, transform=lambda n, l, v: float(v))
  unfreeze_step = int(cfg.get("unfreeze_step", 0) or 0)

  parts: list[optax.GradientTransformation] = []
  if cfg.get("clip_per_param_norm"):
    parts.append(clip_by_per_param_norm(cfg.clip_per_param_norm))
  if cfg.get("clip_global_norm"):
    parts.append(optax.clip_by_global_norm(cfg.clip_global_norm))
  parts.append(optax.multi_transform(
      {TRAIN: _core(cfg, weight_decay, decay_mask),
       DELAYED: frozen_until(_core(cfg, weight_decay, decay_mask), unfreeze_step),
       FROZEN: optax.set_to_zero()}, labels))
  if cfg.name == "adamw":
    parts.append(optax.add_decayed_weights(weight_decay, decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  parts.append(scale_by_tree(multipliers))
  parts.append(gate_updates(labels, unfreeze_step))
  return optax.chain(*parts), {"lr": lr, "weight_decay": weight_decay}
