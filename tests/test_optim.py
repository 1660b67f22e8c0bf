"""Parameter rules and optimizers against torch.optim peers and the DINO reference formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from agriclip_jax import param_rules
from agriclip_jax.train import optim


def _params() -> dict:
  rng = np.random.default_rng(0)
  return {
      "encoder": {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
                  "ln": {"scale": jnp.ones((3,), jnp.float32)}},
      "head": {"last_layer": {"kernel_v": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}},
      "frozen_tower": {"kernel": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)},
  }


def _grads(step: int, params: dict) -> dict:
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _opt_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      name="adamw", lr=0.1, min_lr=0.001, warmup_steps=2, weight_decay=0.04,
      weight_decay_end=0.4, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, clip_per_param_norm=None,
      clip_global_norm=None, weight_decay_rules=None, lr_multipliers=(), frozen=(), delayed=(),
      unfreeze_step=0))
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------------------- rules

def test_first_match_wins_and_names_are_slash_joined():
  params = _params()
  rules = [(r".*bias", "no-decay"), (r"encoder/.*", "encoder"), (r".*", "rest")]
  tree = param_rules.tree_from_rules(params, rules)
  assert tree["encoder"]["dense"]["bias"] == "no-decay"
  assert tree["encoder"]["dense"]["kernel"] == "encoder"
  assert tree["head"]["last_layer"]["kernel_v"] == "rest"
  assert "head/last_layer/kernel_v" in param_rules.flatten_names(params)


def test_unmatched_parameter_and_unused_rule_are_errors():
  with pytest.raises(ValueError, match="frozen_tower/kernel"):
    param_rules.tree_from_rules(_params(), [(r"encoder/.*", 1), (r"head/.*", 2)])
  with pytest.raises(ValueError, match="decoder"):
    param_rules.tree_from_rules(_params(), [(r"decoder/.*", 1)], default=0, require_all_used=True)
  with pytest.raises(ValueError, match="not a valid regex"):
    param_rules.first_match("a", [("(", 1)])


# ---------------------------------------------------------------------------- schedules

def _dino_cosine_scheduler(base, final, total, warmup=0, start_warmup=0.0):
  """facebookresearch/dino utils.cosine_scheduler, per iteration."""
  warm = np.linspace(start_warmup, base, warmup)
  iters = np.arange(total - warmup)
  cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate([warm, cos])


def test_schedules_match_dino_reference():
  total, warmup = 20, 5
  lr = optim.warmup_cosine_schedule(0.5, warmup, total, end=1e-3)
  ref_lr = _dino_cosine_scheduler(0.5, 1e-3, total, warmup)
  # The reference's linspace hits the peak at step warmup-1; ours at step `warmup` (optax-style).
  ours = np.array([float(lr(s)) for s in range(total)])
  np.testing.assert_allclose(ours[warmup:], ref_lr[warmup:], rtol=1e-5)
  np.testing.assert_allclose(ours[:warmup], 0.5 * np.arange(warmup) / warmup, rtol=1e-6)
  momentum = optim.cosine_schedule(0.996, 1.0, total)
  np.testing.assert_allclose([float(momentum(s)) for s in range(total)],
                             _dino_cosine_scheduler(0.996, 1.0, total), rtol=1e-6)


# ---------------------------------------------------------------------------- AdamW vs torch

def _torch_adamw_run(params: dict, cfg, steps: int, frozen: set, delayed: set, multipliers: dict):
  """torch.optim.AdamW with param groups, lr/wd set from the schedules before each step."""
  names = param_rules.flatten_names(params)
  tensors = {n: torch.nn.Parameter(torch.from_numpy(np.array(v))) for n, v in names.items()}
  decays = param_rules.flatten_names(param_rules.tree_from_rules(
      params, optim.DEFAULT_WEIGHT_DECAY_RULES))
  groups = [{"params": [tensors[n]], "name": n, "decay": decays[n]} for n in names if n not in frozen]
  opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
  lr_fn = optim.lr_schedule(cfg, steps)
  wd_fn = optim.weight_decay_schedule(cfg, steps)
  for step in range(steps):
    grads = param_rules.flatten_names(_grads(step, params))
    for group in opt.param_groups:
      group["lr"] = float(lr_fn(step)) * multipliers.get(group["name"], 1.0)
      group["weight_decay"] = float(wd_fn(step)) if group["decay"] else 0.0
      tensor = group["params"][0]
      # DINO's cancel_gradients_last_layer: no gradient at all, so no update of any kind.
      tensor.grad = None if (group["name"] in delayed and step < cfg.unfreeze_step) else \
          torch.from_numpy(np.array(grads[group["name"]]))
    opt.step()
  return {n: t.detach().numpy() for n, t in tensors.items()}


def _optax_run(params: dict, cfg, steps: int):
  tx, _ = optim.build_optimizer(cfg, params, steps)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(steps):
    updates, state = update(_grads(step, params), state, params)
    params = optax.apply_updates(params, updates)
  return param_rules.flatten_names(params), state


def test_adamw_matches_torch_with_masks_multipliers_frozen_and_delayed_parts():
  cfg = _opt_config(frozen=(r"frozen_tower/.*",), delayed=(r"head/last_layer/.*",), unfreeze_step=3,
                    lr_multipliers=((r"encoder/dense/kernel", 0.5),))
  params, steps = _params(), 6
  got, state = _optax_run(params, cfg, steps)
  expected = _torch_adamw_run(params, cfg, steps, {"frozen_tower/kernel"},
                              {"head/last_layer/kernel_v"}, {"encoder/dense/kernel": 0.5})
  start = param_rules.flatten_names(params)
  np.testing.assert_array_equal(got["frozen_tower/kernel"], start["frozen_tower/kernel"])
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Frozen parts hold no optimizer state: no moment buffer has the frozen tower's shape (2, 2).
  shapes = [leaf.shape for leaf in jax.tree.leaves(state)]
  assert (2, 2) not in shapes


def test_delayed_part_is_untouched_until_unfreeze_step():
  cfg = _opt_config(delayed=(r"head/.*",), unfreeze_step=4)
  params = _params()
  got, _ = _optax_run(params, cfg, 4)
  np.testing.assert_array_equal(got["head/last_layer/kernel_v"],
                                params["head"]["last_layer"]["kernel_v"])
  got, _ = _optax_run(params, cfg, 5)
  assert not np.allclose(got["head/last_layer/kernel_v"], params["head"]["last_layer"]["kernel_v"])


def test_sgd_matches_torch():
  cfg = _opt_config(name="sgd", weight_decay=1e-2, weight_decay_end=None, warmup_steps=0)
  params, steps = _params(), 4
  got, _ = _optax_run(params, cfg, steps)
  names = param_rules.flatten_names(params)
  decays = param_rules.flatten_names(param_rules.tree_from_rules(
      params, optim.DEFAULT_WEIGHT_DECAY_RULES))
  tensors = {n: torch.nn.Parameter(torch.from_numpy(np.array(v))) for n, v in names.items()}
  opt = torch.optim.SGD([{"params": [tensors[n]], "weight_decay": 1e-2 if decays[n] else 0.0}
                         for n in names], lr=cfg.lr, momentum=0.9)
  lr_fn = optim.lr_schedule(cfg, steps)
  for step in range(steps):
    grads = param_rules.flatten_names(_grads(step, params))
    for group, name in zip(opt.param_groups, names):
      group["lr"] = float(lr_fn(step))
      group["params"][0].grad = torch.from_numpy(np.array(grads[name]))
    opt.step()
  for name, tensor in tensors.items():
    np.testing.assert_allclose(got[name], tensor.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_per_param_clip_matches_dino_clip_gradients():
  grads = {"a": jnp.full((4,), 3.0), "b": jnp.full((2,), 0.1)}
  clipped, _ = optim.clip_by_per_param_norm(3.0).update(grads, optax.EmptyState())
  norm_a = 6.0  # ||(3,3,3,3)||
  np.testing.assert_allclose(clipped["a"], 3.0 * 3.0 / (norm_a + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(clipped["b"], grads["b"])


def test_lars_runs_and_bad_configs_name_the_field():
  params = _params()
  cfg = _opt_config(name="lars", weight_decay_end=None)
  got, _ = _optax_run(params, cfg, 2)
  assert all(np.isfinite(v).all() for v in got.values())
  with pytest.raises(ValueError, match="optimizer.lr"):
    optim.build_optimizer(_opt_config(lr=-1.0), params, 10)
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.build_optimizer(_opt_config(name="adam"), params, 10)
  assert math.isclose(float(optim.cosine_schedule(1.0, 0.0, 10)(10)), 0.0, abs_tol=1e-7)
