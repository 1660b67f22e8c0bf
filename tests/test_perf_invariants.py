"""Performance invariants: one compilation per shape, remat changes nothing but memory, and the
DINO benchmark's PyTorch peer does the same step as the project's Flax step (so its ratio is fair).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax.models.configs import text_config, vision_config
from agriclip_jax.models.text import TextTransformer
from agriclip_jax.models.vit import VisionTransformer
from agriclip_jax.train import state as state_lib
from agriclip_jax.train import steps as steps_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_dino_step, dino_torch_peer  # noqa: E402
from benchmarks.bench_mfu import count_compilations  # noqa: E402
from configs import tiny  # noqa: E402


def _contrastive_batch(cfg, batch: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  size, length = cfg.data.image_size, cfg.data.context_length
  tokens = rng.integers(1, cfg.clip.vocab_size - 1, (batch, length)).astype(np.int32)
  tokens[:, -1] = cfg.clip.vocab_size - 1
  return dict(images=rng.standard_normal((batch, size, size, 3)).astype(np.float32), tokens=tokens)


def test_contrastive_train_step_compiles_once():
  cfg = tiny.get_config("contrastive")
  task = state_lib.build_task(cfg, steps_per_epoch=4)
  state = jax.jit(lambda: state_lib.init_state(task, 0))()
  step = jax.jit(steps_lib.make_train_step(task, None), donate_argnums=0)
  with count_compilations() as first:
    state, metrics = step(state, _contrastive_batch(cfg, 4, seed=0))
    jax.block_until_ready(metrics)
  assert first.count >= 1  # the counter does see compilations
  with count_compilations() as later:
    for seed in (1, 2, 3):  # new data, new step number, donated state: same executable
      state, metrics = step(state, _contrastive_batch(cfg, 4, seed))
      jax.block_until_ready(metrics)
  assert later.count == 0, later.names
  assert step._cache_size() == 1
  assert int(state["step"]) == 4 and np.isfinite(float(metrics["loss"]))


def test_model_apply_compiles_once():
  model = VisionTransformer(vision_config("tiny"))
  images = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.key(0), images)["params"]
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  with count_compilations() as first:
    jax.block_until_ready(apply(params, images))
  assert first.count >= 1  # the counter does see compilations
  inputs = [images + k for k in range(3)]  # eager ops compile too: made outside the count
  with count_compilations() as later:
    for new_images in inputs:
      jax.block_until_ready(apply(params, new_images))
  assert later.count == 0, later.names
  assert apply._cache_size() == 1


def _loss_and_grads(module, params, inputs, rngs=None):
  def loss(p):
    return jnp.sum(jnp.sin(module.apply({"params": p}, *inputs, rngs=rngs)))
  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(a, b, atol: float = 1e-6):
  value_a, grads_a = a
  value_b, grads_b = b
  np.testing.assert_allclose(value_a, value_b, rtol=1e-5)
  assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
  for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol)


def test_remat_gives_same_loss_and_gradients_text_tower():
  # The causal text tower; the image tower is covered (with stochastic depth) below.
  plain = text_config("tiny", vocab_size=512, context_length=12)
  remat = dataclasses.replace(plain, remat=True)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 511, (3, 12)), jnp.int32)
  params = TextTransformer(plain).init(jax.random.key(0), tokens)["params"]
  remat_params = TextTransformer(remat).init(jax.random.key(0), tokens)["params"]
  # Same parameter names and values: remat is invisible to checkpoints and converters.
  jax.tree.map(np.testing.assert_array_equal, params, remat_params)
  _assert_same(_loss_and_grads(TextTransformer(plain), params, (tokens,)),
               _loss_and_grads(TextTransformer(remat), params, (tokens,)))


def test_remat_gives_same_loss_and_gradients_with_drop_path():
  # Stochastic depth draws random masks inside the rematerialised blocks: the recomputed forward
  # must draw the same ones.
  plain = vision_config("tiny", flavour="dino", drop_path_rate=0.5)
  remat = dataclasses.replace(plain, remat=True)
  images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
  params = VisionTransformer(plain).init(jax.random.key(0), images)["params"]
  rngs = {"dropout": jax.random.key(7)}
  train = lambda cfg: VisionTransformer(cfg)
  plain_out = _loss_and_grads(_Train(train(plain)), params, (images,), rngs)
  remat_out = _loss_and_grads(_Train(train(remat)), params, (images,), rngs)
  _assert_same(plain_out, remat_out)
  eval_value, _ = _loss_and_grads(_Train(train(plain), train=False), params, (images,))
  assert abs(float(eval_value) - float(plain_out[0])) > 1e-3  # drop path really was active


class _Train:
  """`module.apply(..., train=True)` with the apply signature `_loss_and_grads` expects."""

  def __init__(self, module, train: bool = True):
    self.module, self.train = module, train

  def apply(self, variables, *inputs, rngs=None):
    return self.module.apply(variables, *inputs, train=self.train, rngs=rngs)


def test_dino_benchmark_peer_matches_project_step():
  # Local crops 16 px (2x2 patches): positions are interpolated from the 4x4 grid as DINO does.
  bench = dataclasses.replace(bench_dino_step.QUICK, local_size=16, drop_path_rate=0.0,
                              out_dim=64, hidden_dim=32, bottleneck_dim=16)
  task, step, state = bench_dino_step.project_dino_step(bench)
  crops = bench_dino_step.synthetic_crops(bench)
  lr = float(task.schedules["dino"]["lr"](0))
  weight_decay = float(task.schedules["dino"]["weight_decay"](0))
  momentum = float(task.dino.teacher_momentum(0))
  peer = dino_torch_peer.TorchDinoStep(bench, lr, weight_decay)
  peer.load_flax(jax.device_get(state["params"]["dino"]))
  global_crops, local_crops = dino_torch_peer.to_torch_crops(crops)
  flax_losses, torch_losses = [], []
  for _ in range(2):
    state, metrics = step(state, crops)
    loss, grad_norm = peer(global_crops, local_crops, momentum=momentum,
                           teacher_temp=task.dino.teacher_temp)
    flax_losses.append(float(metrics["loss"]))
    torch_losses.append(loss)
    if len(flax_losses) == 1:
      np.testing.assert_allclose(float(metrics["grad_norm_dino"]), grad_norm, rtol=1e-4)
  # The second loss sees the clipped AdamW update, the EMA teacher and the new centre.
  np.testing.assert_allclose(flax_losses, torch_losses, rtol=2e-4)
  assert abs(flax_losses[1] - flax_losses[0]) > 1e-4  # the step changed something


def test_remat_policy_gives_same_gradients():
  # The default policy (nothing_saveable) is covered by the two tests above.
  from agriclip_jax.models.transformer import Transformer
  policy = "dots_with_no_batch_dims_saveable"
  make = lambda remat: Transformer(32, 2, 2, 64, "quick_gelu", 1e-5, causal=True, remat=remat,
                                   remat_policy=policy)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 32)), jnp.float32)
  params = make(False).init(jax.random.key(0), x)["params"]
  _assert_same(_loss_and_grads(make(False), params, (x,)), _loss_and_grads(make(True), params, (x,)))


def test_unknown_remat_policy_is_named():
  from agriclip_jax.models.transformer import Transformer
  stack = Transformer(32, 1, 2, 64, "gelu", 1e-5, remat=True, remat_policy="save_everything")
  with pytest.raises(ValueError, match="save_everything"):
    stack.init(jax.random.key(0), jnp.zeros((1, 3, 32)))


def test_scanned_stack_equals_unrolled_and_params_round_trip():
  from agriclip_jax.models.transformer import (Transformer, stack_layer_params,
                                               unstack_layer_params)
  make = lambda scan, remat=False: Transformer(32, 3, 2, 64, "gelu", 1e-6, causal=True,
                                               remat=remat, scan_layers=scan)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 32)), jnp.float32)
  params = make(False).init(jax.random.key(0), x)["params"]
  stacked = stack_layer_params(params)
  scanned_shapes = jax.eval_shape(lambda: make(True).init(jax.random.key(0), x)["params"])
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, scanned_shapes)
  assert stacked["resblocks"]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
  jax.tree.map(np.testing.assert_array_equal, unstack_layer_params(stacked), params)
  unrolled = _loss_and_grads(make(False), params, (x,))
  for remat in (False, True):
    value, grads = _loss_and_grads(make(True, remat), stacked, (x,))
    # Other fusion of the loop body: rounding-level differences on gradients of size ~1.
    _assert_same(unrolled, (value, unstack_layer_params(grads)), atol=2e-5)


def test_scanned_stack_keeps_the_same_block_outputs_as_unrolled():
  from agriclip_jax.models.transformer import Transformer, stack_layer_params
  make = lambda scan: Transformer(32, 3, 2, 64, "gelu", 1e-6, scan_layers=scan)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 32)), jnp.float32)
  params = make(False).init(jax.random.key(0), x)["params"]
  out, kept = make(False).apply({"params": params}, x, keep_last=2)
  np.testing.assert_array_equal(out, make(False).apply({"params": params}, x))
  np.testing.assert_array_equal(kept[-1], out)
  assert len(kept) == 2 and np.abs(np.asarray(kept[0]) - np.asarray(kept[1])).max() > 1e-3
  scanned_out, scanned_kept = make(True).apply({"params": stack_layer_params(params)}, x,
                                               keep_last=2)
  for got, want in zip((scanned_out, *scanned_kept), (out, *kept)):
    np.testing.assert_allclose(got, want, atol=1e-5)
